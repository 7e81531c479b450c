"""Calibration for activation-aware transforms: the second moment XᵀX of the inputs each Linear layer sees on a
few batches of text (SVD-LLM's whitening needs it; so would any data-aware quantizer).

The model runs as one jitted program (`model_program`); while it is traced, `Linear.__call__` is wrapped so that
every selected layer also returns Σ_tokens w·x xᵀ of its input (w = the batch's per-token weight, 0 on padding).
Nothing in the model definition changes, and the wrapper is gone once tracing ends.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastserve.generation.program import model_program
from fastserve.models.layers import Linear

# (paths) -> {path: (XᵀX as float64 [in, in], tokens seen)}
Calibration = Callable[[Sequence[str]], dict[str, tuple[np.ndarray, float]]]


@contextlib.contextmanager
def _recording(sinks: dict[int, list], token_weights: jax.Array) -> Iterator[None]:
    original = Linear.__call__

    def call(self, x):
        if id(self) in sinks:
            rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * jnp.sqrt(token_weights)[:, None]
            sinks[id(self)].append(jnp.einsum("ti,tj->ij", rows, rows, precision=jax.lax.Precision.HIGHEST))
        return original(self, x)

    Linear.__call__ = call
    try:
        yield
    finally:
        Linear.__call__ = original


def input_grams(graphdef: Any, variables: Any, batches: Sequence[dict[str, np.ndarray]], paths: Sequence[str],
                mesh: Any = None) -> dict[str, tuple[np.ndarray, float]]:
    """{path: (Σ w·x xᵀ over every token of `batches`, Σ w)} for the Linear layers at `paths` (a causal LM's
    batches: {inputs [B, T], weights [B, T]})."""
    wanted = list(paths)

    def grams(model, tokens, weights):
        modules = {".".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}
        missing = [p for p in wanted if not isinstance(modules.get(p), Linear)]
        if missing:
            raise ValueError(f"calibration: no dense Linear layer at {missing[:3]}")
        sinks = {id(modules[p]): [] for p in wanted}
        with _recording(sinks, weights.reshape(-1).astype(jnp.float32)):
            model(tokens)
        # a layer called more than once per forward (none today) sums its calls
        return {p: sum(sinks[id(modules[p])]) for p in wanted}

    program = model_program(graphdef, grams)
    total = {p: np.zeros((0, 0)) for p in wanted}
    tokens = 0.0
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for batch in batches:
            out = jax.device_get(program(variables, batch["inputs"], batch["weights"]))
            for p in wanted:
                g = np.asarray(out[p], np.float64)
                total[p] = g if total[p].size == 0 else total[p] + g
            tokens += float(np.sum(batch["weights"]))
    return {p: (total[p], tokens) for p in wanted}


def whitening(gram: np.ndarray, damping: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float]:
    """(S, S⁻¹, λ) with S lower-triangular and S Sᵀ = XᵀX + λ·I (Cholesky). λ starts at `damping` times the
    mean diagonal and grows tenfold until the factorization succeeds (a rank-deficient XᵀX: too few tokens, or
    inputs confined to a subspace)."""
    n = gram.shape[0]
    scale = float(np.mean(np.diag(gram))) or 1.0
    lam = damping * scale
    for _ in range(12):
        try:
            s = np.linalg.cholesky(gram + lam * np.eye(n))
            return s, np.linalg.inv(s), lam
        except np.linalg.LinAlgError:
            lam *= 10
    raise ValueError("calibration: the input second moment is not positive definite even with heavy damping")


def lm_calibration_batches(cfg: Any, tokenizer: Any, sequences: int) -> list[dict[str, np.ndarray]]:
    """`sequences` rows of `data.seq_len` tokens from the *training* split of a text `data` source (the held-out
    split that compress and evaluate measure on is never seen), spread evenly over it, in batches of
    `data.batch_size`."""
    from fastserve.data import load_texts, pack_documents, split_documents
    from fastserve.data.lm import eval_batches

    if not hasattr(cfg.data, "paths"):
        raise ValueError(f"calibration reads text: data.source {cfg.data.source!r} is not a text source")
    docs = load_texts(cfg.data.source, cfg.data.paths)
    train_docs, _ = split_documents(docs, cfg.data.eval_fraction, cfg.train.seed)
    rows = pack_documents(train_docs, tokenizer, cfg.data.seq_len)
    if len(rows) == 0:
        raise ValueError("calibration: the training split of data holds no full sequence")
    pick = np.unique(np.linspace(0, len(rows) - 1, num=min(sequences, len(rows))).round().astype(int))
    return eval_batches(rows[pick], min(cfg.data.batch_size, len(pick)))


# Rows of data.seq_len tokens the whitening calibrates on unless `calibration: {sequences: N}` says otherwise. SmolLM2-135M
# at 0.8x the MLP parameters (experiments/results/bench_lowrank_real.md): 64 rows of 128 tokens gave 1.51x the dense
# held-out perplexity, 512 rows 1.42x; a corpus with fewer rows calibrates on all of them.
DEFAULT_SEQUENCES = 512


def lm_calibration(cfg: Any, loaded: Any) -> Calibration:
    """The `calibrate(paths, options)` that `lowrank(method=whitened)` asks for, for a loaded causal LM (a
    `fastserve.workdir.LoadedModel`) and its config's text data; options: {sequences: N (default DEFAULT_SEQUENCES)}."""
    memo: dict[tuple, dict] = {}  # the same layers and options again (several ratios of one model): no new pass

    def calibrate(paths: Sequence[str], options: dict) -> dict[str, tuple[np.ndarray, float]]:
        sequences = int(options.get("sequences", DEFAULT_SEQUENCES))
        key = (tuple(paths), sequences)
        if key not in memo:
            batches = lm_calibration_batches(cfg, loaded.tokenizer, sequences)
            memo[key] = input_grams(loaded.graphdef, loaded.params, batches, paths, loaded.mesh)
        return memo[key]
    return calibrate
