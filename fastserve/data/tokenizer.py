"""SentencePiece tokenizer: training, caching and a thin typed wrapper.

Every tokenizer (this one, `fastserve.data.wordpiece.WordPieceTokenizer`, the imported byte-level BPE) exposes the
same face: `vocab_size`, `encode(text)` (no special tokens added), `decode(ids)`, and the special ids `pad_id`,
`unk_id`, `bos_id`, `eos_id`, `cls_id`, `sep_id`, `mask_id` — each -1 when the vocabulary has no such piece.
Encoders want `[CLS]` / `[SEP]` / `[MASK]`: `specials="bert"` trains them in as user-defined pieces.

Training settings are chosen so that ``decode(encode(text)) == text`` for any
string: identity normalization (no NFKC, no whitespace collapsing), no dummy
prefix space, and byte fallback so characters never seen in training are
encoded as UTF-8 bytes instead of ``<unk>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

# Fixed special ids: pad=0 lets zero-filled padding be valid pad tokens.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_NUM_BYTE_PIECES = 256
MODEL_TYPES = ("bpe", "unigram", "char", "word")
# Training sentences are cut to about this many characters on line boundaries:
# small enough for the trainer's per-sentence work to stay cheap, large enough
# that pieces spanning newlines (".\n\n", "):\n") are learned.
_CHUNK_CHARS = 4096
# Bumped whenever training settings change, so cached tokenizers get retrained.
_TRAIN_VERSION = 1
# Extra pieces a tokenizer can be trained with (`tokenizer.specials`), each never split and never learned from text.
SPECIALS = {"": (), "bert": ("[CLS]", "[SEP]", "[MASK]")}


class Tokenizer:
    """A loaded SentencePiece model with typed accessors."""

    def __init__(self, processor: spm.SentencePieceProcessor):
        self._sp = processor
        # user-defined BERT specials decode as their text unless dropped, as control pieces (pad/bos/eos) are
        self._hidden = {i for i in (self.cls_id, self.sep_id, self.mask_id) if i >= 0}

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        """Load a ``.model`` file. Raises FileNotFoundError if it is missing."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path!r}")
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> Tokenizer:
        """Load a serialized SentencePiece ``ModelProto``."""
        return cls(spm.SentencePieceProcessor(model_proto=model_proto))

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    # SentencePiece reports -1 for a special token the model was trained
    # without; models from train_tokenizer always have all four.
    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id, or -1 if the model has none."""
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        """End-of-sequence id, or -1 if the model has none."""
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        """Padding id, or -1 if the model has none."""
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        """Unknown-piece id, or -1 if the model has none."""
        return int(self._sp.unk_id())

    def _piece_id(self, piece: str) -> int:
        i = int(self._sp.piece_to_id(piece))
        return i if self._sp.id_to_piece(i) == piece else -1   # an absent piece maps to unk

    @property
    def cls_id(self) -> int:
        """`[CLS]` (trained with specials="bert"), or -1."""
        return self._piece_id("[CLS]")

    @property
    def sep_id(self) -> int:
        """`[SEP]` (trained with specials="bert"), or -1."""
        return self._piece_id("[SEP]")

    @property
    def mask_id(self) -> int:
        """`[MASK]` (trained with specials="bert"), or -1."""
        return self._piece_id("[MASK]")

    @property
    def model_proto(self) -> bytes:
        """The serialized model, e.g. to embed in an export."""
        return self._sp.serialized_model_proto()

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: the end-of-sequence piece."""
        return [self.eos_id] if self.eos_id >= 0 else []

    @property
    def add_bos(self) -> bool:
        """Prompts start with BOS, as training packs every document as [bos] text [eos]."""
        return self.bos_id >= 0

    def export_file(self) -> tuple[str, str, bytes]:
        """(kind, file name, bytes) under which an export stores this tokenizer."""
        return "sentencepiece", "tokenizer.model", self.model_proto

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; SentencePiece encodes a list in parallel."""
        texts = list(texts)
        if not texts:
            return []
        return self._sp.encode(texts, num_threads=_num_threads())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens (pad/bos/eos, and [CLS]/[SEP]/[MASK]) decode to nothing."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids if int(i) not in self._hidden])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _num_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _training_chunks(texts: Iterable[str]) -> Iterator[str]:
    """Yield pieces of at most ~_CHUNK_CHARS characters, cut after a newline."""
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            # A single overlong line (minified code, a data dump) is sliced so
            # no training sentence grows without bound.
            for start in range(0, len(line), _CHUNK_CHARS):
                part = line[start : start + _CHUNK_CHARS]
                buf.append(part)
                size += len(part)
                if size >= _CHUNK_CHARS:
                    yield "".join(buf)
                    buf, size = [], 0
        if buf:
            yield "".join(buf)


def _atomic_write(path: str, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace.

    A killed process then leaves either the old file or the new one, never a
    truncated file that a later run would try to load.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: str, model_type: str = "bpe", specials: str = ""
) -> Tokenizer:
    """Train a SentencePiece model in memory and write it atomically to ``out_path``.

    Ids: pad=0, unk=1, bos=2, eos=3, then the ``specials`` pieces (``"bert"``:
    [CLS]=4, [SEP]=5, [MASK]=6), then 256 byte-fallback pieces, then the
    learned pieces. Digits are split into single characters (better arithmetic
    and no number-specific vocabulary bloat).

    Raises:
        ValueError: unknown ``model_type``, ``vocab_size`` too small for the
            special and byte pieces, no text, or SentencePiece rejecting the
            settings (e.g. a vocabulary larger than the corpus supports).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; valid types are {list(MODEL_TYPES)}")
    if specials not in SPECIALS:
        raise ValueError(f"unknown specials {specials!r}; valid: {[k for k in SPECIALS if k]} or empty")
    extra = SPECIALS[specials]
    min_vocab = 4 + len(extra) + _NUM_BYTE_PIECES + 1
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size must be at least {min_vocab} ({4 + len(extra)} special + 256 byte pieces + 1), "
            f"got {vocab_size}"
        )
    chunks = [c for c in _training_chunks(texts) if c]
    if not chunks:
        raise ValueError("cannot train a tokenizer on empty text")
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # Without the dummy prefix, decoding never strips a leading space,
            # so decode(ids[:k]) + decode(ids[k:]) == decode(ids): streamed
            # generation can print pieces as they come without losing spaces.
            add_dummy_prefix=False,
            byte_fallback=True,
            # Let runs of spaces (code indentation) become single pieces.
            allow_whitespace_only_pieces=True,
            split_digits=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=list(extra),
            max_sentence_length=1 << 24,
            num_threads=_num_threads(),
            minloglevel=2,  # keep training quiet; errors still raise
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece training failed (vocab_size={vocab_size}, model_type={model_type!r}): {e}"
        ) from e
    proto = writer.getvalue()
    _atomic_write(out_path, proto)
    return Tokenizer.from_bytes(proto)


def _fingerprint(texts: Sequence[str], vocab_size: int, model_type: str, specials: str = "") -> str:
    """sha256 over the training inputs and settings that determine the model."""
    h = hashlib.sha256()
    settings = {"v": _TRAIN_VERSION, "vocab_size": vocab_size, "model_type": model_type}
    if specials:  # only when set: tokenizers cached before `specials` existed keep their digest
        settings["specials"] = specials
    h.update(json.dumps(settings).encode())
    for text in texts:
        data = text.encode("utf-8")
        # Length prefix: ["ab", "c"] and ["a", "bc"] must hash differently.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class TokenizerMismatch(ValueError):
    """The work dir's tokenizer was trained on other inputs, and a model trained with it is saved there."""


def load_or_train_tokenizer(
    path: str, texts: list[str], vocab_size: int, model_type: str, workdir: str, trained: bool = False,
    specials: str = "",
) -> Tokenizer:
    """Return the tokenizer at ``path``, or a cached/trained one in ``workdir``.

    With an empty ``path`` the model lives at ``workdir/tokenizer.model`` next
    to ``workdir/tokenizer.json``, which records a sha256 of (texts,
    vocab_size, model_type). A matching record means the cached model is
    reused; anything else (no record, other corpus or settings, unreadable
    files) retrains and overwrites both — unless ``trained`` (the work dir
    holds checkpoints of a model that reads this tokenizer): then the
    mismatch is an error, never a silent retrain under a trained model.

    Raises:
        FileNotFoundError: ``path`` given but missing.
        TokenizerMismatch: ``trained`` and the cached tokenizer's record does
            not match (it names what differs).
    """
    if path:
        from fastserve.interop.bpe_files import is_bpe_path, load_bpe_tokenizer

        # an imported model's byte-level BPE (a compressed work dir's tokenizer.bpe.json, a GGUF file): fine-tuning
        # an imported model reads its own vocabulary
        return load_bpe_tokenizer(path) if is_bpe_path(path) else Tokenizer.from_file(path)
    model_path = os.path.join(workdir, "tokenizer.model")
    meta_path = os.path.join(workdir, "tokenizer.json")
    digest = _fingerprint(texts, vocab_size, model_type, specials)
    meta: dict = {}
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("sha256") == digest:
            return Tokenizer.from_file(model_path)
    except (OSError, ValueError, RuntimeError):
        pass  # no cache or a broken one: fall through and retrain
    if trained and os.path.exists(model_path):
        was = {k: meta.get(k, "" if k == "specials" else None) for k in ("vocab_size", "model_type", "specials",
                                                                          "num_texts")}
        now = {"vocab_size": vocab_size, "model_type": model_type, "specials": specials, "num_texts": len(texts)}
        differs = [f"{k} {was[k]} → {now[k]}" for k in now if was[k] != now[k]] or ["the training texts' content"]
        raise TokenizerMismatch(
            f"{workdir} holds a model trained with its tokenizer.model, but this config would train another one "
            f"({', '.join(differs)}). Use a new train.workdir, restore the tokenizer / data settings it was "
            f"trained with, or point tokenizer.path at {model_path} to keep it.")
    # Drop the old record before touching the model: a crash after the new
    # model is written but before its record must not leave the old record
    # vouching for the new model.
    if os.path.exists(meta_path):
        os.unlink(meta_path)
    tokenizer = train_tokenizer(texts, vocab_size, model_path, model_type, specials)
    meta = {
        "sha256": digest,
        "vocab_size": vocab_size,
        "model_type": model_type,
        "specials": specials,
        "num_texts": len(texts),
    }
    _atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return tokenizer
