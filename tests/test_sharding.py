"""Sharding: parameters (dense and low-rank) land where THE rules table says, and a step computes the same loss on
1 and 8 devices (AdamW on data × fsdp × tensor, Adafactor on fsdp × tensor)."""
import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.state import abstract_model


def test_rules_table_is_complete_and_unique():
    names = [name for name, _ in parallel.LOGICAL_RULES]
    assert len(names) == len(set(names))
    _, _, logical = abstract_model(load_config(None, ["model.vocab_size=64", "model.tie_embeddings=false"]).model)
    used = {name for axes in jax.tree.leaves(logical, is_leaf=lambda n: isinstance(n, tuple)) for name in axes}
    assert used <= set(names), used - set(names)
    for _, axes in parallel.LOGICAL_RULES:
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            assert axis is None or axis in parallel.MESH_AXES


def test_logical_to_spec():
    assert parallel.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)  # fsdp used once
    with pytest.raises(KeyError, match="not in fastserve.parallel.LOGICAL_RULES"):
        parallel.logical_to_spec(("embedding",))


def test_mesh_shape_resolution():
    assert parallel.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    assert parallel.mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="12 devices, but 8"):
        parallel.mesh_shape(3, 2, 2, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.mesh_shape(-1, -1, 1, 8)


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ckpt_dir = str(tmp_path_factory.mktemp("mesh_ckpt"))
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "sharding_check.py"), ckpt_dir],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_params_and_optimizer_state_land_on_the_rule_axes(eight_device_run):
    params = eight_device_run["mesh"]["params"]
    assert params["embed"] == ["tensor", "fsdp"]      # (vocab, embed)
    assert params["q"] == ["fsdp", "tensor"]          # (embed, heads)
    assert params["o"] == ["tensor", "fsdp"]          # (heads, embed)
    assert params["gate"] == ["fsdp", "tensor"]       # (embed, mlp)
    assert params["down"] == ["tensor", "fsdp"]       # (mlp, embed)
    assert params["lm_head"] == ["fsdp", "tensor"]    # (embed, vocab)
    assert params["norm"] == [None]
    assert eight_device_run["mesh"]["adam_mu_q"] == ["fsdp", "tensor"]  # moments shard like their parameter
    assert eight_device_run["mesh"]["adam_count"] == [] and eight_device_run["mesh"]["step"] == []
    assert eight_device_run["mesh"]["q_shard_shape"] == [32, 32]        # 64×64 split 2×2
    assert eight_device_run["one"]["q_shard_shape"] == [64, 64]


def test_loss_is_the_same_on_one_device_and_on_the_mesh(eight_device_run):
    one, mesh = eight_device_run["one"]["losses"], eight_device_run["mesh"]["losses"]
    assert one[0] > one[-1]  # the steps really trained
    assert mesh == pytest.approx(one, rel=1e-5)


def test_checkpoint_restores_onto_other_mesh_shapes(eight_device_run):
    """Saved on 2×2×2, restored exactly onto 1 device, fsdp=4×tensor=2 and data=4×tensor=2, sharded as the new mesh says."""
    restored = eight_device_run["mesh"]["restored"]
    assert set(restored) == {"1x1x1", "1x4x2", "4x1x2"}
    for shape, r in restored.items():
        assert r["max_abs_diff"] == 0.0 and r["step"] == 3 and r["extra"] == {"data": {"epoch": 0, "index": 3}}
    assert restored["1x1x1"]["q_devices"] == 1
    assert restored["1x4x2"]["q_spec"] == ["fsdp", "tensor"] and restored["1x4x2"]["q_devices"] == 8
    assert restored["4x1x2"]["q_spec"] == [None, "tensor"]  # no fsdp axis: only tensor-sharded, replicated over data


def test_sharded_generation_equals_one_device_and_the_cache_follows_the_rules(eight_device_run):
    assert eight_device_run["mesh"]["generated"] == eight_device_run["one"]["generated"]
    assert eight_device_run["mesh"]["cache_spec"][:3] == [["data", "fsdp"], None, "tensor"]  # batch, seq, kv heads (, dim)


def test_low_rank_factors_shard_their_outer_axes_and_replicate_the_rank_axis(eight_device_run):
    """Layer 1's MLP gate and down are low-rank (rank 16) in the 8-device run: each factor's outer axis shards like the
    dense kernel's would ("embed" → fsdp, "mlp" → tensor), the "rank" axis stays whole on every device; the Adam
    moments follow; and training/generation/restore above ran with them (same losses on 1 device and on the mesh)."""
    low, one = eight_device_run["mesh"]["lowrank"], eight_device_run["one"]["lowrank"]
    want = {"gate.u": (["fsdp", None], [64, 16], [32, 16]),    # (embed, rank)
            "gate.v": ([None, "tensor"], [16, 128], [16, 64]),  # (rank, mlp)
            "down.u": (["tensor", None], [128, 16], [64, 16]),  # (mlp, rank)
            "down.v": ([None, "fsdp"], [16, 64], [16, 32])}     # (rank, embed)
    assert set(low) == set(want)
    for name, (spec, shape, shard) in want.items():
        got = low[name]
        assert (got["spec"], got["shape"], got["shard"], got["devices"]) == (spec, shape, shard, 8), (name, got)
        assert got["adam_mu_spec"] == spec, name
        assert one[name]["shard"] == one[name]["shape"] == shape and one[name]["devices"] == 1, name


def test_adafactor_trains_on_a_two_axis_mesh_like_on_one_device(eight_device_run):
    """Adafactor's factored moments (a vector per matrix, shaped unlike the parameter) are replicated and its step
    counter lives on the mesh: no "incompatible devices"; two steps on fsdp=2 × tensor=2 equal those on 1 device."""
    ada = eight_device_run["adafactor"]
    one, mesh = ada["one"], ada["mesh"]
    assert mesh["q_spec"] == ["fsdp", "tensor"] and mesh["q_devices"] == 4 and one["q_devices"] == 1
    assert mesh["v_row_q_shape"] == [128] and mesh["v_row_q_spec"] == []   # factored (128×128 kernel), replicated
    assert one["losses"][1] < one["losses"][0]                              # the first update lowered the loss
    assert mesh["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["max_update"] > 1e-3 and ada["max_param_diff"] < 1e-5, ada
