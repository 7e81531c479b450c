"""`fs.models.Sequential`: Keras's Sequential API as a thin face over fastserve's core.

The face owns no math of its own: the layer stack is the `sequential` model family (fastserve.models.sequential),
`compile` picks a task (`keras_loss`: Keras's losses and metrics) and an optimizer (fastserve.core.optim, or optax),
and `fit` / `evaluate` run the core's `create_train_state`, `make_train_step` and `make_eval_step` on a mesh over
every local device (data parallel; one device on a laptop). A last partial batch is padded to the batch size with
examples of weight 0 (one compiled step; they count in no loss, gradient, metric or batch-norm statistic).
`save(path)` writes a fastserve work dir (config.yaml, orbax checkpoints with checksums) plus `keras.json` (the
compile arguments); `load_model(path)` reads it back; the fastserve tools (evaluate, export) read it too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fastserve import layers as L, parallel
from fastserve.config import MeshConfig, config_from_dict
from fastserve.core.state import create_train_state, init_params, merge_trees, split_like
from fastserve.core.steps import make_eval_step, make_train_step
from fastserve.core.trainer import evaluate_params
from fastserve.data.dataset import padded_eval_batches
from fastserve.keras import losses as keras_losses
from fastserve.keras.callbacks import Callback, History
from fastserve.keras.inputs import check_data
from fastserve.keras.optimizers import Optimizer
from fastserve.keras.summary import ModelSummary, summarize
from fastserve.keras.saving import compile_as_saved, flat_variables, read_saved, restore_weights, save_model
from fastserve.keras import fitting
from fastserve.keras.training import (export_predict, lr_multiplier, make_epoch_runner, set_lr_multiplier,
                                      with_lr_multiplier)
from fastserve.models.sequential import SequentialConfig
from fastserve.tasks.keras_loss import CUSTOM, LOSSES, KerasLossConfig, canonical_loss


@dataclasses.dataclass
class _Compiled:
    optimizer: Optimizer | None          # None: an optax transformation given as is
    tx: optax.GradientTransformation | None
    task_cfg: KerasLossConfig
    loss_fn: Callable | None             # a custom loss callable


class Sequential:
    """A linear stack of layers (`fastserve.layers` specs) with Keras's `add`, `summary`, `compile`, `fit`,
    `evaluate`, `predict`, `save`. `seed` makes the initial weights, dropout and shuffling reproducible."""

    def __init__(self, layers: Sequence[L.Layer] | None = None, name: str = "sequential", seed: int = 0):
        self.name, self.seed = name, seed
        self.stop_training = False
        self.history: History | None = None
        self._specs: list[L.Layer] = []
        self._input_shape: tuple[int, ...] | None = None
        self._compiled: _Compiled | None = None
        self._mesh = None
        self._fits = 0
        self.epochs_done = 0      # epochs trained (saved with the model: resume with fit(initial_epoch=...))
        self._reset_weights()
        for layer in layers or ():
            self.add(layer)

    # ---------------------------------------------------------------------------------------------- layers

    def _reset_weights(self) -> None:
        self._graphdef = self._vars = self._var_shardings = None   # weights without optimizer state
        self._state = self._shardings = None                        # the core's train state (after compile + fit)
        self._steps: dict[str, Any] = {}

    def add(self, layer: L.Layer | L.Input) -> None:
        if isinstance(layer, L.Input):
            if self._specs:
                raise ValueError("fs.layers.Input must come before the first layer")
            self._input_shape = tuple(layer.shape) if not isinstance(layer.shape, int) else (layer.shape,)
            return
        if not isinstance(layer, L.Layer):
            raise TypeError(f"add() takes a fastserve.layers layer (e.g. fs.layers.Dense(10)), got "
                            f"{type(layer).__name__}")
        if layer.input_shape is not None:
            if self._specs:
                raise ValueError(f"input_shape given to layer {len(self._specs)} ({layer.keras_name}): only the first "
                                 "layer takes one")
            self._input_shape = layer.input_shape
        if self._input_shape is not None:
            L.plan(self._input_shape, [*self._specs, layer])   # a layer that cannot take its input fails here
        self._specs.append(layer)
        self._reset_weights()

    @property
    def layers(self) -> list[L.Layer]:
        return list(self._specs)

    @property
    def input_shape(self) -> tuple:
        return (None, *self._require_input_shape())

    @property
    def output_shape(self) -> tuple:
        return (None, *self._plan()[-1].output_shape)

    def _require_input_shape(self) -> tuple[int, ...]:
        if not self._specs:
            raise ValueError("the model has no layers: add some first (model.add(fs.layers.Dense(10)))")
        if self._input_shape is None:
            raise ValueError("the model's input shape is unknown: give input_shape=(...) to the first layer, add "
                             "fs.layers.Input(shape=(...)) first, or call fit() (it takes the shape from x)")
        return self._input_shape

    def _plan(self) -> list[L.Planned]:
        return L.plan(self._require_input_shape(), self._specs)

    @property
    def config(self) -> SequentialConfig:
        """The `model:` config section (`name: sequential`): what `python -m fastserve.train` builds."""
        return SequentialConfig(input_shape=list(self._require_input_shape()),
                                layers=[s.to_dict() for s in self._specs])

    @classmethod
    def from_config(cls, cfg: SequentialConfig, name: str = "sequential", seed: int = 0) -> "Sequential":
        model = cls(name=name, seed=seed)
        model._input_shape = tuple(cfg.input_shape)
        for spec in cfg.specs():
            model.add(spec)
        return model

    def count_params(self) -> int:
        return sum(p.trainable + p.non_trainable for p in self._plan())

    def summary(self, print_fn: Callable[[str], Any] | None = print) -> ModelSummary:
        """Prints (with `print_fn`; None: silent) and returns Keras's table: layer (type), output shape, params."""
        return summarize(self.name, self._plan(), print_fn)

    # --------------------------------------------------------------------------------------------- compile

    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, metrics: Sequence[str] | None = None) -> None:
        """`optimizer`: a name (Keras's defaults), `fs.keras.optimizers.Adam(...)` or an optax transformation;
        `loss`: a name, a `fs.keras.losses` object (`from_logits`) or a callable (y_true, y_pred) → per-example
        losses; `metrics`: names (accuracy, categorical_accuracy, sparse_categorical_accuracy, binary_accuracy,
        mae, mse). Unknown names fail here."""
        from fastserve.config_parsing import ConfigError

        if loss is None:
            raise ValueError(f"compile() needs a loss: one of {', '.join(LOSSES)}, a fs.keras.losses object or a "
                             "callable")
        loss_fn, from_logits = None, False
        if isinstance(loss, keras_losses.Loss):
            name, from_logits = loss.name, loss.from_logits
        elif isinstance(loss, str):
            name = canonical_loss(loss)
        elif callable(loss):
            name, loss_fn = CUSTOM, loss
        else:
            raise TypeError(f"loss must be a name, a fs.keras.losses object or a callable, got {type(loss).__name__}")
        if name == CUSTOM and loss_fn is None:
            raise ValueError(f"unknown loss 'custom' (choose from {', '.join(LOSSES)})")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])
        try:
            task_cfg = config_from_dict({"name": "keras_loss", "loss": name, "from_logits": from_logits,
                                         "metrics": metrics}, KerasLossConfig)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if isinstance(optimizer, str):
            opt, tx = Optimizer(optimizer), None
        elif isinstance(optimizer, Optimizer):
            opt, tx = optimizer, None
        elif isinstance(optimizer, optax.GradientTransformation):
            opt, tx = None, optimizer
        else:
            raise TypeError(f"optimizer must be a name, a fs.keras.optimizers optimizer or an optax "
                            f"GradientTransformation, got {type(optimizer).__name__}")
        self._compiled = _Compiled(opt, tx, task_cfg, loss_fn)
        if self._state is not None:   # a re-compile keeps the weights, with a fresh optimizer
            self._vars, self._var_shardings = self._variables(), self._merged_shardings()
            self._state = self._shardings = None
        self._steps = {}

    def _require_compiled(self, what: str) -> _Compiled:
        if self._compiled is None:
            raise RuntimeError(f"call compile(optimizer=..., loss=...) before {what}()")
        return self._compiled

    def _task(self):
        c = self._require_compiled("fit")
        return c.task_cfg.build(c.loss_fn)

    # ----------------------------------------------------------------------------------- weights and mesh

    def _get_mesh(self):
        if self._mesh is None:   # data parallel over every local device (one on a laptop)
            self._mesh = parallel.make_mesh(MeshConfig(data=-1))
        return self._mesh

    def _init_weights(self) -> None:
        if self._vars is None and self._state is None:
            self._graphdef, self._vars, self._var_shardings = init_params(self.config, self._get_mesh(), self.seed)

    def _variables(self) -> dict:
        """params ∪ model state, on the mesh."""
        if self._state is not None:
            return merge_trees(self._state["params"], self._state["model_state"])
        self._init_weights()
        return self._vars

    def _merged_shardings(self) -> Any:
        if self._shardings is not None:
            return merge_trees(self._shardings["params"], self._shardings["model_state"])
        self._init_weights()
        return self._var_shardings

    def _ensure_train_state(self, total_steps: int) -> None:
        """The core's train state for the compiled optimizer; existing weights (an earlier fit, a load, set_weights)
        are kept, the optimizer state starts fresh."""
        if self._state is not None:
            return
        c = self._require_compiled("fit")
        tx, schedule = (c.tx, optax.constant_schedule(0.0)) if c.tx is not None else c.optimizer.build(total_steps)
        tx = with_lr_multiplier(tx)   # the learning rate callbacks set (model.learning_rate)
        mesh = self._get_mesh()
        graphdef, state, shardings = create_train_state(self.config, tx, mesh, self.seed)
        if self._vars is not None:
            params, model_state = split_like(self._vars, state["params"])
            put = lambda t, s: jax.tree.map(jax.device_put, t, s)
            state["params"], state["model_state"] = put(params, shardings["params"]), put(model_state,
                                                                                          shardings["model_state"])
            with jax.set_mesh(mesh):
                state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["params"])
        self._graphdef, self._state, self._shardings, self._tx, self._schedule = graphdef, state, shardings, tx, schedule
        self._vars = self._var_shardings = None
        self._steps = {}

    def get_weights(self) -> list[np.ndarray]:
        """Every variable as a NumPy array, layer by layer (kernel, bias; BN: scale, bias, mean, var)."""
        flat = self._flat_variables(jax.device_get(self._variables()))
        return [np.array(v) for _, v in flat]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        current = self._variables()
        flat = self._flat_variables(current)
        if len(weights) != len(flat):
            raise ValueError(f"set_weights: the model has {len(flat)} arrays, got {len(weights)}")
        new = jax.tree.map(lambda x: x, current)
        for (path, old), w in zip(flat, weights):
            if tuple(np.shape(w)) != tuple(old.shape):
                raise ValueError(f"set_weights: {'.'.join(path)} has shape {tuple(old.shape)}, got {np.shape(w)}")
            node = new
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = jnp.asarray(w, old.dtype)
        new = jax.tree.map(jax.device_put, new, self._merged_shardings())
        if self._state is not None:
            self._state["params"], self._state["model_state"] = split_like(new, self._state["params"])
        else:
            self._vars = new

    def _flat_variables(self, variables: dict) -> list[tuple[tuple[str, ...], Any]]:
        return flat_variables(self._plan(), variables)

    # ------------------------------------------------------------------------------------------ checking

    def _check_data(self, x: Any, y: Any, what: str = "x") -> tuple[np.ndarray, np.ndarray | None]:
        """x, y as the steps take them; a clear error, before any work, when they do not fit the model or the loss."""
        return check_data(self, x, y, what)

    # ------------------------------------------------------------------------------------------- training

    def _batch_size(self, batch_size: int | None) -> int:
        b = 32 if batch_size is None else batch_size
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = self._get_mesh().size
        return -(-b // n) * n   # padded to a multiple of the devices (padding rows have weight 0)

    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = None, epochs: int = 1,
            verbose: Any = "auto", callbacks: Sequence[Callback] | None = None, validation_split: float = 0.0,
            validation_data: tuple | None = None, shuffle: bool = True, class_weight: dict | None = None,
            initial_epoch: int = 0) -> History:
        """Keras's fit: `class_weight` {class: weight} scales each training example's loss (Keras's
        "sum over batch size": Σ weight · loss / examples; metrics stay unweighted); `validation_split` holds out
        the tail (never trained on); returns the History."""
        return fitting.fit(self, x, y, batch_size, epochs, verbose, callbacks, validation_split, validation_data,
                           shuffle, class_weight, initial_epoch)

    @property
    def learning_rate(self) -> float:
        """The optimizer's current learning rate (its configured rate × the multiplier callbacks set)."""
        c = self._require_compiled("learning_rate")
        if c.optimizer is None:
            raise ValueError("learning_rate is only known for a named optimizer (compile(optimizer='adam' or "
                             "fs.keras.optimizers.Adam(...)), not for an optax transformation")
        base = c.optimizer.options["learning_rate"]
        return base * (lr_multiplier(self._state["opt_state"]) if self._state is not None else 1.0)

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        c = self._require_compiled("learning_rate")
        if self._state is None:
            raise RuntimeError("the learning rate can be set once fit() has started (e.g. from a callback)")
        self._state["opt_state"] = set_lr_multiplier(self._state["opt_state"],
                                                     value / c.optimizer.options["learning_rate"])

    def _train_step(self, task, key: str = "train") -> Callable:
        if key not in self._steps:
            self._steps[key] = make_train_step(self._graphdef, task, self._tx, self._schedule, self._shardings,
                                               self._get_mesh())
        return self._steps[key]

    def _epoch_runner(self) -> Callable:
        if "epoch" not in self._steps:
            self._steps["epoch"] = make_epoch_runner(self._steps["train"], self._shardings, self._get_mesh())
        return self._steps["epoch"]

    def _eval_step(self, task) -> Callable:
        if "eval" not in self._steps:
            self._steps["eval"] = make_eval_step(self._graphdef, task, self._merged_shardings(), self._get_mesh())
        return self._steps["eval"]

    def evaluate(self, x: Any = None, y: Any = None, batch_size: int | None = None, verbose: Any = "auto",
                 return_dict: bool = False) -> Any:
        """[loss, *metrics] in compile order (the loss alone when there are no metrics), or a dict."""
        self._require_compiled("evaluate")
        x, y = self._check_data(x, y)
        if y is None:
            raise ValueError("evaluate() needs labels y")
        task = self._task()
        self._init_weights()
        batches = padded_eval_batches({"inputs": x, "labels": y}, self._batch_size(batch_size))
        logs = evaluate_params(self._eval_step(task), self._variables(), batches, task, self._get_mesh(), {})
        if verbose not in (0, "auto", False):
            print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()))
        if return_dict:
            return logs
        values = [logs["loss"], *(logs[m] for m in task.cfg.metrics)]
        return values[0] if len(values) == 1 else values

    def predict(self, x: Any, batch_size: int | None = None, verbose: Any = "auto") -> np.ndarray:
        """The model's outputs (final activation applied: probabilities after a softmax), as a NumPy array."""
        x, _ = self._check_data(x, None)
        if "predict" not in self._steps:
            self._init_weights()
            graphdef, mesh = self._graphdef, self._get_mesh()

            def forward(variables, inputs):
                model = nnx.merge(graphdef, variables)
                model.eval()
                return model.outputs(inputs)
            data = parallel.batch_sharding(mesh, 1 + len(self._input_shape))
            self._steps["predict"] = jax.jit(forward, in_shardings=(self._merged_shardings(), data))
        fn, variables, mesh = self._steps["predict"], self._variables(), self._get_mesh()
        outs = []
        for batch in padded_eval_batches({"inputs": x}, self._batch_size(batch_size)):
            got = fn(variables, parallel.host_to_global({"inputs": batch["inputs"]}, mesh)["inputs"])
            outs.append(np.asarray(jax.device_get(got))[batch["weights"] > 0])
        return np.concatenate(outs) if outs else np.zeros((0, *self._plan()[-1].output_shape), np.float32)

    def __call__(self, x: Any) -> np.ndarray:
        return self.predict(x, verbose=0)

    # --------------------------------------------------------------------------------------- save / load

    def save(self, path: str) -> None:
        """A fastserve work dir at `path`: config.yaml (model, optimizer, task), checkpoints/ (orbax, checksummed:
        weights, batch-norm statistics, optimizer state when trained) and keras.json (the compile arguments)."""
        save_model(self, path)

    def export(self, path: str, batch_sizes: Sequence[int] = ()) -> dict:
        """Writes `predict` as a self-contained export (StableHLO + weights + manifest): `fastserve.load_exported(path)`
        returns an object whose `forward(x)` (or call) gives `predict(x)`'s outputs without fastserve's model code.
        `batch_sizes`: fixed batch variants (default: any batch). Returns the manifest."""
        return export_predict(self, path, tuple(batch_sizes))

    def _abstract_params(self) -> dict:
        from fastserve.core.state import abstract_model_split
        return abstract_model_split(self.config)[1]


def load_model(path: str, compile: bool = True) -> Sequential:
    """A model saved by `Sequential.save` (weights, batch-norm statistics, compile arguments and, when it was
    trained with a named optimizer, its optimizer state), on this machine's devices."""
    cfg, meta = read_saved(path)
    model = Sequential.from_config(cfg, name=meta.get("name", "sequential"), seed=meta.get("seed", 0))
    if compile:
        compile_as_saved(model, meta)
    restore_weights(model, path, meta)
    model.epochs_done = meta.get("epoch", 0)
    return model
