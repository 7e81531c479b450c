"""An imported model's byte-level BPE read from a file, for training on it (`tokenizer.path`): a work dir's
`tokenizer.bpe.json` (written by fastserve.compress) or a llama.cpp GGUF file (its tokenizer only; no weights read).
Its own module: it needs both the tokenizer and the GGUF reader, and `interop.gguf` already imports the tokenizer."""
from __future__ import annotations

from fastserve.interop.gguf import read_metadata
from fastserve.interop.tokenizer import BPETokenizer


def load_bpe_tokenizer(path: str) -> BPETokenizer:
    """The byte-level BPE in `path` (a `.bpe.json` or a `.gguf`)."""
    if path.endswith(".gguf"):
        from gguf import GGUFReader

        return BPETokenizer.from_gguf_fields(read_metadata(GGUFReader(path)))
    with open(path, encoding="utf-8") as f:
        return BPETokenizer.from_json(f.read())


def is_bpe_path(path: str) -> bool:
    """Whether `tokenizer.path` names an imported byte-level BPE rather than a sentencepiece model."""
    return path.endswith((".bpe.json", ".gguf"))
