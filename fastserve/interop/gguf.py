"""Import a llama.cpp GGUF file (Llama architecture) into `DecoderLM` parameters, its tokenizer and chat template.

Layout facts this relies on (checked on SmolLM2-135M-Instruct.Q4_1.gguf):
- `GGUFReader` gives each tensor's ggml dims `shape` = (in, out) (ne0 first); its `data` is laid out row-major as
  (out, in) (quantized: (out, bytes per row)), and `gguf.quants.dequantize(data, type)` returns (out, in) floats —
  the HF / PyTorch `weight` layout. Our kernels are (in, out), so every matrix is transposed; `token_embd` is
  already (vocab, d), our embedding layout.
- llama.cpp's converter permutes the rows of Q and K (per head, from the half-split `rotate_half` order to
  interleaved pairs); `unpermute_qk` undoes it so that `fastserve.models.layers.rope` is right.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from fastserve.config import ModelConfig
from fastserve.models.layers import dtype_of

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (per block) → our param path inside params["layers"][i]; "T" marks a matrix to transpose.
_BLOCK_TENSORS = {
    "attn_norm.weight": (("attn_norm", "scale"), False),
    "attn_q.weight": (("attn", "q", "kernel"), True),
    "attn_k.weight": (("attn", "k", "kernel"), True),
    "attn_v.weight": (("attn", "v", "kernel"), True),
    "attn_output.weight": (("attn", "o", "kernel"), True),
    "ffn_norm.weight": (("mlp_norm", "scale"), False),
    "ffn_gate.weight": (("mlp", "gate", "kernel"), True),
    "ffn_up.weight": (("mlp", "up", "kernel"), True),
    "ffn_down.weight": (("mlp", "down", "kernel"), True),
}


class ImportedModel(NamedTuple):
    """What an importer returns: a config for `DecoderLM`, its params as a pure nested dict (numpy arrays, kernels
    (in, out)), the tokenizer (fastserve Tokenizer interface) and the chat template (None if the model has none)."""
    model_cfg: ModelConfig
    params: dict
    tokenizer: Any
    chat_template: str | None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation. w: (out, in) with out = n_heads * head_dim."""
    out, inp = w.shape
    if out % (2 * n_heads):
        raise ValueError(f"cannot unpermute a ({out}, {inp}) Q/K weight over {n_heads} heads")
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_metadata(reader: Any) -> dict[str, Any]:
    """All GGUF key/values as Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def dequantize_tensor(t: Any) -> np.ndarray:
    """A `ReaderTensor` as a float32 array of numpy shape (out, in) (vectors: (n,))."""
    from gguf.quants import dequantize

    arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    want = tuple(int(d) for d in reversed(list(t.shape)))   # ggml dims are (ne0=in, ne1=out)
    if arr.shape != want:
        arr = arr.reshape(want)
    return arr


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(x, dtype=np.dtype(dtype_of(dtype)))


def model_config_from_metadata(meta: dict[str, Any], *, tied: bool, vocab_size: int, dtype: str = "float32") -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture general.architecture='{arch}' "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"GGUF metadata is missing '{full}'")
        return meta[full]

    if int(meta.get(f"{arch}.expert_count", 0) or 0) > 0:
        raise ValueError(f"unsupported GGUF model: mixture of experts ({arch}.expert_count="
                         f"{meta[f'{arch}.expert_count']})")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") and float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0) != 1.0:
        raise ValueError(f"unsupported GGUF RoPE scaling {arch}.rope.scaling.type='{scaling}'")
    d, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d // heads))
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise ValueError("unsupported GGUF model: attention key_length != value_length")
    rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"unsupported GGUF model: partial RoPE ({arch}.rope.dimension_count={rot}, head_dim={head_dim})")
    return ModelConfig(
        name="decoder",
        vocab_size=vocab_size,
        d_model=d,
        n_layers=int(need("block_count")),
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=0 if head_dim == d // heads else head_dim,
        d_ff=int(need("feed_forward_length")),
        max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        # GGUF stores the epsilon as float32 (1e-5 → 9.99999975e-06): round it back to the decimal it came from.
        norm_eps=float(np.format_float_positional(np.float32(need("attention.layer_norm_rms_epsilon")), unique=True)),
        tie_embeddings=tied,
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=False,   # the weights come per layer (fine-tuning stacks them: fastserve.core.init_from)
    )


def check_params(params: dict, model_cfg: ModelConfig, source: str) -> None:
    """Raises ValueError unless `params` has exactly the structure, shapes and dtypes of `DecoderLM(model_cfg)`."""
    import jax

    from fastserve.core.state import abstract_model

    _, abstract, _ = abstract_model(model_cfg)
    want = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    have = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"{source}: imported parameters do not match the model (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")
    wrong = [f"{k}: {tuple(np.shape(have[k]))} != {tuple(want[k].shape)}" for k in want
             if tuple(np.shape(have[k])) != tuple(want[k].shape)]
    if wrong:
        raise ValueError(f"{source}: parameter shapes do not match the model config: {wrong[:5]}")
    if jax.tree.structure(params) != jax.tree.structure(abstract):
        raise ValueError(f"{source}: imported parameter containers differ from the model's pure dict")
    wrong = [f"{k}: {have[k].dtype} != {want[k].dtype}" for k in want if np.dtype(have[k].dtype) != want[k].dtype]
    if wrong:
        raise ValueError(f"{source}: parameter dtypes do not match the model config: {wrong[:5]}")


def load_gguf(path: str | os.PathLike, dtype: str = "float32") -> ImportedModel:
    """Reads a Llama-architecture GGUF file: hyper-parameters from its metadata, dequantized weights as `DecoderLM`
    params (numpy arrays of `dtype`), its byte-level BPE tokenizer and chat template.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: an unsupported architecture / tokenizer / feature, or a missing or misshapen tensor (named).
    """
    from gguf import GGUFReader

    from fastserve.interop.tokenizer import BPETokenizer

    dtype_of(dtype)  # an unknown dtype fails before the file is read
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = GGUFReader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    source = os.path.basename(path)

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor '{name}'")
        return dequantize_tensor(tensors.pop(name))

    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: unsupported GGUF architecture general.architecture='{arch}' "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    tied = "output.weight" not in tensors
    embedding = take("token_embd.weight")                       # (vocab, d)
    cfg = model_config_from_metadata(meta, tied=tied, vocab_size=int(embedding.shape[0]), dtype=dtype)
    declared = meta.get(f"{arch}.vocab_size")
    if declared is not None and int(declared) != embedding.shape[0]:
        raise ValueError(f"{source}: {arch}.vocab_size={declared} but token_embd.weight has {embedding.shape[0]} rows")

    layers = []
    for i in range(cfg.n_layers):
        layer: dict[str, Any] = {}
        for gguf_name, (ours, transpose) in _BLOCK_TENSORS.items():
            w = take(f"blk.{i}.{gguf_name}")
            if gguf_name == "attn_q.weight":
                w = unpermute_qk(w, cfg.n_heads)
            elif gguf_name == "attn_k.weight":
                w = unpermute_qk(w, cfg.n_kv_heads)
            node = layer
            for key in ours[:-1]:
                node = node.setdefault(key, {})
            node[ours[-1]] = _cast(w.T if transpose else w, dtype)
        layers.append(layer)
    params: dict[str, Any] = {
        "embed": {"embedding": _cast(embedding, dtype)},
        "layers": {i: layer for i, layer in enumerate(layers)},
        "final_norm": {"scale": _cast(take("output_norm.weight"), dtype)},
    }
    if not tied:
        params["lm_head"] = {"kernel": _cast(take("output.weight").T, dtype)}
    if tensors:  # biases, rope_freqs, extra blocks …: importing without them would silently compute the wrong model
        raise ValueError(f"{source}: unsupported tensors in the GGUF file: {sorted(tensors)[:8]}")
    check_params(params, cfg, source)

    tokenizer = BPETokenizer.from_gguf_fields(meta)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens, the embedding {cfg.vocab_size} rows")
    return ImportedModel(cfg, params, tokenizer, tokenizer.chat_template)
