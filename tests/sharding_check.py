"""Runs in its own process with 8 simulated CPU devices (the test suite itself stays on 1 device).

Prints one JSON object: the partition specs parameters and optimizer moments got on a 2×2×2 mesh, and the losses
of the same training steps on 1 device and on that mesh. The model has two low-rank layers (layer 1's MLP gate and
down: factors u, v), so their placement, training, generation and restore are checked too. A separate Adafactor run
(factored second moments, shaped unlike their parameters) trains on 1 device and on fsdp=2 × tensor=2.
"""
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from fastserve import parallel  # noqa: E402
from fastserve.config import load_config  # noqa: E402
from fastserve.core.optim import make_optimizer  # noqa: E402
from fastserve.core.state import create_train_state  # noqa: E402
from fastserve.core.steps import make_train_step, split_micro_batches  # noqa: E402
from fastserve.tasks import make_task  # noqa: E402


def restore_elsewhere(state, shardings, cfg_overrides, directory):
    """Saves the 2×2×2 state, restores it onto other mesh shapes; returns max abs difference and specs per shape."""
    from fastserve.core.checkpoint import Checkpointer
    from fastserve.core.state import abstract_train_state
    ckpt = Checkpointer(directory)
    ckpt.save(3, state, {"data": {"epoch": 0, "index": 3}})
    ckpt.wait()
    out = {}
    for shape in [(1, 1, 1), (1, 4, 2), (4, 1, 2)]:
        cfg = load_config(None, [*cfg_overrides, f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"])
        mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(shape))])
        tx, _ = make_optimizer(cfg.optimizer, 10)
        _, fresh, new_shardings = create_train_state(cfg.model, tx, mesh, seed=1)
        step, restored, extra = ckpt.restore_latest(abstract_train_state(fresh, new_shardings))
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
        q = restored["params"]["layers"][0]["attn"]["q"]["kernel"]
        out["x".join(map(str, shape))] = {"max_abs_diff": diff, "step": step, "extra": extra,
                                          "q_spec": [list(a) if isinstance(a, tuple) else a for a in q.sharding.spec],
                                          "q_devices": len(q.sharding.device_set)}
    ckpt.close()
    return out


OVERRIDES = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
             "model.n_kv_heads=2", "model.d_ff=128", "model.tie_embeddings=false",
             # low-rank factors in both orientations: gate (embed, mlp) and down (mlp, embed), rank 16
             "model.compressed={layers.1.mlp.gate: {kind: lowrank, rank: 16}, layers.1.mlp.down: {kind: lowrank, rank: 16}}",
             "optimizer.warmup_steps=0", "optimizer.learning_rate=1e-2"]


def training(overrides, shape, data_seed):
    """(mesh, graphdef, state, shardings, the jitted lm train step, a batch of 8 random rows of 16 tokens) for the
    config `overrides` on the first prod(shape) devices as a (data, fsdp, tensor) mesh."""
    cfg = load_config(None, [*overrides, f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(shape))])
    tx, schedule = make_optimizer(cfg.optimizer, 10)
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, seed=0)
    step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
    tokens = np.random.default_rng(data_seed).integers(0, 256, (8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 16), np.float32)}
    return mesh, graphdef, state, shardings, step, batch


def run(shape, restore_dir=None):
    mesh, graphdef, state, shardings, step, batch = training(OVERRIDES, shape, data_seed=0)
    losses = []
    for _ in range(3):
        state, metrics = step(state, parallel.host_to_global(split_micro_batches(batch, 2), mesh, leading=1), {})
        losses.append(float(metrics["loss_sum"] / metrics["weight"]))
    spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    # Sharded inference: greedy KV-cached generation over the same weights, and the cache's own sharding.
    import jax.numpy as jnp
    from flax import nnx
    from fastserve.generation import decoding as infer
    prompts = jnp.asarray(batch["inputs"][:4, :6])
    with jax.set_mesh(mesh):
        generated, _ = jax.jit(lambda p: infer.generate(
            nnx.merge(graphdef, p), prompts, jnp.full((4,), 6, jnp.int32), jax.random.key(0), max_new_tokens=5,
            temperature=jnp.zeros(4), top_k=jnp.zeros(4, jnp.int32), top_p=jnp.ones(4),
            stop_tokens=jnp.array([-1], jnp.int32)))(state["params"])
        cache_k = jax.jit(lambda p: nnx.merge(graphdef, p).init_cache(4, 16)[0]["k"])(state["params"])
    layer = state["params"]["layers"][0]
    adam = state["opt_state"][1][0]  # chain(clip, adamw) → adamw's ScaleByAdamState
    low = state["params"]["layers"][1]["mlp"]
    shard = lambda x: list(x.addressable_shards[0].data.shape)
    return {
        "restored": restore_elsewhere(state, shardings, OVERRIDES, restore_dir) if restore_dir else {},
        "losses": losses,
        "generated": np.asarray(generated).tolist(),
        "cache_spec": spec(cache_k),
        "params": {"embed": spec(state["params"]["embed"]["embedding"]), "q": spec(layer["attn"]["q"]["kernel"]),
                   "o": spec(layer["attn"]["o"]["kernel"]), "gate": spec(layer["mlp"]["gate"]["kernel"]),
                   "down": spec(layer["mlp"]["down"]["kernel"]), "norm": spec(layer["attn_norm"]["scale"]),
                   "lm_head": spec(state["params"]["lm_head"]["kernel"])},
        "adam_mu_q": spec(adam.mu["layers"][0]["attn"]["q"]["kernel"]),
        "adam_count": spec(adam.count),
        "step": spec(state["step"]),
        "q_shard_shape": list(layer["attn"]["q"]["kernel"].addressable_shards[0].data.shape),
        "lowrank": {f"{name}.{f}": {"spec": spec(low[name][f]), "shard": shard(low[name][f]),
                                    "shape": list(low[name][f].shape), "devices": len(low[name][f].sharding.device_set),
                                    "adam_mu_spec": spec(adam.mu["layers"][1]["mlp"][name][f])}
                    for name in ("gate", "down") for f in ("u", "v")},
    }


def adafactor_run(shape):
    """Adafactor (after the default global-norm clipping) on a model wide enough (≥ 128) for factored second moments: two steps; the losses (the
    second after an update) and the parameters after them, to compare across meshes."""
    mesh, _, state, _, step, batch = training(
        ["model.vocab_size=256", "model.d_model=128", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=256", "model.tie_embeddings=false", "optimizer.name=adafactor", "optimizer.learning_rate=1e-2",
         "optimizer.warmup_steps=0",
         # per-layer 2-D kernels: the factored moments of a [128, 128] kernel (stacked kernels: tests/test_llama_1b.py)
         "model.scan_layers=false"], shape, data_seed=1)
    losses, init = [], jax.tree.map(np.asarray, state["params"])
    for _ in range(2):
        state, metrics = step(state, parallel.host_to_global(split_micro_batches(batch, 1), mesh, leading=1), {})
        losses.append(float(metrics["loss_sum"] / metrics["weight"]))
    factored = state["opt_state"][1][0]  # chain(clip, adafactor); adafactor's chain starts with scale_by_factored_rms
    q = state["params"]["layers"][0]["attn"]["q"]["kernel"]
    params = jax.tree.map(np.asarray, state["params"])
    return {"losses": losses, "params": params,
            "max_update": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init))),
            "q_spec": [list(a) if isinstance(a, tuple) else a for a in q.sharding.spec],
            "q_devices": len(q.sharding.device_set),
            "v_row_q_shape": list(factored.v_row["layers"][0]["attn"]["q"]["kernel"].shape),
            "v_row_q_spec": [list(a) if isinstance(a, tuple) else a for a in
                             factored.v_row["layers"][0]["attn"]["q"]["kernel"].sharding.spec]}


def adafactor_check():
    one, mesh = adafactor_run((1, 1, 1)), adafactor_run((1, 2, 2))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(mesh["params"])))
    return {"one": {k: v for k, v in one.items() if k != "params"}, "mesh": {k: v for k, v in mesh.items() if k != "params"},
            "max_param_diff": diff}


if __name__ == "__main__":
    print(json.dumps({"one": run((1, 1, 1)), "mesh": run((2, 2, 2), restore_dir=sys.argv[1]),
                      "adafactor": adafactor_check()}))
    sys.stdout.flush()
