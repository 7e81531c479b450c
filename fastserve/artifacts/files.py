"""What every export writes besides its functions: the weights (safetensors, named by tree path), the tokenizer,
and the manifest (written last and atomically, with the sha256 of every file). Shared by the decoder / forward
writer (`writer.py`) and the seq2seq one (`seq2seq_export.py`)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Sequence

import jax
import numpy as np
import safetensors

from fastserve.artifacts.manifest import EXPORTED_SUFFIX, MANIFEST_FILE, SAFETENSORS_DTYPES, WEIGHTS_FILE, sha256_file
from fastserve.artifacts.options import ExportError


def param_names(params: Any) -> list[str]:
    """Dotted tree paths of the leaves, in `jax.tree.leaves` order: `layers.0.attn.q.kernel`."""
    return [jax.tree_util.keystr(path, simple=True, separator=".")
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def save_weights(path: str, names: Sequence[str], leaves: Sequence[Any]) -> None:
    """Writes the leaves as safetensors (bfloat16 and float8 included), keyed by their tree-path names."""
    arrays = {}
    for name, leaf in zip(names, leaves):
        arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        if arr.dtype.name not in SAFETENSORS_DTYPES:
            raise ExportError(f"parameter {name}: dtype {arr.dtype} cannot be stored in safetensors")
        arrays[name] = arr.astype(arr.dtype.newbyteorder("<"), copy=False)  # safetensors is little-endian
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8: raw pointers; `arrays` keeps the buffers alive
        specs = {name: safetensors.TensorSpec(dtype=a.dtype.name, shape=list(a.shape), data_ptr=a.ctypes.data,
                                              data_len=a.nbytes) for name, a in arrays.items()}
    else:  # older releases take the bytes themselves
        specs = {name: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}
                 for name, a in arrays.items()}
    blob = safetensors.serialize(specs, metadata={"format": "fastserve", "order": "manifest.params.names"})
    with open(path, "wb") as f:
        f.write(bytes(blob))


def check_params(params: Any, abstract: Any) -> None:
    """The parameters must have the model config's tree structure and shapes (dtypes may differ, e.g. bfloat16)."""
    got, want = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(abstract)
    if got != want:
        have, need = set(param_names(params)), set(param_names(abstract))
        raise ExportError(f"parameters do not match the model config: missing {sorted(need - have)[:8]}, "
                          f"unexpected {sorted(have - need)[:8]}")
    bad = [f"{n}: {tuple(p.shape)} (config wants {tuple(a.shape)})"
           for n, p, a in zip(param_names(abstract), jax.tree.leaves(params), jax.tree.leaves(abstract))
           if tuple(p.shape) != tuple(a.shape)]
    if bad:
        raise ExportError("parameter shapes do not match the model config: " + "; ".join(bad[:8]))


def params_entry(params: Any, leaves: list[Any]) -> dict[str, Any]:
    return {"file": WEIGHTS_FILE,
            "order": "every function takes the weights as its first argument: a list of arrays in this order",
            "names": param_names(params), "shapes": [list(map(int, x.shape)) for x in leaves],
            "dtypes": [str(np.dtype(x.dtype)) for x in leaves], "num_leaves": len(leaves),
            "num_parameters": int(sum(int(np.prod(x.shape)) for x in leaves))}


def prepare_dir(out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        os.unlink(manifest_path)  # an interrupted re-export must not leave the old manifest vouching for new files
    for stale in os.listdir(out_dir):  # functions of an earlier export into the same directory
        if stale.endswith(EXPORTED_SUFFIX):
            os.unlink(os.path.join(out_dir, stale))
    return manifest_path


def write_tokenizer(out_dir: str, tokenizer: Any) -> str:
    _, tok_file, tok_bytes = tokenizer.export_file()
    with open(os.path.join(out_dir, tok_file), "wb") as f:
        f.write(tok_bytes)
    return tok_file


def tokenizer_entry(tokenizer: Any, tok_file: str) -> dict[str, Any]:
    return {"file": tok_file, "kind": tokenizer.export_file()[0], "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "add_bos": bool(tokenizer.add_bos), "stop_ids": [int(i) for i in tokenizer.stop_ids],
            "chat_template": getattr(tokenizer, "chat_template", None)}


def finish(out_dir: str, manifest_path: str, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Hashes every file into the manifest and writes it last (atomically): a half-written export has none."""
    files = files + [fn["file"] for fn in manifest["functions"].values()]
    manifest["files"] = {f: {"sha256": sha256_file(os.path.join(out_dir, f)),
                             "bytes": os.path.getsize(os.path.join(out_dir, f))} for f in files}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def atomic_write_text(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a manifest is as readable as the files beside it
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
