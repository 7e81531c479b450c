"""`Sequential.summary()`: Keras's table of layers, output shapes and parameter counts."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class ModelSummary:
    """What `summary()` printed, as data: one row per layer and the totals."""
    rows: list[tuple[str, str, tuple, int]]   # (name, Keras class, output shape with None batch, params)
    total: int
    trainable: int
    non_trainable: int
    text: str

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"ModelSummary(total={self.total:,}, trainable={self.trainable:,}, layers={len(self.rows)})"


def summarize(name: str, plan: list, print_fn: Callable[[str], Any] | None = print) -> ModelSummary:
    """Prints (with `print_fn`; None: silent) and returns Keras's table: layer (type), output shape, params."""
    rows = [(p.name, p.spec.keras_name, (None, *p.output_shape), p.trainable + p.non_trainable) for p in plan]
    trainable = sum(p.trainable for p in plan)
    fixed = sum(p.non_trainable for p in plan)
    widths = (34, 26, 12)
    line = lambda a, b, c: f" {a:<{widths[0] - 1}}{b:<{widths[1]}}{c:>{widths[2]}}"
    rule = "_" * sum(widths)
    out = [f'Model: "{name}"', rule, line("Layer (type)", "Output Shape", "Param #"), "=" * sum(widths)]
    for i, (layer, kind, shape, n) in enumerate(rows):
        out.append(line(f"{layer} ({kind})", str(shape).replace(",)", ")"), f"{n:,}"))
        out.append(rule if i == len(rows) - 1 else "")
    out[-1:] = ["=" * sum(widths)]
    out += [f"Total params: {trainable + fixed:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {fixed:,}", rule]
    text = "\n".join(out)
    if print_fn is not None:
        print_fn(text)
    return ModelSummary(rows, trainable + fixed, trainable, fixed, text)
