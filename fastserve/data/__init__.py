"""Data layer: corpora, tokenizer and language-model batches."""

from fastserve.data.corpus import load_texts, split_documents
from fastserve.data.lm import LMBatches, eval_batches, pack_documents
from fastserve.data.tokenizer import Tokenizer, load_or_train_tokenizer, train_tokenizer

__all__ = [
    "LMBatches",
    "Tokenizer",
    "eval_batches",
    "load_or_train_tokenizer",
    "load_texts",
    "pack_documents",
    "split_documents",
    "train_tokenizer",
]
