"""Test defaults: one CPU device in this process (8-device checks run in a subprocess), a persistent
compilation cache shared by the suite, and quiet logs."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastserve-test-jax-cache"))

import pytest  # noqa: E402

from fastserve.config import load_config  # noqa: E402


TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
    "model.max_seq_len=64", "tokenizer.vocab_size=400", "data.seq_len=32", "data.batch_size=8",
    "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=2", "log.progress=false", "log.tensorboard=false",
    "log.peak_flops=1e9", "log.every=1", "train.task.samples=0", "mesh.data=1",
]


@pytest.fixture
def tiny_config(tmp_path):
    """A small training config factory writing into a fresh work dir."""
    def make(*overrides: str):
        return load_config(None, [*TINY, f"train.workdir={tmp_path / 'run'}", *overrides])
    return make
