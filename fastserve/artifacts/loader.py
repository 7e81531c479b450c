"""Run an export made by `fastserve.export` without the model code: jax, numpy, safetensors and the tokenizer only.

    from fastserve.artifacts.loader import load_exported
    m = load_exported("exports/quickstart")            # verifies manifest.json and the sha256 of every file
    m.generate(["def fib(n):"], max_new_tokens=32)      # → one continuation (str) per prompt
    logits, cache = m.prefill(tokens, lengths)          # [B, T] right-padded ids, true lengths
    logits, cache = m.decode(next_tokens, lengths, cache)

This module must never import flax, fastserve.models or fastserve.core (a test enforces it in a fresh process).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from fastserve.artifacts.manifest import (  # noqa: F401  (the format's names, importable from here as before)
    EXPORTED_SUFFIX, FORMAT_VERSION, MANIFEST_FILE, SAFETENSORS_DTYPES, WEIGHTS_FILE, ExportIntegrityError,
    MissingExportFileError, UnsupportedPlatformError, load_weights, read_manifest, sha256_file)


def _resolve_platform(manifest: dict[str, Any], platform: str | None) -> str:
    available = list(manifest["platforms"])
    if platform is None:
        platform = jax.export.default_export_platform()
        if platform not in available:
            raise UnsupportedPlatformError(
                f"this export was made for platforms {available}, not for this machine's default platform "
                f"'{platform}'; pass platform= one of {available} (if such a device is present) or re-export "
                f"with --platforms including {platform}")
    platform = platform.lower()
    if platform == "gpu":
        platform = jax.export.default_export_platform() if jax.default_backend() == "gpu" else "cuda"
    if platform not in available:
        raise UnsupportedPlatformError(f"platform '{platform}' is not in this export; it was made for {available} "
                                       f"(re-export with --platforms including {platform})")
    return platform


def _device_for(platform: str) -> jax.Device:
    try:
        return jax.devices(platform)[0]
    except RuntimeError as e:
        raise UnsupportedPlatformError(f"the export has code for '{platform}' but this process has no "
                                       f"{platform} device ({str(e).splitlines()[0]})") from None


def _per_row(value: Any, n: int, dtype: Any, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full((n,), arr, dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected a scalar or {n} values (one per prompt), got shape {arr.shape}")
    return arr


class ExportedModel:
    """Serving functions of an export, bound to its weights on one device of `platform`."""

    def __init__(self, directory: str, manifest: dict[str, Any], platform: str, device: jax.Device,
                 params: list[jax.Array], exported: dict[str, jax.export.Exported], tokenizer: Any):
        self.directory, self.manifest, self.platform, self.device = directory, manifest, platform, device
        self.params = params
        self.exported = exported
        self.tokenizer = tokenizer
        tok = manifest["tokenizer"]
        self.bos_id, self.eos_id, self.pad_id = int(tok["bos_id"]), int(tok["eos_id"]), int(tok["pad_id"])
        self.add_bos = bool(tok.get("add_bos", self.bos_id >= 0))
        self.stop_ids = [int(i) for i in tok.get("stop_ids", [self.eos_id] if self.eos_id >= 0 else [])]
        self.chat_template = tok.get("chat_template")
        self.buckets = tuple(manifest["buckets"])
        self.max_new_tokens = int(manifest["max_new_tokens"])
        self.max_cache_len = int(manifest["max_cache_len"])
        self.max_seq_len = int(manifest["max_seq_len"])
        self._calls: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------- plumbing

    @property
    def functions(self) -> list[str]:
        return sorted(self.exported)

    def _pick(self, kind: str, n: int, bucket: int | None = None) -> tuple[str, int]:
        """(function name, batch it runs at) for `n` rows: the symbolic one, else the smallest fixed batch ≥ n."""
        fns = self.manifest["functions"]
        options = [(name, fn["batch"]) for name, fn in fns.items()
                   if fn["kind"] == kind and fn.get("bucket") == bucket]
        if not options:
            what = f"{kind} for bucket {bucket}" if bucket is not None else kind
            raise ValueError(f"this export has no {what} function (functions: {self.functions})")
        for name, b in options:
            if isinstance(b, str):
                return name, n
        fitting = sorted((b, name) for name, b in options if b >= n)
        if not fitting:  # more rows than the largest size: the caller runs chunks of it (generate) or refuses
            b, name = max((b, name) for name, b in options)
            return name, b
        return fitting[0][1], fitting[0][0]

    def _sizes(self, kind: str) -> list[int]:
        return sorted({fn["batch"] for fn in self.manifest["functions"].values()
                       if fn["kind"] == kind and not isinstance(fn["batch"], str)})

    def _call(self, name: str, *args: Any) -> Any:
        fn = self._calls.get(name)
        if fn is None:
            # decode consumes its cache (updated in place): the serving loop never holds two copies
            donate = (3,) if self.manifest["functions"][name]["kind"] == "decode" else ()
            fn = self._calls[name] = jax.jit(self.exported[name].call, donate_argnums=donate)
        # Arrays already on the device (the decode cache: 2 per layer) pass straight through; per-leaf device_put
        # calls would cost ~10 µs each on every decode step.
        put = lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, self.device)
        with jax.default_device(self.device):
            return fn(self.params, *jax.tree.map(put, args))

    def _bucket_for(self, length: int) -> int:
        fitting = [b for b in self.buckets if b >= length]
        if not fitting:
            raise ValueError(f"a prompt of {length} tokens is longer than the largest exported bucket "
                             f"({max(self.buckets)})")
        return fitting[0]

    # -------------------------------------------------------------------------------------------- steps

    def cache_spec(self, batch: int = 1) -> Any:
        """The decode function's cache argument at `batch` rows (a pytree of ShapeDtypeStructs [batch,
        max_cache_len, ...]: for the decoder a list per layer of {"k", "v"}; for an ensemble a tuple of its
        members' caches), read from the exported decode's own argument tree."""
        names = [n for n, fn in self.manifest["functions"].items() if fn["kind"] == "decode"]
        if not names:
            raise ValueError(f"this export has no decode function (functions: {self.functions}): no KV cache to make")
        exp = self.exported[names[0]]
        args, _ = jax.tree.unflatten(exp.in_tree, exp.in_avals)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype), args[3])

    def init_cache(self, batch: int) -> Any:
        """A zeroed KV cache in the decode layout (`cache_spec`: for the decoder a list per layer of {"k", "v"}
        [batch, max_cache_len, K, D]), on the export's device."""
        return jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), self.device), self.cache_spec(batch))

    def prefill(self, tokens: Any, lengths: Any) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """Right-padded prompts [B, T] (padded here to the smallest bucket ≥ T) → (last logits [B, V], KV cache)."""
        tokens = np.asarray(tokens, np.int32)
        lengths = np.asarray(lengths, np.int32)
        if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
            raise ValueError(f"prefill: tokens must be [B, T] and lengths [B], got {tokens.shape} and {lengths.shape}")
        if np.any(lengths < 1) or np.any(lengths > tokens.shape[1]):
            raise ValueError(f"prefill: every length must be in [1, {tokens.shape[1]}], got {lengths.tolist()}")
        bucket = self._bucket_for(tokens.shape[1])
        name, batch = self._pick("prefill", tokens.shape[0], bucket)
        if batch != tokens.shape[0]:
            raise ValueError(f"prefill: batch {tokens.shape[0]} is not an exported batch size "
                             f"({self._sizes('prefill')}); pad the rows yourself so the cache matches decode")
        padded = np.full((tokens.shape[0], bucket), max(self.pad_id, 0), np.int32)
        padded[:, :tokens.shape[1]] = tokens
        return self._call(name, padded, lengths)

    def decode(self, tokens: Any, positions: Any, cache: Any) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """One token per row at its position → (next logits [B, V], updated cache). The cache passed in is
        donated (updated in place, then unusable): keep only the returned one."""
        tokens = np.asarray(tokens, np.int32)
        positions = np.asarray(positions, np.int32)
        if tokens.ndim != 1 or positions.shape != tokens.shape:
            raise ValueError(f"decode: tokens and positions must both be [B], got {tokens.shape}, {positions.shape}")
        if np.any(positions < 0) or np.any(positions >= self.max_cache_len):
            raise ValueError(f"decode: positions must be in [0, {self.max_cache_len}) (the cache length), "
                             f"got {positions.tolist()}")
        name, batch = self._pick("decode", tokens.shape[0])
        if batch != tokens.shape[0]:
            raise ValueError(f"decode: batch {tokens.shape[0]} is not an exported batch size "
                             f"({self._sizes('decode')})")
        return self._call(name, tokens, positions, cache)

    # ---------------------------------------------------------------------------------------- generation

    def generate_tokens(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | None = None,
                        temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0, seed: int = 0,
                        stop_tokens: Sequence[int] | None = None) -> list[list[int]]:
        """Token-level generation: each prompt's new ids (a stop token, when hit, is included as the last one).

        temperature / top_k / top_p: a scalar or one value per prompt (0 → greedy; 0 → off; 1.0 → off).
        Rows stop at `max_new_tokens` (≤ the exported maximum) and never run past the model's context.
        """
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must have at least one token")
        n = len(prompts)
        max_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 0 <= max_new <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new}: this export generates at most {self.max_new_tokens} "
                             "(re-export with a larger --max-new-tokens)")
        stops = list(self.stop_ids) if stop_tokens is None else list(stop_tokens)
        s_max = int(self.manifest["max_stop_tokens"])
        if len(stops) > s_max:
            raise ValueError(f"{len(stops)} stop tokens given; this export takes at most {s_max}")
        stop_arr = np.array(stops + [-1] * (s_max - len(stops)), np.int32)
        temp = _per_row(temperature, n, np.float32, "temperature")
        k = _per_row(top_k, n, np.int32, "top_k")
        p = _per_row(top_p, n, np.float32, "top_p")
        bucket = self._bucket_for(max(len(x) for x in prompts))
        name, batch = self._pick("generate", n, bucket)
        if batch < n:  # fixed sizes smaller than the request: run in chunks of the largest one
            out: list[list[int]] = []
            for i in range(0, n, batch):
                out += self.generate_tokens(prompts[i:i + batch], max_new, temp[i:i + batch], k[i:i + batch],
                                            p[i:i + batch], seed + i, stops)
            return out
        rows = batch
        tokens = np.full((rows, bucket), max(self.pad_id, 0), np.int32)
        lengths = np.ones((rows,), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, :len(prompt)] = prompt
            lengths[i] = len(prompt)
        pad = lambda a, fill: np.concatenate([a, np.full((rows - n,), fill, a.dtype)])
        row_max = pad(np.full((n,), max_new, np.int32), 0)  # padding rows are done before they start
        out_tokens, counts = self._call(name, tokens, lengths, np.uint32(seed & 0xFFFFFFFF), pad(temp, 0.0),
                                        pad(k, 0), pad(p, 1.0), row_max, stop_arr)
        out_tokens, counts = np.asarray(out_tokens), np.asarray(counts)
        return [out_tokens[i, :counts[i]].tolist() for i in range(n)]

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None, temperature: Any = 0.0,
                 top_k: Any = 0, top_p: Any = 1.0, seed: int = 0, chat: bool = False) -> list[str]:
        """Continuations of `prompts` (tokenized, BOS-prefixed like training, padded to the smallest bucket);
        with `chat`, each prompt is a user message wrapped in the model's chat template."""
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts; wrap a single prompt in a list")
        ids = [self.encode(t, chat) for t in prompts]
        outs = self.generate_tokens(ids, max_new_tokens, temperature, top_k, top_p, seed)
        return [self.decode_text([t for t in o if t not in self.stop_ids]) for o in outs]

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Prompt ids as generate() feeds them: BOS first when the model was trained with one."""
        if chat:
            if not self.chat_template:
                raise ValueError("chat=True but this export has no chat template")
            return list(self.tokenizer.encode(self.tokenizer.apply_chat_template([{"role": "user", "content": text}])))
        ids = list(self.tokenizer.encode(text))
        return [self.bos_id] + ids if self.add_bos else ids

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return (f"ExportedModel({self.directory!r}, platform={self.platform!r}, buckets={list(self.buckets)}, "
                f"functions={self.functions})")


def load_exported(directory: str, platform: str | None = None, *, verify: bool = True) -> Any:
    """Loads an export made by `fastserve.export`, checking its manifest and (with `verify`) every file's sha256:
    an `ExportedModel` (causal LMs: prefill / decode / generate) or an `ExportedForward` (forward models).

    `platform`: "cpu", "cuda", "rocm" or "tpu" (default: this machine's default backend); it must be one the
    export was made for, and a device of it must be present.
    """
    directory = os.fspath(directory)
    manifest = read_manifest(directory, verify=verify)
    platform = _resolve_platform(manifest, platform)
    device = _device_for(platform)
    exported = {}
    for name, fn in manifest["functions"].items():
        path = os.path.join(directory, fn["file"])
        try:
            with open(path, "rb") as f:
                exp = jax.export.deserialize(bytearray(f.read()))
        except Exception as e:
            raise ExportIntegrityError(f"{path}: cannot be deserialized by jax {jax.__version__} (exported with jax "
                                       f"{manifest.get('jax_version')}): {type(e).__name__}: {e}") from None
        if platform not in exp.platforms:
            raise UnsupportedPlatformError(f"{path}: has code for {list(exp.platforms)}, not '{platform}'")
        shapes = [list(a.shape) for a in exp.in_avals[:len(manifest["params"]["names"])]]
        if shapes != [list(s) for s in manifest["params"]["shapes"]]:
            raise ExportIntegrityError(f"{path}: its weight arguments do not match manifest.params (an export "
                                       "directory mixing files of different exports?)")
        exported[name] = exp
    from fastserve.kernels.build import require_for_exports  # registers the int8 CPU kernel an export calls
    require_for_exports(exported, platform, directory)
    p = manifest["params"]
    weights = load_weights(os.path.join(directory, p["file"]), p["names"], p.get("shapes"), p.get("dtypes"))
    params = [jax.device_put(w, device) for w in weights]
    tok = manifest.get("tokenizer")
    tokenizer = load_tokenizer(os.path.join(directory, tok["file"]), tok.get("kind", "sentencepiece")) if tok else None
    if manifest.get("capability") == "seq2seq":  # encoder–decoders: fastserve/artifacts/seq2seq_runtime.py
        from fastserve.artifacts.seq2seq_runtime import ExportedTranslator
        source_tok = load_tokenizer(os.path.join(directory, tok["source_file"]), tok.get("kind", "sentencepiece"))
        return ExportedTranslator(directory, manifest, platform, device, params, exported, tokenizer, source_tok)
    if manifest.get("capability") == "forward":  # encoders, classifiers, CNNs
        from fastserve.artifacts.forward_runtime import ExportedForward
        return ExportedForward(directory, manifest, platform, device, params, exported, tokenizer)
    return ExportedModel(directory, manifest, platform, device, params, exported, tokenizer)


def load_tokenizer(path: str, kind: str) -> Any:
    """The export's tokenizer: sentencepiece (trained here) or the byte-level BPE of an imported model."""
    with open(path, "rb") as f:
        data = f.read()
    if kind == "sentencepiece":
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_proto=data)
    if kind == "fastserve-bpe":
        from fastserve.interop.tokenizer import BPETokenizer  # HF `tokenizers` only, no model code
        return BPETokenizer.from_json(data)
    if kind == "wordpiece":   # an imported BERT's vocabulary
        from fastserve.data.wordpiece import WordPieceTokenizer  # HF `tokenizers` only, no model code
        return WordPieceTokenizer.from_json(data.decode("utf-8"))
    raise ExportIntegrityError(f"{path}: unknown tokenizer kind '{kind}' (this loader knows sentencepiece, "
                               "fastserve-bpe, wordpiece)")


__all__ = ["ExportIntegrityError", "ExportedModel", "MissingExportFileError", "UnsupportedPlatformError",
           "load_exported", "read_manifest"]
