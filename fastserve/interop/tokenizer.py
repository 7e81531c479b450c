"""Byte-level BPE tokenizers of imported models (GGUF metadata or a HF `tokenizer.json`), on HF `tokenizers`.

`BPETokenizer` has the interface of `fastserve.data.Tokenizer` (encode / decode / vocab_size / bos_id / eos_id /
pad_id), plus what chat models need: `apply_chat_template`, `stop_ids` and `add_bos`, and `to_json` / `from_json`
so that an export can embed the whole tokenizer as one string.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

_FORMAT = "fastserve.bpe_tokenizer/1"

# GGUF token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4

# End-of-turn markers of common chat formats: generation stops on any of them that the vocabulary has.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "</s>")

# Pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` names (src/llama-vocab.cpp) that this importer supports.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str) -> Any:
    """The HF pre-tokenizer equivalent to a GGUF `tokenizer.ggml.pre` value."""
    if pre in ("smollm", "starcoder", "refact"):
        # Every digit on its own, then GPT-2's byte-level regex split (the StarCoder / SmolLM tokenizer.json).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("gpt-2", "gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre='{pre}' "
                     "(supported: smollm, starcoder, refact, gpt-2, default, llama-bpe)")


class BPETokenizer:
    """A HF `tokenizers.Tokenizer` with the special ids and the chat template of the model it came with."""

    def __init__(self, tokenizer: HFTokenizer, *, bos_id: int = -1, eos_id: int = -1, pad_id: int = -1,
                 chat_template: str | None = None, add_bos: bool = False, stop_ids: Sequence[int] | None = None):
        self._tok = tokenizer
        self._bos, self._eos, self._pad = int(bos_id), int(eos_id), int(pad_id)
        self.chat_template = chat_template or None
        self.add_bos = bool(add_bos)      # whether the model expects BOS in front of a plain (non-chat) prompt
        if stop_ids is None:
            vocab = tokenizer.get_vocab(with_added_tokens=True)
            stop_ids = [self._eos] if self._eos >= 0 else []
            stop_ids += [vocab[t] for t in _END_OF_TURN if t in vocab and vocab[t] not in stop_ids]
        self.stop_ids = [int(i) for i in stop_ids]

    # ------------------------------------------------------------------------------------- construction

    @classmethod
    def from_gguf_fields(cls, meta: dict[str, Any]) -> BPETokenizer:
        """From GGUF `tokenizer.*` metadata (values already decoded to Python: strings, ints, lists)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer tokenizer.ggml.model='{kind}' (only 'gpt2' byte-level BPE)")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in meta:
                raise ValueError(f"GGUF metadata has no '{key}': cannot build the tokenizer")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF tokenizer.ggml.tokens has duplicate entries")
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"GGUF tokenizer.ggml.merges has malformed entries, e.g. {bad[0]!r}")
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|> …) are matched whole in the input text and skipped when decoding.
        special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
        tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

        def special_id(name: str) -> int:
            value = meta.get(f"tokenizer.ggml.{name}_token_id")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else -1

        return cls(tok, bos_id=special_id("bos"), eos_id=special_id("eos"), pad_id=special_id("padding"),
                   chat_template=meta.get("tokenizer.chat_template"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_dir(cls, directory: str) -> BPETokenizer | None:
        """From a HF model directory: tokenizer.json (+ tokenizer_config.json, generation_config.json); None if
        the directory has no tokenizer.json."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        tok = HFTokenizer.from_file(path)
        conf = _read_json(os.path.join(directory, "tokenizer_config.json"))
        gen = _read_json(os.path.join(directory, "generation_config.json"))
        model_conf = _read_json(os.path.join(directory, "config.json"))

        def token_id(name: str) -> int:
            value = conf.get(name)
            if isinstance(value, dict):          # {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                found = tok.token_to_id(value)
                if found is not None:
                    return int(found)
            for source in (gen, model_conf):     # ids given directly
                raw = source.get(f"{name}_id")
                raw = raw[0] if isinstance(raw, list) and raw else raw
                if isinstance(raw, int):
                    return raw
            return -1

        eos = token_id("eos_token")
        stop = None
        gen_eos = gen.get("eos_token_id")
        if isinstance(gen_eos, list):
            stop = [int(i) for i in gen_eos]
        elif isinstance(gen_eos, int):
            stop = sorted({gen_eos, eos} - {-1})
        template = conf.get("chat_template")
        if isinstance(template, list):           # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and os.path.isfile(os.path.join(directory, "chat_template.jinja")):
            with open(os.path.join(directory, "chat_template.jinja"), encoding="utf-8") as f:
                template = f.read()
        return cls(tok, bos_id=token_id("bos_token"), eos_id=eos, pad_id=token_id("pad_token"),
                   chat_template=template, add_bos=bool(conf.get("add_bos_token", False)), stop_ids=stop)

    # ---------------------------------------------------------------------------- the Tokenizer interface

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id, or -1 if the model has none."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """End-of-sequence id, or -1 if the model has none."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """Padding id, or -1 if the model has none."""
        return self._pad

    # byte-level BPE has no unknown piece and no BERT specials (the face every fastserve tokenizer shares)
    unk_id = cls_id = sep_id = mask_id = -1

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids.
        Nothing is added (no BOS/EOS)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special (control) tokens decode to nothing unless `skip_special_tokens=False`."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ------------------------------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}]) with the model's Jinja chat template, as HF
        transformers does (sandboxed, trim_blocks, lstrip_blocks; bos_token / eos_token available)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:  # pragma: no cover - jinja2 is a declared dependency
            raise ImportError("apply_chat_template needs jinja2 (pip install 'jinja2>=3.1')") from e

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        tok = self._tok

        def name(i: int) -> str:
            return (tok.id_to_token(i) or "") if i >= 0 else ""

        context = {"bos_token": name(self._bos), "eos_token": name(self._eos), "pad_token": name(self._pad), **kwargs}
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **context)

    # ----------------------------------------------------------------------------------- serialization

    def to_json(self) -> str:
        """The whole tokenizer (HF tokenizer.json, special ids, chat template) as one JSON string."""
        return json.dumps({"format": _FORMAT, "tokenizer": json.loads(self._tok.to_str()), "bos_id": self._bos,
                           "eos_id": self._eos, "pad_id": self._pad, "add_bos": self.add_bos,
                           "stop_ids": self.stop_ids, "chat_template": self.chat_template}, ensure_ascii=False)

    def export_file(self) -> tuple[str, str, bytes]:
        """(kind, file name, bytes) under which an export stores this tokenizer."""
        return "fastserve-bpe", "tokenizer.json", self.to_json().encode("utf-8")

    @classmethod
    def from_json(cls, text: str | bytes) -> BPETokenizer:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a serialized BPETokenizer (expected format '{_FORMAT}')")
        tok = HFTokenizer.from_str(json.dumps(data["tokenizer"]))
        return cls(tok, bos_id=data["bos_id"], eos_id=data["eos_id"], pad_id=data["pad_id"],
                   chat_template=data.get("chat_template"), add_bos=data.get("add_bos", False),
                   stop_ids=data.get("stop_ids"))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos}, pad={self._pad})"


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}
