"""The serving functions `fastserve.artifacts.writer` traces: their bodies over a flat list of weight leaves, the plan of
which (kind, bucket, batch size) to export with which argument specs, and each one's manifest entry."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastserve.generation import decoding as infer

from fastserve.artifacts.options import FUNCTION_DOCS, ExportOptions

def _dim(d: Any) -> int | str:
    return int(d) if isinstance(d, (int, np.integer)) else str(d)


def _spec(name: str, aval: Any) -> dict[str, Any]:
    return {"name": name, "shape": [_dim(d) for d in aval.shape], "dtype": str(np.dtype(aval.dtype))}


# ----------------------------------------------------------------------------------------- the functions

def build_functions(graphdef: nnx.GraphDef, treedef: Any, opts: ExportOptions, max_seq_len: int
                    ) -> dict[str, Callable]:
    """The three serving functions over a flat list of weight leaves (pure; jit/export them)."""

    def model_of(leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, list(leaves)))

    def prefill(leaves, tokens, lengths):
        model = model_of(leaves)
        cache = model.init_cache(tokens.shape[0], opts.max_cache_len)
        return infer.prefill(model, tokens, lengths, cache)

    def decode(leaves, tokens, positions, cache):
        return infer.decode(model_of(leaves), tokens, positions, cache)

    def generate(leaves, tokens, lengths, seed, temperature, top_k, top_p, max_new, stop_tokens):
        # Rows never run past the model's context: at most max_seq_len - length new tokens.
        row_max_new = jnp.clip(jnp.minimum(max_new, max_seq_len - lengths), 0, opts.max_new_tokens)
        return infer.generate(model_of(leaves), tokens, lengths, jax.random.key(seed),
                              max_new_tokens=opts.max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, stop_tokens=stop_tokens, row_max_new=row_max_new)

    return {"prefill": prefill, "decode": decode, "generate": generate}


def batch_variants(sizes: Sequence[int]) -> list[tuple[Any, str]]:
    """[(batch dim, name suffix)]: a symbolic "b" when no fixed sizes are given."""
    if not sizes:
        (b,) = jax.export.symbolic_shape("b")
        return [(b, "")]
    return [(int(n), f"_b{n}") for n in sizes]


def export_one(fn: Callable, args: Sequence[Any], platforms: Sequence[str]) -> jax.export.Exported:
    from fastserve.kernels.build import export_checks  # int8 layers call fastserve's own CPU kernel
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms), disabled_checks=export_checks())(*args)


def plan_exports(opts: ExportOptions, leaf_specs: list[Any], cache_spec: Callable[[Any], Any]
                 ) -> list[tuple[str, str, int | None, Any, tuple, list[str], list[str]]]:
    """[(name, kind, bucket, batch dim, argument specs, argument names, result names)] of every function to export."""
    i32, f32 = jnp.int32, jnp.float32
    sds = jax.ShapeDtypeStruct
    plan: list[tuple[str, str, int | None, Any, tuple, list[str], list[str]]] = []
    if "prefill" in opts.functions:
        for b, suffix in batch_variants(opts.batch_sizes):
            for t in opts.buckets:
                plan.append((f"prefill_{t}{suffix}", "prefill", t, b,
                             (leaf_specs, sds((b, t), i32), sds((b,), i32)),
                             ["tokens", "lengths"], ["logits", "cache"]))
    if "decode" in opts.functions:
        for b, suffix in batch_variants(opts.batch_sizes):
            plan.append((f"decode{suffix}", "decode", None, b,
                         (leaf_specs, sds((b,), i32), sds((b,), i32), cache_spec(b)),
                         ["tokens", "positions", "cache"], ["logits", "cache"]))
    if "generate" in opts.functions:
        for b, suffix in batch_variants(opts.generate_batch_sizes):
            for t in opts.buckets:
                plan.append((f"generate_{t}{suffix}", "generate", t, b,
                             (leaf_specs, sds((b, t), i32), sds((b,), i32), sds((), jnp.uint32), sds((b,), f32),
                              sds((b,), i32), sds((b,), f32), sds((b,), i32), sds((opts.max_stop_tokens,), i32)),
                             ["tokens", "lengths", "seed", "temperature", "top_k", "top_p", "max_new", "stop_tokens"],
                             ["tokens", "counts"]))
    return plan


def describe(exp: jax.export.Exported, fname: str, kind: str, bucket: int | None, b: Any, n_params: int,
             arg_names: list[str], result_names: list[str], cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Arguments and results of one exported function, read from its own avals (so they cannot drift). `cache`
    describes a KV cache argument / result: {"leaves": its number of arrays, …fields for the manifest}."""
    n_cache = int(cache["leaves"]) if cache else 0
    in_avals, out_avals = list(exp.in_avals), list(exp.out_avals)
    args: list[dict[str, Any]] = [{"name": "params", "kind": "weights", "count": n_params,
                                   "order": "manifest.params.names"}]
    rest = in_avals[n_params:]
    for name in arg_names:
        if name == "cache":
            args.append({**_spec("cache", rest[0]), "kind": "kv_cache", **(cache or {})})
            rest = rest[n_cache:]
        else:
            args.append(_spec(name, rest[0]))
            rest = rest[1:]
    results = []
    for name in result_names:
        if name == "cache":
            results.append({**_spec("cache", out_avals[0]), "kind": "kv_cache", **(cache or {})})
            out_avals = out_avals[n_cache:]
        else:
            results.append(_spec(name, out_avals[0]))
            out_avals = out_avals[1:]
    return {"file": fname, "kind": kind, "doc": FUNCTION_DOCS[kind], "bucket": bucket, "batch": _dim(b), "platforms": list(exp.platforms),
            "calling_convention_version": exp.calling_convention_version, "args": args, "results": results}
