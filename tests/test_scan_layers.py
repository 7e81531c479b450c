"""Scanned layers (`model.scan_layers`): the stacked model computes what the per-layer one does (loss, gradients,
KV-cached decoding), under every remat policy; checkpoints load in either layout (trainer resume, tools,
train.init_from); bfloat16 compute with float32 master weights trains like float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import load_config
from fastserve.core.init_from import _flat
from fastserve.core.optim import make_optimizer
from fastserve.core.state import abstract_model, create_train_state
from fastserve.core.steps import make_train_step, split_micro_batches
from fastserve.models.decoder import DecoderConfig
from fastserve.models.layer_stack import stack_flat, stack_layers, unstack_flat, unstack_layers
from fastserve.tasks import make_task

VOCAB = 64
SHAPE = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)


def build(**kw):
    with nnx.use_eager_sharding(False):
        return DecoderConfig(**{**SHAPE, **kw}).build(nnx.Rngs(0))


def lm_loss(model, tokens):
    logits, _ = model(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


def test_scanned_equals_per_layer_in_loss_gradients_remat_and_decoding():
    variants = {"per_layer": build(scan_layers=False), "scanned": build(scan_layers=True),
                "scanned_full": build(scan_layers=True, remat="full"),
                "scanned_dots": build(scan_layers=True, remat="dots_saveable"),
                "per_layer_dots": build(scan_layers=False, remat="dots_saveable")}
    # the same draws in the same order: the scanned init is the per-layer init, stacked
    per_layer = nnx.to_pure_dict(nnx.state(variants["per_layer"]))
    scanned = nnx.to_pure_dict(nnx.state(variants["scanned"]))
    assert jax.tree.map(jnp.shape, scanned["layers"]["mlp"]["up"]) == {"kernel": (3, 32, 48)}
    assert nnx.state(variants["scanned"])["layers"]["mlp"]["up"]["kernel"].get_metadata()["out_sharding"] == (
        "layers", "embed", "mlp")
    jax.tree.map(np.testing.assert_array_equal, stack_layers(per_layer), scanned)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scanned), per_layer)

    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, VOCAB)
    split = {name: nnx.split(m) for name, m in variants.items()}

    def all_grads(states):   # one program for every variant: one compile
        return {name: jax.value_and_grad(lambda s: lm_loss(nnx.merge(split[name][0], s), tokens))(states[name])
                for name in states}
    states = {name: s for name, (_, s) in split.items()}
    jaxpr = str(jax.make_jaxpr(all_grads)(states))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= 3      # remat really is in those programs
    out = jax.jit(all_grads)(states)
    ref_loss, ref_grads = out["per_layer"]
    ref_grads = nnx.to_pure_dict(ref_grads)
    for name, (loss, grads) in out.items():
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=name)
        grads = nnx.to_pure_dict(grads)
        grads = grads if name.startswith("per_layer") else unstack_layers(grads)
        for path, g in _flat(grads).items():
            np.testing.assert_allclose(g, _flat(ref_grads)[path], rtol=1e-5, atol=1e-7, err_msg=f"{name} {path}")

    # KV-cached prefill + one decode step: the scanned model reads per-layer views of its stacked weights
    def prefill_decode(model):
        cache = model.init_cache(2, 16)
        logits, cache = model(tokens[:, :8], cache=cache)
        step, cache = model(tokens[:, 8:9], jnp.full((2, 1), 8), cache)
        return logits, step, cache
    a, b = prefill_decode(variants["per_layer"]), prefill_decode(variants["scanned"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)


def test_flat_paths_convert_both_ways():
    flat = {"embed.embedding": np.zeros((5, 4)), **{f"layers.{i}.mlp.up.kernel": np.full((4, 6), i) for i in range(3)}}
    stacked = stack_flat(flat)
    assert set(stacked) == {"embed.embedding", "layers.mlp.up.kernel"}
    assert stacked["layers.mlp.up.kernel"].shape == (3, 4, 6) and stacked["layers.mlp.up.kernel"][2, 0, 0] == 2
    back = unstack_flat(stacked)
    assert set(back) == set(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
    # a path missing from some layer (a compressed layer, say) cannot stack: it stays per-layer
    partial = {k: v for k, v in flat.items() if k != "layers.1.mlp.up.kernel"}
    assert set(stack_flat(partial)) == set(partial)


def test_transforms_take_scanned_weights_per_layer():
    """A transform given a scanned model works on its layers one by one (paths `layers.1.mlp.up`) and returns a
    per-layer model: the same result as from the per-layer weights."""
    from fastserve.transforms import lowrank
    cfg = DecoderConfig(**{**SHAPE, "scan_layers": True})
    scanned = nnx.to_pure_dict(nnx.state(build(scan_layers=True)))
    new_cfg, new, report = lowrank(cfg, scanned, include="layers.1.mlp.*", rank=4)
    ref_cfg, ref, ref_report = lowrank(DecoderConfig(**{**SHAPE, "scan_layers": False}), unstack_layers(scanned),
                                       include="layers.1.mlp.*", rank=4)
    assert new_cfg == ref_cfg and not new_cfg.scanned and report == ref_report
    assert sorted(r["layer"] for r in report) == ["layers.1.mlp.down", "layers.1.mlp.gate", "layers.1.mlp.up"]
    jax.tree.map(np.testing.assert_array_equal, new, ref)


CKPT = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=48", "model.max_seq_len=32", "mesh.data=1", "checkpoint.async_save=false"]


def _saved_run(workdir, scan: bool):
    """A fresh train state in `scan`'s layout, saved at step 5 as a trainer would (with config.yaml)."""
    from fastserve.config import dump_config
    from fastserve.core.setup import prepare_state
    cfg = load_config(None, [*CKPT, f"model.scan_layers={str(scan).lower()}", f"train.workdir={workdir}",
                             "train.seed=3"])
    setup = prepare_state(cfg)
    setup.checkpointer.save(5, setup.state, {"data": {"epoch": 0, "index": 5}})
    setup.checkpointer.close()
    with open(f"{workdir}/config.yaml", "w") as f:
        f.write(dump_config(cfg))
    return jax.device_get(setup.state)


def test_checkpoints_load_in_either_layout(tmp_path):
    from fastserve.config import config_from_dict
    from fastserve.core.setup import prepare_state
    from fastserve.workdir import load_model
    scanned_dir, per_layer_dir = str(tmp_path / "scanned"), str(tmp_path / "per_layer")
    saved_scanned, saved_per_layer = _saved_run(scanned_dir, True), _saved_run(per_layer_dir, False)
    equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)   # noqa: E731
    # the two layouts initialize identically (same seed): stacked ↔ per-layer conversion is the identity on values
    equal(stack_layers(saved_per_layer["params"]), saved_scanned["params"])

    # the trainer resumes a stacked checkpoint per-layer and a per-layer one stacked, Adam's moments included
    for workdir, scan, saved in [(scanned_dir, False, saved_scanned), (per_layer_dir, True, saved_per_layer)]:
        setup = prepare_state(load_config(None, [*CKPT, f"model.scan_layers={str(scan).lower()}",
                                                 f"train.workdir={workdir}"]))
        setup.checkpointer.close()
        assert setup.start_step == 5 and setup.data_state == {"epoch": 0, "index": 5}
        convert = stack_layers if scan else unstack_layers
        equal(jax.device_get(setup.state["opt_state"]), convert(saved["opt_state"]))
        equal(jax.device_get(setup.state["params"]), convert(saved["params"]))

    # tools load per-layer weights from a stacked work dir
    loaded = load_model(config_from_dict({"source": {"kind": "checkpoint", "path": scanned_dir}}))
    assert loaded.model_cfg.scan_layers is False and 0 in loaded.params["layers"]
    equal(jax.device_get(loaded.params), unstack_layers(saved_scanned["params"]))

    # train.init_from a per-layer work dir into a scanned run
    setup = prepare_state(load_config(None, [*CKPT, f"train.workdir={tmp_path / 'fine'}", "train.seed=9",
                                             f"train.init_from={per_layer_dir}"]))
    setup.checkpointer.close()
    n = len(_flat(setup.state["params"]))   # every one, the stacked blocks from the per-layer source's
    assert n == 11 and f"loaded {n} of {n} parameters" in setup.init_note
    equal(jax.device_get(setup.state["params"]), stack_layers(saved_per_layer["params"]))


def _train(dtype: str, steps: int):
    cfg = load_config(None, [*CKPT, f"model.dtype={dtype}", "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=0",
                             "optimizer.schedule=constant"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    tx, schedule = make_optimizer(cfg.optimizer, steps, cfg.model)
    graphdef, state, shardings = create_train_state(cfg.model, tx, mesh, seed=0)
    step = make_train_step(graphdef, make_task("lm"), tx, schedule, shardings, mesh)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):   # learnable rows: each counts up by its own stride
        start, stride = rng.integers(0, VOCAB, (8, 1)), rng.integers(1, 4, (8, 1))
        tokens = ((start + stride * np.arange(17)) % VOCAB).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 16), np.float32)}
        state, m = step(state, split_micro_batches(batch, 1), {})
        losses.append(float(m["loss_sum"] / m["weight"]))
    return np.array(losses), state


BF16_TOLERANCE = 0.05  # nats, at every one of the 50 steps (measured 2026-12-02: max gap 0.014, at step 48)


@pytest.mark.slow
def test_bfloat16_training_tracks_float32_for_50_steps():
    f32, _ = _train("float32", 50)
    bf16, state = _train("bfloat16", 50)
    assert bf16[-1] < 0.5 * bf16[0], bf16                               # it learns
    gap = np.abs(bf16 - f32)
    assert gap.max() <= BF16_TOLERANCE, (gap.max(), int(gap.argmax()), bf16, f32)
    # master weights and Adam's moments stay float32
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if jnp.ndim(x)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("value, policy", [(True, "full"), (False, "none"), ("dots_saveable", "dots_saveable"),
                                           ("auto", "none")])
def test_remat_accepts_the_old_boolean(value, policy):
    from fastserve.models.decoder import remat_policy_name
    assert remat_policy_name(value) == policy
    # auto stores only matmul outputs under the scan (explicit choices are kept as given)
    assert remat_policy_name(value, scanned=True) == ("dots_saveable" if value == "auto" else policy)
    problems = dict(DecoderConfig(**{**SHAPE, "remat": "some"}).checks())
    assert "remat" in problems and "dots_saveable" in problems["remat"]


def test_export_params_takes_a_scanned_models_stacked_weights(tmp_path):
    """A user exporting a scanned model's own weights (stacked) gets the per-layer export tools write: per-layer names
    and config, and a decode that computes what the model does."""
    from fastserve.artifacts.loader import load_exported
    from fastserve.artifacts.writer import ExportOptions, export_params
    from fastserve.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["the word of the lord came unto jonah and the earth was without form and void, love "
                           "one another as i have loved you"] * 50, 300, str(tmp_path / "tok.model"))
    cfg = DecoderConfig(**{**SHAPE, "vocab_size": tok.vocab_size}, scan_layers=True)
    graphdef, abstract, _ = abstract_model(cfg)   # random weights without tracing an init (a compile costs seconds)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype), abstract)
    assert "mlp" in params["layers"]                                      # stacked, as training holds them
    manifest = export_params(cfg, params, tok, str(tmp_path / "out"), ExportOptions(
        platforms=("cpu",), functions=("decode",), max_cache_len=16, buckets=(8,)))
    names = manifest["params"]["names"]
    assert manifest["model"]["scan_layers"] is False and manifest["cache"]["layers"] == 3
    assert "layers.2.mlp.up.kernel" in names and not any(n.startswith("layers.mlp") for n in names)

    exported = load_exported(str(tmp_path / "out"), "cpu")
    tokens, positions = np.array([5, 9], np.int32), np.zeros(2, np.int32)
    logits, _ = exported.decode(tokens, positions, exported.init_cache(2))

    @jax.jit
    def decode(params, tokens, positions):   # the scanned model itself, in process
        model = nnx.merge(graphdef, params)
        return model(tokens[:, None], positions[:, None], model.init_cache(2, 16))[0][:, 0]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(decode(params, tokens, positions)), rtol=1e-5,
                               atol=1e-5)
