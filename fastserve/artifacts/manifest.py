"""An export's on-disk format, read side: the manifest (checked, with the sha256 of every file it lists) and the
safetensors weights. Used by the loader and the writers; like the loader it never imports flax or the model code."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
import safetensors

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
EXPORTED_SUFFIX = ".jax_exported"
# numpy dtype name ↔ safetensors dtype tag (the raw safetensors API is used both ways: safetensors.numpy has no bf16).
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
_REQUIRED_KEYS = {  # by the export's capability
    "causal_lm": ("format_version", "platforms", "buckets", "functions", "params", "tokenizer", "files",
                  "max_new_tokens", "max_stop_tokens", "max_cache_len", "max_seq_len", "cache"),
    "forward": ("format_version", "platforms", "functions", "params", "files", "inputs"),
    "seq2seq": ("format_version", "platforms", "functions", "params", "files", "tokenizer", "buckets"),
}


class ExportIntegrityError(ValueError):
    """An export directory whose manifest or files are missing, unreadable or not the ones the manifest vouches for."""


class MissingExportFileError(ExportIntegrityError, FileNotFoundError):
    """A file the manifest lists (or the manifest itself) is not in the export directory."""


class UnsupportedPlatformError(ValueError):
    """The export holds no code for the platform asked for (or for this machine's default one)."""


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(np.bool_ if name == "bool" else getattr(jnp, name))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: str, verify: bool = True) -> dict[str, Any]:
    """Parses and checks `manifest.json`; with `verify`, every listed file must exist with its recorded sha256."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise MissingExportFileError(f"{path}: no {MANIFEST_FILE} (not an export directory, or an interrupted export)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportIntegrityError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ExportIntegrityError(f"{path}: the manifest must be a JSON object")
    missing = [k for k in _REQUIRED_KEYS.get(manifest.get("capability", "causal_lm"), ("capability",))
               if k not in manifest]
    if missing:
        raise ExportIntegrityError(f"{path}: manifest lacks {missing}")
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        raise ExportIntegrityError(f"{path}: format_version {version} is not supported by this loader "
                                   f"(it reads version {FORMAT_VERSION}); re-export or update fastserve")
    files = manifest["files"]
    referenced = [manifest["params"]["file"]] + ([manifest["tokenizer"]["file"]] if "tokenizer" in manifest else [])
    referenced += [fn["file"] for fn in manifest["functions"].values()]
    unlisted = [f for f in referenced if f not in files]
    if unlisted:
        raise ExportIntegrityError(f"{path}: files {unlisted} are used but have no sha256 in the manifest")
    for name, meta in files.items():
        fpath = os.path.join(directory, name)
        if os.path.basename(name) != name:
            raise ExportIntegrityError(f"{path}: file entry {name!r} is not a plain file name")
        if not os.path.isfile(fpath):
            raise MissingExportFileError(f"{fpath}: missing (listed in {MANIFEST_FILE})")
        if not verify:
            continue
        size = os.path.getsize(fpath)
        if "bytes" in meta and size != meta["bytes"]:
            raise ExportIntegrityError(f"{fpath}: {size} bytes, but the manifest records {meta['bytes']} "
                                       "(truncated or replaced)")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise ExportIntegrityError(f"{path}: no sha256 recorded for {name}")
        digest = sha256_file(fpath)
        if digest != meta["sha256"]:
            raise ExportIntegrityError(f"{fpath}: sha256 mismatch (file {digest[:16]}…, manifest "
                                       f"{meta['sha256'][:16]}…): the file was modified or corrupted")
    return manifest


def load_weights(path: str, names: Sequence[str], shapes: Sequence[Sequence[int]] | None = None,
                 dtypes: Sequence[str] | None = None) -> list[np.ndarray]:
    """The safetensors leaves in the order of `names` (checked against the manifest's shapes and dtypes)."""
    with open(path, "rb") as f:
        entries = dict(safetensors.deserialize(f.read()))
    tags = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    absent = [n for n in names if n not in entries]
    if absent:
        raise ExportIntegrityError(f"{path}: lacks parameters {absent[:8]} named in the manifest")
    out = []
    for i, name in enumerate(names):
        e = entries[name]
        if e["dtype"] not in tags:
            raise ExportIntegrityError(f"{path}: parameter {name} has unsupported dtype {e['dtype']}")
        arr = np.frombuffer(e["data"], dtype=_np_dtype(tags[e["dtype"]])).reshape(e["shape"])
        if shapes is not None and list(arr.shape) != list(shapes[i]):
            raise ExportIntegrityError(f"{path}: parameter {name} is {list(arr.shape)}, manifest says {shapes[i]}")
        if dtypes is not None and arr.dtype.name != dtypes[i]:
            raise ExportIntegrityError(f"{path}: parameter {name} is {arr.dtype}, manifest says {dtypes[i]}")
        out.append(arr)
    return out
