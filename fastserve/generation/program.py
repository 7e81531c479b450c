"""The one place a model becomes a jitted function: every caller (trainer samples, generate, compress, export,
serving) writes only what it does with the model; this wraps it so weights are jit *arguments* (never constants
baked into the program) and the module is rebuilt from them inside the trace, in eval mode."""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def bind(graphdef: nnx.GraphDef, variables: Any) -> nnx.Module:
    """The module for `variables` (a pure dict of params ∪ model state); use inside a traced function."""
    return nnx.merge(graphdef, variables)


def model_program(graphdef: nnx.GraphDef, fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit` of `(variables, *args) -> fn(model, *args)`; `jit_kwargs` (static_argnums counted on the
    wrapped signature, donate_argnums, shardings) go to `jax.jit` unchanged."""
    def program(variables, *args):
        return fn(bind(graphdef, variables), *args)
    return jax.jit(program, **jit_kwargs)
