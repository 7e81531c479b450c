"""A loaded `forward` export (encoders, classifiers, CNNs): `forward(inputs, **named)` on the export's weights,
without the model code (imports neither flax nor fastserve's models)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


class ExportedForward:
    """`forward_*` functions of an export bound to its weights on one device. `inputs` (manifest) names what one
    call takes: the first is positional (tokens or images), the rest by name (e.g. `mask`).

    An export of token sequences has length `buckets`: a call runs at the shortest bucket that holds every row's
    last unmasked token (inputs are cut or zero-padded to it; what is cut is masked out), and per-token outputs
    come back at the caller's length, zeros where the bucket did not reach."""

    def __init__(self, directory: str, manifest: dict[str, Any], platform: str, device: jax.Device,
                 params: list[jax.Array], exported: dict[str, jax.export.Exported], tokenizer: Any):
        self.directory, self.manifest, self.platform, self.device = directory, manifest, platform, device
        self.params, self.exported, self.tokenizer = params, exported, tokenizer
        self.inputs = manifest["inputs"]
        self.buckets: list[int] | None = manifest.get("buckets")
        self._calls: dict[str, Any] = {}

    @property
    def functions(self) -> list[str]:
        return sorted(self.exported)

    def _pick(self, n: int, bucket: int | None) -> tuple[str, int]:
        """(function, batch it runs at) for `bucket`: the symbolic batch, else the smallest fixed batch ≥ n."""
        options = [(name, fn["batch"]) for name, fn in self.manifest["functions"].items()
                   if fn.get("bucket") == bucket]
        for name, b in options:
            if isinstance(b, str):
                return name, n
        fitting = sorted((b, name) for name, b in options if b >= n)
        if not fitting:
            raise ValueError(f"forward: {n} rows is more than the largest exported batch "
                             f"({max(b for _, b in options)}); call it in chunks")
        return fitting[0][1], fitting[0][0]

    def _bucket(self, named: dict[str, np.ndarray], length: int) -> int | None:
        """The shortest bucket holding every row's last unmasked position (None: the export has no buckets)."""
        if not self.buckets:
            return None
        mask = named.get("mask")
        used = length if mask is None else int(np.max(np.nonzero(mask.any(axis=0))[0], initial=-1)) + 1
        fitting = [t for t in self.buckets if t >= used]
        if not fitting:
            raise ValueError(f"forward: a row has {used} tokens; this export's longest sequence is "
                             f"{self.buckets[-1]} (model.max_seq_len)")
        return fitting[0]

    def forward(self, inputs: Any, **named: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        """The model's outputs for one batch (e.g. class logits [B, C], or a tuple of arrays for a model with
        several outputs); inputs as `manifest["inputs"]` lists."""
        names = list(self.inputs)
        missing = [k for k in names[1:] if k not in named]
        unknown = [k for k in named if k not in names]
        if missing or unknown:
            raise ValueError(f"forward takes {names[0]} and {names[1:]}: missing {missing}, unknown {unknown}")
        args = [np.asarray(inputs, self.inputs[names[0]]["dtype"])]
        args += [np.asarray(named[k], self.inputs[k]["dtype"]) for k in names[1:]]
        for k, a in zip(names, args):
            want = self.inputs[k]["shape"][1:]
            fixed = [d for d in want if d.isdigit()]
            if a.ndim != len(want) + 1 or [str(d) for d in a.shape[1:] if str(d) in fixed] != fixed:
                raise ValueError(f"forward: {k} must have shape [B, {', '.join(want)}], got {list(a.shape)}")
        if self.buckets and len({a.shape[1] for a in args}) != 1:
            raise ValueError(f"forward: {', '.join(names)} must have the same length, got "
                             f"{[list(a.shape) for a in args]}")
        n, length = args[0].shape[0], (args[0].shape[1] if self.buckets else None)
        bucket = self._bucket(dict(zip(names, args)), length)
        if bucket is not None:   # cut (masked positions only) or zero-pad (mask False) the sequence axis
            args = [a[:, :bucket] if length >= bucket else np.pad(a, [(0, 0), (0, bucket - length)])
                    for a in args]
        name, batch = self._pick(n, bucket)
        if batch != n:  # pad to the exported batch with copies of the first row; their outputs are dropped
            args = [np.concatenate([a, np.repeat(a[:1], batch - n, axis=0)]) for a in args]
        fn = self._calls.get(name)
        if fn is None:
            fn = self._calls[name] = jax.jit(self.exported[name].call)
        with jax.default_device(self.device):
            out = fn(self.params, *[jax.device_put(a, self.device) for a in args])
        outs = [np.asarray(o)[:n] for o in (out if isinstance(out, (tuple, list)) else (out,))]
        if bucket is not None:
            per_token = self.manifest.get("per_token_outputs") or [False] * len(outs)
            outs = [_to_length(o, length) if p else o for o, p in zip(outs, per_token)]
        # several outputs (masked-LM + next-sentence logits): one array each
        return tuple(outs) if isinstance(out, (tuple, list)) else outs[0]

    __call__ = forward

    def __repr__(self) -> str:
        return f"ExportedForward({self.directory!r}, platform={self.platform!r}, functions={self.functions})"


def _to_length(out: np.ndarray, length: int) -> np.ndarray:
    """A per-token output [B, bucket, ...] at the caller's length: cut, or zero-filled past the bucket."""
    if out.shape[1] >= length:
        return out[:, :length]
    return np.pad(out, [(0, 0), (0, length - out.shape[1])] + [(0, 0)] * (out.ndim - 2))
