"""The serving tests' model: a two-layer decoder (vocabulary 97, 64 positions) that compiles in seconds, and a count
of XLA compiles so a test can assert that nothing compiles after an engine's start-up."""
import jax

from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.state import init_params

VOCAB = 97
COMPILES: list[str] = []   # one entry per XLA compile in this process
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: COMPILES.append(name) if name.startswith("/jax/core/compile/") else None)


def tiny_decoder(seed: int):
    """(graphdef, params, model_cfg, mesh) of the tiny decoder on one device, parameters from `seed`."""
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.d_model=48", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.d_ff=96", "model.init_std=0.3", "model.max_seq_len=64",
                             "data.seq_len=64", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=seed)
    return graphdef, params, cfg.model, mesh
