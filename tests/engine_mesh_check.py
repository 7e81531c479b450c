"""Runs in its own process with 8 simulated CPU devices: the serving engine on a (data 2, fsdp 2, tensor 2) mesh.

Prints one JSON object: each request's greedy tokens from an engine on 1 device, from one on the mesh and from a
paged-KV one on the mesh (same weights, MLFQ with preemption and KV offload, so slots, host round-trips and chunked
prefill all run sharded), and the partition specs the mesh engines' KV pools and weights got.
"""
import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from fastserve import parallel  # noqa: E402
from fastserve.config import ServeConfig, load_config  # noqa: E402
from fastserve.core.state import init_params  # noqa: E402
from fastserve.serve.engine import Engine, Request  # noqa: E402

MODEL = ["model.vocab_size=97", "model.d_model=48", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=96", "model.init_std=0.3", "model.max_seq_len=64", "data.seq_len=64"]
PROMPT_LENS, NEW_TOKENS = [3, 16, 7, 30, 5, 9], [20, 12, 24, 8, 24, 15]


def spec(x):
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def serve(shape, paged=False):
    cfg = load_config(None, [*MODEL, f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(shape))])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=3)
    # 4 slots: the cache's batch axis splits over data × fsdp; a 30-token prompt is prefilled in 16-token chunks
    serve_cfg = ServeConfig(slots=4, buckets=[8, 16], max_cache_len=48, scheduler="mlfq", mlfq_levels=6,
                            host_kv_slots=1, starvation_s=0.0, iteration_cost="profiled",
                            # paged: 8 blocks of 8 positions (384 bytes each: k, v × 2 layers × 2 heads × 12
                            # float32) for 4 slots, 1/3 of the slot layout's bytes: blocks run out
                            kv_cache_bytes=8 * 8 * 384 if paged else 0, kv_block=8)
    engine = Engine(graphdef, params, cfg.model, serve_cfg, mesh=mesh, stop_ids=[])
    rng = np.random.default_rng(0)
    reqs = [Request(rng.integers(1, 97, n).tolist(), max_new_tokens=m) for n, m in zip(PROMPT_LENS, NEW_TOKENS)]
    done = engine.generate(reqs, timeout=300)
    stats = engine.stats()
    return {"outputs": [r.output for r in done],
            "cache_k_spec": spec(jax.tree.leaves(engine.pool.cache)[0]),
            "q_spec": spec(_first_leaf(params, ("attn", "q", "kernel"))),
            "preemptions": stats["preemptions"], "offloads": stats["offloads"]}


def _first_leaf(params, names):
    """The first parameter whose path ends with `names` (per-layer or stacked layers alike)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if keys[-len(names):] == names:
            return leaf
    raise KeyError(names)


if __name__ == "__main__":
    print(json.dumps({"one": serve((1, 1, 1)), "mesh": serve((2, 2, 2)), "paged": serve((2, 2, 2), paged=True)}))
