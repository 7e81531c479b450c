"""Importers of pretrained weights from other ecosystems into fastserve params (pure nested dicts).

- `load_gguf(path, dtype)`: a llama.cpp GGUF file of the Llama architecture (any quantization gguf can dequantize).
- `load_hf_llama(directory, dtype)`: a HF transformers Llama directory (config.json + *.safetensors + tokenizer.json).
- `load_hf_bert(directory, dtype)`: a HF BERT directory (config.json + *.safetensors + vocab.txt) into the encoder
  family (`read_hf_bert`: every tensor, for `train.init_from`).
All three return an `ImportedModel(model_cfg, params, tokenizer, chat_template)`.

Names resolve lazily: `fastserve.interop.tokenizer` alone (used by exported models) must not pull in the model code.
"""
from importlib import import_module
from typing import Any

_WHERE = {"ImportedModel": "gguf", "load_gguf": "gguf", "unpermute_qk": "gguf", "load_hf_llama": "safetensors_llama",
          "BPETokenizer": "tokenizer", "load_hf_bert": "hf_bert", "read_hf_bert": "hf_bert"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fastserve.interop' has no attribute '{name}'")
    return getattr(import_module(f"fastserve.interop.{_WHERE[name]}"), name)
