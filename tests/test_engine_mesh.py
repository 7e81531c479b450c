"""The serving engine on a mesh (tensor parallel heads / MLP, the KV pool sharded by the rules table) gives the same
greedy tokens as on one device, through preemption, KV offload and chunked prefill. Runs tests/engine_mesh_check.py
in a subprocess with 8 simulated devices (the suite itself stays on one)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def mesh_run():
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "engine_mesh_check.py")],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_engine_on_a_2x2x2_mesh_gives_the_one_device_greedy_tokens(mesh_run):
    one, mesh = mesh_run["one"], mesh_run["mesh"]
    assert mesh["outputs"] == one["outputs"]
    assert [len(o) for o in mesh["outputs"]] == [20, 12, 24, 8, 24, 15]
    assert mesh["preemptions"] > 0 and mesh["offloads"] > 0     # the sharded pool went through host and back


def test_paged_kv_on_the_mesh_gives_the_one_device_greedy_tokens(mesh_run):
    paged = mesh_run["paged"]
    assert paged["outputs"] == mesh_run["one"]["outputs"]
    assert paged["preemptions"] > 0 and paged["offloads"] > 0
    # the block pool [blocks, positions, kv_heads, head_dim]: blocks unsplit (any slot points at any block)
    assert paged["cache_k_spec"][:3] == [None, None, "tensor"]


def test_the_engine_kv_pool_and_weights_follow_the_rules_table(mesh_run):
    # KV pool [slots, positions, kv_heads, head_dim]: slots over every data-parallel replica, kv heads over tensor
    assert mesh_run["mesh"]["cache_k_spec"][:3] == [["data", "fsdp"], None, "tensor"]
    assert mesh_run["mesh"]["q_spec"][-2:] == ["fsdp", "tensor"]  # (embed, heads), after a leading layers axis if stacked


def test_serve_mesh_replaces_the_named_axes_and_bad_axes_are_config_errors():
    from fastserve.config import ConfigError, load_config
    from fastserve.serve.cli import serving_config
    cfg = serving_config(load_config(None, ["mesh.fsdp=2", "serve.mesh={tensor: 2, data: 1}"]))
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 2, 2)
    for bad, words in [("{pipeline: 2}", "unknown mesh axis 'pipeline'"), ("{tensor: 0}", "mesh.tensor must be")]:
        with pytest.raises(ConfigError, match="serve.mesh") as e:
            load_config(None, [f"serve.mesh={bad}"])
        assert words in str(e.value)
