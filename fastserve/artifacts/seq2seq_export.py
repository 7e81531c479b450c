"""Exporting an encoder–decoder (capability `seq2seq`): functions that translate without the model code.

For each source-length bucket T (the export's buckets up to model.max_source_len, and max_source_len itself) and
batch variant (symbolic "b" by default, or fixed sizes):

    encode_{T}          (params..., src [B, T] i32, src_mask [B, T] bool) → the cross-attention memory: per decoder
                        layer (k, v) [B, T, H, D] of the encoder output (what the decoder attends to at every step)
    translate_{T}       (params..., src, src_mask) → tokens [B, L] i32: greedy decoding, encoder included
    beam_{T}            (params..., src, src_mask, length_penalty f32 []) → (tokens [B, K, L] i32, scores [B, K] f32):
                        beam search with K = BEAM_SIZE beams, best first, early stopping when every beam has ended

L = model.max_target_len; tokens run through EOS, then pad. Both vocabularies are written: tokenizer.model (the
target side, decoding) and source_tokenizer.model (encoding; the same model when the vocabulary is joint).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastserve.artifacts.manifest import FORMAT_VERSION, WEIGHTS_FILE
from fastserve.artifacts.options import ExportError, ExportOptions

log = logging.getLogger("fastserve.export")

BEAM_SIZE = 4
SEQ2SEQ_FUNCTIONS = ("encode", "translate", "beam")
DOCS = {
    "encode": "source tokens and mask -> per decoder layer the cross-attention (k, v) of the encoder output",
    "translate": "source tokens and mask -> greedy target tokens [B, L] through EOS, then pad",
    "beam": f"source tokens and mask, length_penalty -> beam search ({BEAM_SIZE} beams): tokens [B, K, L], "
            "scores [B, K] = log-prob / length ** length_penalty, best first",
}


def source_buckets(opts: ExportOptions, max_source_len: int) -> list[int]:
    return sorted({b for b in opts.buckets if b < max_source_len} | {max_source_len})


def export_seq2seq(model_cfg: Any, params: Any, tokenizer: Any, out_dir: str, opts: ExportOptions, *,
                   source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes the functions above, the weights, both tokenizers and the manifest into `out_dir`."""
    from fastserve.artifacts import files as artifact_files
    from fastserve.artifacts.functions import batch_variants, export_one
    from fastserve.core.state import abstract_model
    from fastserve.generation.seq2seq_decode import beam_loop, model_step, translate_tokens

    if tokenizer is None:
        raise ExportError("a seq2seq export needs the work dir's tokenizer (tokenizer.model)")
    graphdef, abstract, _ = abstract_model(model_cfg)
    artifact_files.check_params(params, abstract)
    leaves, treedef = jax.tree.flatten(params)
    leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    max_len = model_cfg.max_target_len

    def model_of(leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, list(leaves)))

    def encode(leaves, src, src_mask):
        model = model_of(leaves)
        return model.memory_kv(model.encode(src, src_mask))

    def translate(leaves, src, src_mask):
        return translate_tokens(model_of(leaves), src, src_mask, max_len=max_len, **ids)

    def beam(leaves, src, src_mask, length_penalty):
        step, cache = model_step(model_of(leaves), src, src_mask, max_len, repeat=BEAM_SIZE)
        return beam_loop(step, cache, src.shape[0], beam_size=BEAM_SIZE, max_len=max_len,
                         length_penalty=length_penalty, early_stopping=True, **ids)

    fns = {"encode": encode, "translate": translate, "beam": beam}
    manifest_path = artifact_files.prepare_dir(out_dir)
    functions = {}
    sds = jax.ShapeDtypeStruct
    for b, suffix in batch_variants(opts.batch_sizes):
        for t in source_buckets(opts, model_cfg.max_source_len):
            for kind in opts.functions:
                args = (leaf_specs, sds((b, t), jnp.int32), sds((b, t), jnp.bool_))
                if kind == "beam":
                    args += (sds((), jnp.float32),)
                name = f"{kind}_{t}{suffix}"
                t0 = time.perf_counter()
                exp = export_one(fns[kind], args, opts.platforms)
                fname = name + ".jax_exported"
                with open(os.path.join(out_dir, fname), "wb") as f:
                    f.write(exp.serialize())
                log.info("exported %s (%.1f s)", fname, time.perf_counter() - t0)
                functions[name] = {"file": fname, "kind": kind, "doc": DOCS[kind], "bucket": t,
                                   "batch": b if isinstance(b, int) else str(b), "platforms": list(exp.platforms),
                                   "args": ["params", "src", "src_mask"] + (["length_penalty"] if kind == "beam" else []),
                                   "results": [str(a.shape) for a in exp.out_avals][:4]}
    artifact_files.save_weights(os.path.join(out_dir, WEIGHTS_FILE), artifact_files.param_names(params), leaves)
    files = [WEIGHTS_FILE, artifact_files.write_tokenizer(out_dir, tokenizer)]
    source_tok = _source_tokenizer(source)
    if source_tok is not None:
        with open(os.path.join(out_dir, "source_tokenizer.model"), "wb") as f:
            f.write(source_tok)
        files.append("source_tokenizer.model")
    manifest = {"capability": "seq2seq", "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "jax_version": jax.__version__,
                "platforms": list(opts.platforms), "model": dataclasses.asdict(model_cfg),
                "buckets": source_buckets(opts, model_cfg.max_source_len), "max_target_len": max_len,
                "beam_size": BEAM_SIZE, "batch": list(opts.batch_sizes) or "symbolic",
                "params": artifact_files.params_entry(params, leaves),
                "tokenizer": {**artifact_files.tokenizer_entry(tokenizer, files[1]),
                              "source_file": "source_tokenizer.model" if source_tok is not None else files[1]},
                "functions": functions, "source": source or {}}
    return artifact_files.finish(out_dir, manifest_path, manifest, files)


def _source_tokenizer(source: dict[str, Any] | None) -> bytes | None:
    """The source-side sentencepiece model of a work dir with separate vocabularies (None when joint)."""
    from fastserve.data.bible_pairs import SOURCE_TOKENIZER_DIR

    path = os.path.join((source or {}).get("path", ""), SOURCE_TOKENIZER_DIR, "tokenizer.model")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()

