"""Import a HF transformers Llama checkpoint (config.json + model.safetensors, sharded or not, + tokenizer.json).

HF stores `nn.Linear` weights as (out, in) and already uses the half-split `rotate_half` RoPE layout, so matrices
are only transposed to our (in, out) kernels; no Q/K permutation is involved (that is a llama.cpp-only thing).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from fastserve.config import ModelConfig
from fastserve.interop.gguf import ImportedModel, _cast, check_params
from fastserve.models.layers import dtype_of

SUPPORTED_MODEL_TYPES = ("llama",)

# HF name inside `model.layers.{i}.` → our param path inside params["layers"][i], and whether to transpose.
_BLOCK_TENSORS = {
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "self_attn.q_proj.weight": (("attn", "q", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o", "kernel"), True),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
    "mlp.gate_proj.weight": (("mlp", "gate", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down", "kernel"), True),
}
# Buffers some checkpoints carry that hold nothing to import.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def model_config_from_hf(conf: dict[str, Any], dtype: str = "float32", source: str = "config.json") -> ModelConfig:
    """`ModelConfig` for a HF `LlamaConfig` dict; ValueError for any feature `DecoderLM` does not implement."""
    model_type = conf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: unsupported model_type '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in conf:
            raise ValueError(f"{source}: missing '{key}'")
    act = conf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: unsupported hidden_act '{act}' (DecoderLM uses SwiGLU with silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if conf.get(flag):
            raise ValueError(f"{source}: unsupported {flag}=true (DecoderLM has no biases)")
    rope = conf.get("rope_scaling") or conf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise ValueError(f"{source}: unsupported RoPE scaling rope_type='{rope_type}'")
    theta = conf.get("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0)
    d, heads = int(conf["hidden_size"]), int(conf["num_attention_heads"])
    head_dim = int(conf.get("head_dim") or d // heads)
    return ModelConfig(
        name="decoder",
        vocab_size=int(conf["vocab_size"]),
        d_model=d,
        n_layers=int(conf["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(conf.get("num_key_value_heads") or heads),
        head_dim=0 if head_dim == d // heads else head_dim,
        d_ff=int(conf["intermediate_size"]),
        max_seq_len=int(conf.get("max_position_embeddings", 2048)),
        rope_theta=float(theta),
        norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=False,   # the weights come per layer (fine-tuning stacks them: fastserve.core.init_from)
    )


def _open_tensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of the directory's safetensors file(s), by name (numpy, in the stored dtype)."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(directory, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"safetensors shard listed in the index is missing: {path}")
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def read_hf_config(directory: str | os.PathLike, dtype: str) -> tuple[str, dict[str, Any], str]:
    """(the model directory, its config.json, a short name for messages) of a HF checkpoint directory (or a file in
    it); an unknown `dtype` fails before anything is read."""
    dtype_of(dtype)
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        directory = os.path.dirname(directory) or "."
    conf_path = os.path.join(directory, "config.json")
    if not os.path.isfile(conf_path):
        raise FileNotFoundError(f"no config.json in {directory}")
    with open(conf_path, encoding="utf-8") as f:
        conf = json.load(f)
    return directory, conf, os.path.basename(os.path.normpath(directory)) or directory


def load_hf_llama(directory: str | os.PathLike, dtype: str = "float32") -> ImportedModel:
    """Reads a HF Llama directory into `DecoderLM` params (numpy arrays of `dtype`), its `tokenizer.json` tokenizer
    (None without one) and the chat template of tokenizer_config.json (None without one).

    Raises:
        FileNotFoundError: no directory, config.json or safetensors file.
        ValueError: an unsupported model type or feature, or a missing / misshapen / unexpected tensor (named).
    """
    from fastserve.interop.tokenizer import BPETokenizer

    directory, conf, source = read_hf_config(directory, dtype)
    cfg = model_config_from_hf(conf, dtype, f"{source}/config.json")
    tensors = {k: v for k, v in _open_tensors(directory).items() if not k.endswith(_IGNORED_SUFFIXES)}

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor '{name}'")
        return np.asarray(tensors.pop(name), dtype=np.float32)

    layers: dict[int, Any] = {}
    for i in range(cfg.n_layers):
        layer: dict[str, Any] = {}
        for hf_name, (ours, transpose) in _BLOCK_TENSORS.items():
            w = take(f"model.layers.{i}.{hf_name}")
            node = layer
            for key in ours[:-1]:
                node = node.setdefault(key, {})
            node[ours[-1]] = _cast(w.T if transpose else w, dtype)
        layers[i] = layer
    embedding = take("model.embed_tokens.weight")
    params: dict[str, Any] = {
        "embed": {"embedding": _cast(embedding, dtype)},
        "layers": layers,
        "final_norm": {"scale": _cast(take("model.norm.weight"), dtype)},
    }
    if cfg.tie_embeddings:
        if "lm_head.weight" in tensors:       # some tied checkpoints save the shared matrix twice
            head = take("lm_head.weight")
            if head.shape != embedding.shape or not np.array_equal(head, embedding):
                raise ValueError(f"{source}: tie_word_embeddings=true but lm_head.weight differs from the embedding")
    else:
        params["lm_head"] = {"kernel": _cast(take("lm_head.weight").T, dtype)}
    if tensors:
        raise ValueError(f"{source}: unexpected tensors (not part of a Llama model): {sorted(tensors)[:8]}")
    check_params(params, cfg, source)

    tokenizer = BPETokenizer.from_hf_dir(directory)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
    return ImportedModel(cfg, params, tokenizer, tokenizer.chat_template if tokenizer is not None else None)
