"""Keras-style optimizers for `compile(optimizer=...)`: a name (`"adam"`) or `Adam(learning_rate=...)`, with
Keras's defaults (constant learning rate, no clipping, eps 1e-7, Adam's b2 0.999). adam, adamw, sgd, lion and
adafactor are fastserve's own optimizers (`fastserve.core.optim`, an `optimizer:` config section, so a saved model
trains on with `python -m fastserve.train`); rmsprop, adagrad and adamax are optax's; nadam is Keras's own
(`scale_by_keras_nadam`). Any optax `GradientTransformation` is accepted by `compile` as is. Every named optimizer
takes Keras's steps (a test against Keras's own optimizers, gradients from 1e-7 to 10).

Adam and AdamW take Keras's update, not optax's: Keras adds epsilon to √v before the bias correction (the Adam paper's
"epsilon hat"), so early steps of parameters with tiny gradients are damped (step 1: by ε/√(1−β₂) ≈ 3e-6 rather than
1e-7). optax's form moved up to ~0.7 of a full step apart from Keras's on bench_vision's CNN after one step and
trained its first epochs measurably faster; the state is optax's, so a saved model trains on under `optimizer: adam`
(or `adamw`, which under a config decays matrices only, where Keras's AdamW decays every variable)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fastserve.checks import near

# name → Keras's defaults
DEFAULTS: dict[str, dict[str, float]] = {
    "adam": {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
    "adamw": {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "weight_decay": 0.004},
    "sgd": {"learning_rate": 1e-2, "momentum": 0.0},
    "lion": {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.99, "weight_decay": 0.0},
    "adafactor": {"learning_rate": 1e-3},
    "rmsprop": {"learning_rate": 1e-3, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7},
    "adagrad": {"learning_rate": 1e-3, "initial_accumulator_value": 0.1, "epsilon": 1e-7},
    "adamax": {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
    "nadam": {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
}
CORE = ("adam", "adamw", "sgd", "lion", "adafactor")   # built by fastserve.core.optim.make_optimizer


@dataclass
class Optimizer:
    name: str
    options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.name = self.name.lower()
        if self.name not in DEFAULTS:
            raise ValueError(f"unknown optimizer '{self.name}'{near(self.name, list(DEFAULTS))} (choose from "
                             f"{', '.join(DEFAULTS)}, or pass an optax GradientTransformation)")
        bad = [k for k in self.options if k not in DEFAULTS[self.name]]
        if bad:
            raise ValueError(f"optimizer {self.name}: unknown option {bad[0]!r} (valid: "
                             f"{', '.join(DEFAULTS[self.name])})")
        self.options = {**DEFAULTS[self.name], **self.options}

    def optimizer_config(self) -> Any:
        """The `optimizer:` config section (fastserve's optimizers only)."""
        from fastserve.config import OptimizerConfig
        o = self.options
        return OptimizerConfig(name=self.name, learning_rate=o["learning_rate"], schedule="constant", warmup_steps=0,
                               weight_decay=o.get("weight_decay", 0.0), b1=o.get("beta_1", 0.9),
                               b2=o.get("beta_2", 0.999), eps=o.get("epsilon", 1e-7), momentum=o.get("momentum", 0.0),
                               clip_norm=0.0)

    def build(self, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
        if self.name in ("adam", "adamw"):   # optax.adam(w)'s chain and state, with Keras's epsilon
            from fastserve.core.optim import make_schedule
            o, schedule = self.options, make_schedule(self.optimizer_config(), total_steps)
            parts = [scale_by_keras_adam(o["beta_1"], o["beta_2"], o["epsilon"])]
            if self.name == "adamw":   # Keras decays every trainable variable (biases and norms too)
                parts.append(optax.add_decayed_weights(o["weight_decay"], mask=lambda p: jax.tree.map(lambda _: True, p)))
            return optax.chain(*parts, optax.scale_by_learning_rate(schedule)), schedule
        if self.name in CORE:
            from fastserve.core.optim import make_optimizer
            return make_optimizer(self.optimizer_config(), total_steps)
        o, lr = self.options, self.options["learning_rate"]
        if self.name == "rmsprop":
            tx = optax.rmsprop(lr, decay=o["rho"], eps=o["epsilon"], momentum=o["momentum"] or None)
        elif self.name == "adagrad":
            tx = optax.adagrad(lr, initial_accumulator_value=o["initial_accumulator_value"], eps=o["epsilon"])
        elif self.name == "adamax":
            tx = optax.adamax(lr, b1=o["beta_1"], b2=o["beta_2"], eps=o["epsilon"])
        else:
            tx = optax.chain(scale_by_keras_nadam(o["beta_1"], o["beta_2"], o["epsilon"]), optax.scale(-lr))
        return tx, optax.constant_schedule(lr)


def scale_by_keras_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Keras's Adam direction: √(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε) (optax's: m̂ / (√v̂ + ε)), in optax's
    ScaleByAdamState."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(updates, state, params=None):
        mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        correction = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        direction = jax.tree.map(lambda m, v: (correction * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


class ScaleByKerasNadamState(NamedTuple):
    count: jax.Array
    u_product: jax.Array   # the product of the momentum schedule's factors so far
    mu: Any
    nu: Any


def scale_by_keras_nadam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Keras 3's Nadam direction (Dozat's, with the momentum schedule uₜ = β₁(1 − ½·0.96ᵗ)); optax.nadam has no
    schedule, and its steps differed from Keras's by 40-170 % over six steps (measured)."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return ScaleByKerasNadamState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.float32), zeros(), zeros())

    def update(updates, state, params=None):
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        u_t, u_next = b1 * (1 - 0.5 * 0.96 ** t), b1 * (1 - 0.5 * 0.96 ** (t + 1))
        u_product = state.u_product * u_t
        mu = jax.tree.map(lambda g, m: m + (g - m) * (1 - b1), updates, state.mu)
        nu = jax.tree.map(lambda g, v: v + (jnp.square(g) - v) * (1 - b2), updates, state.nu)

        def direction(g, m, v):
            m_hat = u_next * m / (1 - u_product * u_next) + (1 - u_t) * g / (1 - u_product)
            return (m_hat / (jnp.sqrt(v / (1 - b2 ** t)) + eps)).astype(g.dtype)
        return jax.tree.map(direction, updates, mu, nu), ScaleByKerasNadamState(count, u_product, mu, nu)

    return optax.GradientTransformation(init, update)


def Adam(learning_rate: float = 1e-3, **kw) -> Optimizer:
    return Optimizer("adam", {"learning_rate": learning_rate, **kw})


def AdamW(learning_rate: float = 1e-3, **kw) -> Optimizer:
    return Optimizer("adamw", {"learning_rate": learning_rate, **kw})


def SGD(learning_rate: float = 1e-2, **kw) -> Optimizer:
    return Optimizer("sgd", {"learning_rate": learning_rate, **kw})


def RMSprop(learning_rate: float = 1e-3, **kw) -> Optimizer:
    return Optimizer("rmsprop", {"learning_rate": learning_rate, **kw})
