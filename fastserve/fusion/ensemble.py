"""Ensembles: N models (of possibly different sizes) sharing a tokenizer / label set, combined by averaging their
probabilities, as one jitted function.

The combined output is log(mean_i softmax(logits_i)): log-probabilities, so every loss and sampler that takes
logits takes it unchanged (softmax of it is the averaged distribution). `EnsembleHeldOut` scores it with the
config's task on the held-out split; `export_ensemble` writes it as a `forward` export (tokens → log-probabilities
for causal LMs; the members' own inputs for forward models) that `fastserve.artifacts.load_exported` runs.
Generation with a KV cache per member (prefill / decode / the server's generate path) is not exported.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastserve.fusion.members import FusionError, Member, check_compatible


def combine_logits(outputs: Sequence[jax.Array]) -> jax.Array:
    """log of the mean of the members' softmax distributions, in float32. Averaging probabilities and taking one log
    costs one exp per member element (a log-sum-exp of log-softmaxes costs two: about 1.9x slower on CPU, measured
    for 3 tiny members); the clamp at float32's smallest normal keeps a token every member underflows finite."""
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) != 1:
        raise FusionError(f"the members' outputs have different shapes {sorted(shapes)}: an ensemble needs one "
                          "label set / vocabulary")
    mean = sum(jax.nn.softmax(o.astype(jnp.float32), axis=-1) for o in outputs) / len(outputs)
    return jnp.log(jnp.maximum(mean, jnp.finfo(jnp.float32).tiny))


class AveragedModel:
    """Calls every member like one model; the first output (logits) is replaced by the averaged log-probabilities,
    the rest (e.g. a decoder's cache) is the first member's."""

    def __init__(self, models: Sequence[nnx.Module]):
        self.models = list(models)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outs = [m(*args, **kwargs) for m in self.models]
        if isinstance(outs[0], tuple):
            return (combine_logits([o[0] for o in outs]), *outs[0][1:])
        return combine_logits(outs)


def merged_models(graphdefs: Sequence[Any], variables: Sequence[Any]) -> AveragedModel:
    models = [nnx.merge(g, v) for g, v in zip(graphdefs, variables)]
    for m in models:
        m.eval()
    return AveragedModel(models)


class EnsembleHeldOut:
    """Held-out metrics of the averaged probabilities, by the first member's task and held-out split."""

    def __init__(self, members: list[Member]):
        from fastserve.tasks import make_task

        check_compatible(members, same_weights=False)
        cfg = members[0].cfg
        self.task = make_task(cfg.train.task)
        cfg = self.task.configure(cfg)
        self.data = cfg.data.load(cfg)
        if not self.data.eval:
            raise FusionError("there is no held-out split to score on (data.eval_fraction is 0?)")
        self.members, self.mesh = members, members[0].loaded.mesh
        self.task_state, _ = self.task.init_state(dataclasses.replace(cfg, model=members[0].loaded.model_cfg),
                                                  self.mesh)
        graphdefs = [m.loaded.graphdef for m in members]
        task = self.task

        def eval_step(variables, batch, task_state):
            _, sums = task.loss(merged_models(graphdefs, variables), batch, None, task_state)
            return sums

        self.step = jax.jit(eval_step)

    def __call__(self) -> dict[str, float]:
        from fastserve.core.trainer import evaluate_params

        variables = [m.params for m in self.members]
        return evaluate_params(self.step, variables, self.data.eval, self.task, self.mesh, self.task_state)


def forward_specs(member: Member, batch: Any, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """What one call of the ensemble takes: the members' `forward_inputs`, or tokens [B, seq_len] for causal LMs."""
    model_cfg = member.loaded.model_cfg
    if hasattr(model_cfg, "forward_inputs"):
        return model_cfg.forward_inputs(batch)
    return {"tokens": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)}


def ensemble_forward(members: list[Member], input_names: Sequence[str]):
    """(fn(list of each member's variables, *inputs) → averaged log-probabilities, the members' variables)."""
    graphdefs = [m.loaded.graphdef for m in members]

    def forward(variables, *args):
        model = merged_models(graphdefs, variables)
        out = model(args[0], **dict(zip(input_names[1:], args[1:])))
        return out[0] if isinstance(out, tuple) else out

    return forward, [m.params for m in members]


def export_ensemble(members: list[Member], out_dir: str, batch_sizes: Sequence[int] = (),
                    seq_len: int | None = None, platforms: Sequence[str] = ("cpu",)) -> dict[str, Any]:
    """Writes the ensemble as a `forward` export into `out_dir` (manifest, weights of every member in one
    safetensors file, one `forward_*` function per batch variant, the shared tokenizer); returns the manifest."""
    from fastserve.artifacts import writer
    from fastserve.artifacts.functions import batch_variants

    check_compatible(members, same_weights=False)
    seq_len = seq_len or members[0].cfg.data.seq_len
    leaves_by_member, treedefs = [], []
    for m in members:
        pure = nnx.to_pure_dict(m.params) if isinstance(m.params, nnx.State) else m.params
        leaves, treedef = jax.tree.flatten(pure)
        leaves_by_member.append(leaves)
        treedefs.append(treedef)
    all_leaves = [x for leaves in leaves_by_member for x in leaves]
    names = [f"m{i}.{n}" for i, m in enumerate(members) for n in writer.param_names(m.params)]
    counts = [len(leaves) for leaves in leaves_by_member]
    graphdefs = [m.loaded.graphdef for m in members]
    manifest_path = writer._prepare_dir(out_dir)
    functions, inputs = {}, {}
    for b, suffix in batch_variants(batch_sizes):
        specs = forward_specs(members[0], b, seq_len)
        input_names = list(specs)

        def forward(flat, *args, input_names=input_names):
            variables, start = [], 0
            for treedef, n in zip(treedefs, counts):
                variables.append(jax.tree.unflatten(treedef, list(flat[start:start + n])))
                start += n
            out = merged_models(graphdefs, variables)(args[0], **dict(zip(input_names[1:], args[1:])))
            return out[0] if isinstance(out, tuple) else out

        leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in all_leaves]
        name = f"forward{suffix}"
        functions[name] = writer._write_function(out_dir, forward, (leaf_specs, *specs.values()), platforms, name,
                                                 "forward", None, b, len(all_leaves), input_names, ["log_probs"], 0)
        inputs = {k: {"shape": [str(d) for d in v.shape], "dtype": str(np.dtype(v.dtype))} for k, v in specs.items()}
    writer.save_weights(os.path.join(out_dir, writer.WEIGHTS_FILE), names, all_leaves)
    files = [writer.WEIGHTS_FILE]
    manifest = {"capability": "forward", "format_version": writer.FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "jax_version": jax.__version__,
                "platforms": list(platforms),
                "model": {"ensemble": [dataclasses.asdict(m.loaded.model_cfg) for m in members]},
                "ensemble": {"members": [m.label for m in members], "combine": "log(mean softmax)",
                             "params_per_member": counts},
                "inputs": inputs, "outputs": "log-probabilities (log of the members' mean softmax)",
                "batch": {"forward": list(batch_sizes) or "symbolic"},
                "params": {**writer._params_entry(all_leaves, all_leaves), "names": names}, "functions": functions,
                "source": {"fused": [os.path.abspath(m.workdir) for m in members], "method": "ensemble"}}
    tokenizer = members[0].loaded.tokenizer
    if tokenizer is not None:
        tok_file = writer._write_tokenizer(out_dir, tokenizer)
        manifest["tokenizer"] = writer._tokenizer_entry(tokenizer, tok_file)
        files.append(tok_file)
    return writer._finish(out_dir, manifest_path, manifest, files)
