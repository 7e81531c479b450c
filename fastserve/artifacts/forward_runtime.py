"""A loaded `forward` export (encoders, classifiers, CNNs): `forward(inputs, **named)` on the export's weights,
without the model code (imports neither flax nor fastserve's models)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


class ExportedForward:
    """`forward_*` functions of an export bound to its weights on one device. `inputs` (manifest) names what one
    call takes: the first is positional (tokens or images), the rest by name (e.g. `mask`)."""

    def __init__(self, directory: str, manifest: dict[str, Any], platform: str, device: jax.Device,
                 params: list[jax.Array], exported: dict[str, jax.export.Exported], tokenizer: Any):
        self.directory, self.manifest, self.platform, self.device = directory, manifest, platform, device
        self.params, self.exported, self.tokenizer = params, exported, tokenizer
        self.inputs = manifest["inputs"]
        self._calls: dict[str, Any] = {}

    @property
    def functions(self) -> list[str]:
        return sorted(self.exported)

    def _pick(self, n: int) -> tuple[str, int]:
        """(function, batch it runs at): the symbolic one, else the smallest fixed batch ≥ n."""
        options = [(name, fn["batch"]) for name, fn in self.manifest["functions"].items()]
        for name, b in options:
            if isinstance(b, str):
                return name, n
        fitting = sorted((b, name) for name, b in options if b >= n)
        if not fitting:
            raise ValueError(f"forward: {n} rows is more than the largest exported batch "
                             f"({max(b for _, b in options)}); call it in chunks")
        return fitting[0][1], fitting[0][0]

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
        n = args[0].shape[0]
        name, batch = self._pick(n)
        if batch != n:  # pad to the exported batch with copies of the first row; their outputs are dropped
            args = [np.concatenate([a, np.repeat(a[:1], batch - n, axis=0)]) for a in args]
        fn = self._calls.get(name)
        if fn is None:
            fn = self._calls[name] = jax.jit(self.exported[name].call)
        with jax.default_device(self.device):
            out = fn(self.params, *[jax.device_put(a, self.device) for a in args])
        if isinstance(out, (tuple, list)):   # several outputs (masked-LM + next-sentence logits): one array each
            return tuple(np.asarray(o)[:n] for o in out)
        return np.asarray(out)[:n]

    __call__ = forward

    def __repr__(self) -> str:
        return f"ExportedForward({self.directory!r}, platform={self.platform!r}, functions={self.functions})"
