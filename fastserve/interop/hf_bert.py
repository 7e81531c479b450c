"""Import a Hugging Face BERT checkpoint (config.json + model.safetensors + vocab.txt / tokenizer.json) into the
encoder family (`fastserve.models.encoder`), whose parameter paths follow BERT's one to one.

The head comes from the checkpoint's `architectures`: BertModel (a sentence-embedding model such as
all-MiniLM-L6-v2) → `embed`; BertForMaskedLM → `mlm`; BertForPreTraining → `mlm` + `nsp`;
BertForSequenceClassification → `classify`; BertForTokenClassification → `tag` (num_classes from `id2label`).
Task models prefix the encoder's tensors with `bert.`; both layouts are read. Kernels are transposed from torch's
(out, in) to our (in, out). `read_hf_bert` returns every tensor the checkpoint has (a BertModel's pooler too), for
`train.init_from`; `load_hf_bert` keeps those of the model its head builds.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from fastserve.interop.gguf import ImportedModel, _cast, check_params
from fastserve.interop.safetensors_llama import _open_tensors, read_hf_config
from fastserve.models.encoder import EncoderConfig

_HEADS = {"BertModel": ("embed", False), "BertForMaskedLM": ("mlm", False), "BertForPreTraining": ("mlm", True),
          "BertForSequenceClassification": ("classify", False), "BertForTokenClassification": ("tag", False)}
# HF name inside `encoder.layer.{i}.` → our path inside params["layers"][i] (weights are transposed)
_LAYER = {"attention.self.query": ("attn", "q"), "attention.self.key": ("attn", "k"),
          "attention.self.value": ("attn", "v"), "attention.output.dense": ("attn", "o"),
          "attention.output.LayerNorm": ("attn_norm",), "intermediate.dense": ("mlp", "up"),
          "output.dense": ("mlp", "down"), "output.LayerNorm": ("mlp_norm",)}
# HF module (after the `bert.` prefix) → our path, outside the layers
_TOP = {"embeddings.word_embeddings": ("embeddings", "word"),
        "embeddings.position_embeddings": ("embeddings", "position"),
        "embeddings.token_type_embeddings": ("embeddings", "token_type"),
        "embeddings.LayerNorm": ("embeddings", "norm"), "pooler.dense": ("pooler",),
        "cls.predictions.transform.dense": ("mlm", "dense"), "cls.predictions.transform.LayerNorm": ("mlm", "norm"),
        "cls.seq_relationship": ("nsp",), "classifier": ("classifier",)}
# Buffers and duplicates that hold nothing to import: position ids; the MLM decoder is the (tied) word embedding
# and its bias is `cls.predictions.bias` again.
_SKIPPED = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def encoder_config_from_hf(conf: dict[str, Any], dtype: str = "float32", source: str = "config.json",
                           head: str | None = None) -> EncoderConfig:
    """`EncoderConfig` for a HF `BertConfig` dict (the head from `architectures` unless given); ValueError for any
    feature the encoder does not implement."""
    if conf.get("model_type") != "bert":
        raise ValueError(f"{source}: model_type '{conf.get('model_type')}' is not bert")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in conf:
            raise ValueError(f"{source}: missing '{key}'")
    if conf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: unsupported hidden_act '{conf['hidden_act']}' (the encoder uses exact GELU)")
    if conf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: unsupported position_embedding_type '{conf['position_embedding_type']}'")
    arch = (conf.get("architectures") or ["BertModel"])[0]
    if head is None:
        if arch not in _HEADS:
            raise ValueError(f"{source}: unsupported architecture '{arch}' (supported: {', '.join(_HEADS)})")
        head, nsp = _HEADS[arch]
    else:
        nsp = head == "mlm" and arch == "BertForPreTraining"
    labels = conf.get("id2label") or {}
    return EncoderConfig(
        vocab_size=int(conf["vocab_size"]), d_model=int(conf["hidden_size"]), n_layers=int(conf["num_hidden_layers"]),
        n_heads=int(conf["num_attention_heads"]), d_ff=int(conf["intermediate_size"]),
        max_seq_len=int(conf.get("max_position_embeddings", 512)), type_vocab_size=int(conf.get("type_vocab_size", 2)),
        num_classes=len(labels) if head in ("classify", "tag") else 0, head=head, nsp=nsp,
        dropout=float(conf.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(conf.get("attention_probs_dropout_prob", 0.0)),
        norm_eps=float(conf.get("layer_norm_eps", 1e-12)), pooling="mean" if head == "embed" else "cls", dtype=dtype, param_dtype=dtype,
        init_std=float(conf.get("initializer_range", 0.02)))


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _param_path(name: str) -> tuple | None:
    """Our path of one HF tensor name (already without `bert.`), or None for a name this importer does not know."""
    module, _, leaf = name.rpartition(".")
    ours_leaf = {"weight": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias"}.get(leaf)
    if module == "cls.predictions" and leaf == "bias":
        return ("mlm", "bias")
    if ours_leaf is None:
        return None
    if module.startswith("encoder.layer."):
        index, _, rest = module[len("encoder.layer."):].partition(".")
        inner = _LAYER.get(rest)
        if inner is None or not index.isdigit():
            return None
        base = ("layers", int(index), *inner)
    elif module in _TOP:
        base = _TOP[module]
    else:
        return None
    if base[-1] in ("word", "position", "token_type"):
        return (*base, "embedding") if leaf == "weight" else None
    if base[-1] in ("norm", "attn_norm", "mlp_norm"):
        return (*base, "scale" if leaf in ("weight", "gamma") else "bias")
    return (*base, ours_leaf)


def read_hf_bert(directory: str, dtype: str = "float32", head: str | None = None
                 ) -> tuple[EncoderConfig, dict[str, Any], str]:
    """(config, every tensor of the checkpoint under our paths, the source's name). Raises FileNotFoundError
    without config.json / safetensors, ValueError for an unsupported config or an unknown tensor (named)."""
    directory, conf, source = read_hf_config(directory, dtype)
    cfg = encoder_config_from_hf(conf, dtype, f"{source}/config.json", head)
    params: dict[str, Any] = {}
    unknown = []
    for name, value in _open_tensors(directory).items():
        name = name[len("bert."):] if name.startswith("bert.") else name
        if name.endswith(_SKIPPED):
            continue
        path = _param_path(name)
        if path is None:
            unknown.append(name)
            continue
        value = np.asarray(value, np.float32)
        _set(params, path, _cast(value.T if path[-1] == "kernel" else value, dtype))
    if unknown:
        raise ValueError(f"{source}: tensors this BERT importer does not know: {sorted(unknown)[:8]}")
    return cfg, params, source


def load_hf_bert(directory: str | os.PathLike, dtype: str = "float32", head: str | None = None) -> ImportedModel:
    """Reads a HF BERT directory into encoder params (numpy arrays of `dtype`) for the head of its architecture
    (or `head`), with its WordPiece tokenizer (None without vocab.txt / tokenizer.json).

    Raises:
        FileNotFoundError: no directory, config.json or safetensors file.
        ValueError: an unsupported model type or feature, or a missing / misshapen / unknown tensor (named).
    """
    from fastserve.core.state import abstract_model
    from fastserve.data.wordpiece import load_wordpiece

    cfg, tensors, source = read_hf_bert(os.fspath(directory), dtype, head)
    _, abstract, _ = abstract_model(cfg)
    params = _select(tensors, abstract)   # a BertModel's pooler is not part of the embed head
    check_params(params, cfg, source)
    directory = os.fspath(directory)
    tokenizer = None
    if any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "vocab.txt")):
        tokenizer = load_wordpiece(directory)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{source}: tokenizer has {tokenizer.vocab_size} pieces, the model only {cfg.vocab_size}")
    return ImportedModel(cfg, params, tokenizer, None)


def _select(tree: dict, like: dict) -> dict:
    """The entries of `tree` at the paths of `like` (what a model of `like`'s structure holds)."""
    return {k: _select(v, like[k]) if isinstance(v, dict) else v for k, v in tree.items() if k in like}


def sentence_max_len(directory: str) -> int:
    """The input length a sentence-transformers model was trained to embed (`sentence_bert_config.json`'s
    max_seq_length), or 0 when the directory does not say."""
    path = os.path.join(directory, "sentence_bert_config.json")
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return int(json.load(f).get("max_seq_length") or 0)


__all__ = ["encoder_config_from_hf", "load_hf_bert", "read_hf_bert", "sentence_max_len"]
