"""configs/llama_1b.yaml: its full-size shardings on a simulated 2×2×2 mesh put every large tensor (weights and Adam
moments) on fsdp, the stacked `layers` axis never sharded; and a tiny override of the same file (bf16, scanned
layers, FSDP over every device) trains on this CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "llama_1b.yaml")

# Runs in its own process with 8 simulated devices. Nothing is allocated: the shardings come from the abstract
# model; the one compile (the parameter init, lowered with those output shardings) shows XLA takes them as they are.
SHARDING_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from flax import nnx
from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.optim import make_optimizer
from fastserve.core.state import abstract_model_split, opt_state_shardings
from fastserve.models import build_model

cfg = load_config(sys.argv[1], ["model.vocab_size=8000", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
mesh = parallel.make_mesh(cfg.mesh)
tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
graphdef, params, p_axes, _, _ = abstract_model_split(cfg.model)
p_shard = parallel.tree_shardings(mesh, params, p_axes)
o_shard = opt_state_shardings(tx, params, p_shard, mesh)
opt = jax.eval_shape(tx.init, params)

def init():
    return nnx.split(build_model(cfg.model, nnx.Rngs(0)), nnx.Param, ...)[1]
with jax.set_mesh(mesh):
    compiled = jax.jit(lambda: nnx.to_pure_dict(init()), out_shardings=p_shard).lower().compile()
leaves = []
for tree, shard, kind in [(params, compiled.output_shardings, "param"), (opt, o_shard, "adam")]:
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shard)):
        if getattr(x, "ndim", 0):
            leaves.append({"path": kind + jax.tree_util.keystr(path), "shape": list(x.shape),
                           "spec": [list(a) if isinstance(a, tuple) else a for a in s.spec]})
n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
print(json.dumps({"n_params": n_params, "scanned": cfg.model.scanned, "dtype": cfg.model.dtype, "leaves": leaves}))
"""


@pytest.mark.slow
def test_full_size_shardings_put_every_large_tensor_on_fsdp():
    out = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT, RECIPE], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.95e9 < report["n_params"] < 1.05e9 and report["scanned"] and report["dtype"] == "bfloat16"
    large = [leaf for leaf in report["leaves"] if np.prod(leaf["shape"]) >= 2 ** 20]
    assert len(large) >= 2 * 8    # 7 stacked kernels + the embedding, as weights and as each Adam moment
    for leaf in large:
        flat = [a for axes in leaf["spec"] for a in (axes if isinstance(axes, list) else [axes])]
        assert "fsdp" in flat, leaf
        if ".layers" in leaf["path"] or "'layers'" in leaf["path"]:
            assert leaf["shape"][0] == 16 and (not leaf["spec"] or leaf["spec"][0] is None), leaf  # depth unsharded


TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
        "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=8", "tokenizer.vocab_size=400", "train.steps=4",
        "train.eval_every=4", "train.eval_batches=1", "checkpoint.every=4", "checkpoint.async_save=false",
        "log.every=1", "log.progress=false", "log.tensorboard=false", "log.peak_flops=1e9", "train.task.samples=0",
        "optimizer.warmup_steps=0", "optimizer.learning_rate=3e-3"]


@pytest.mark.slow
def test_a_tiny_override_of_the_recipe_trains_on_cpu(tmp_path):
    from fastserve import api
    from fastserve.config import load_config
    cfg = load_config(RECIPE, [*TINY, f"train.workdir={tmp_path}"])
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.model.scanned) == ("bfloat16", "float32", True)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    api.train(RECIPE, *TINY, f"train.workdir={tmp_path}")
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 4 and all(np.isfinite(losses)), records
    assert losses[-1] < losses[0], losses
    # the checkpoint holds the stacked layout (leading depth axis) and loads per-layer for the tools
    from fastserve.config import config_from_dict
    from fastserve.workdir import load_model
    loaded = load_model(config_from_dict({"source": {"kind": "checkpoint", "path": str(tmp_path)}}))
    assert sorted(loaded.params["layers"]) == [0, 1] and loaded.model_cfg.dtype == "bfloat16"
