"""The encoder's heads (`model.head`): classify, tag, mlm (+ nsp), embed — shapes, the tied MLM decoder, padding
invariance of every head, and every parameter on a logical axis of the rules table."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.config import ConfigError, load_config
from fastserve.core.state import abstract_model
from fastserve.models import build_model

V, C, D, T, EXTRA = 40, 5, 32, 12, 8


def tiny(**fields):
    base = dict(vocab_size=V, num_classes=C, d_model=D, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    return dataclasses.replace(load_config(None, ["model.name=encoder"]).model, **{**base, **fields})


def inputs(length=T, seed=0):
    """Three rows of lengths 4, 7, T padded to `length` with random tokens under the padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (3, T + EXTRA)).astype(np.int32)[:, :length]
    mask = np.arange(length)[None] < np.array([[4], [7], [T]])
    types = (np.arange(length)[None] >= 3).astype(np.int32).repeat(3, 0)
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(types)


def run(cfg, length=T, seed=0):
    model = build_model(cfg, nnx.Rngs(0))
    tokens, mask, types = inputs(length, seed)
    return model, jax.jit(lambda t, m, y: model(t, mask=m, token_types=y))(tokens, mask, types)


def test_heads_output_shapes_and_padding_invariance():
    for head, nsp in (("classify", False), ("tag", False), ("mlm", False), ("mlm", True), ("embed", False)):
        cfg = tiny(head=head, nsp=nsp)
        _, short = run(cfg)
        _, long = run(cfg, T + EXTRA)
        short, long = (jax.tree.map(np.asarray, x) for x in (short, long))
        if head in ("tag", "mlm"):   # per-token outputs: compare the valid positions
            first = short[0] if nsp else short
            first_long = (long[0] if nsp else long)[:, :T]
            assert first.shape == (3, T, C if head == "tag" else V) and first.dtype == np.float32
            valid = np.asarray(inputs()[1])[..., None]
            np.testing.assert_allclose(first_long * valid, first * valid, atol=2e-5, rtol=1e-5)
            if nsp:
                assert short[1].shape == (3, 2)
                np.testing.assert_allclose(long[1], short[1], atol=2e-5)
        else:
            np.testing.assert_allclose(long, short, atol=2e-5, rtol=1e-5)
            assert short.shape == ((3, C) if head == "classify" else (3, D)) and short.dtype == np.float32
    _, emb = run(tiny(head="embed"))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, rtol=1e-5)


def test_mlm_decoder_is_tied_to_the_word_embeddings():
    cfg = tiny(head="mlm")
    model, logits = run(cfg)

    @jax.jit
    def by_hand(tokens, mask, types):
        h = model.encode(tokens, mask, types)
        h = model.mlm.norm(jax.nn.gelu(model.mlm.dense(h), approximate=False))
        return h @ model.embeddings.word.embedding[...].T + model.mlm.bias[...]
    expected = by_hand(*inputs())
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-4, rtol=1e-4)
    _, _, logical = abstract_model(cfg)
    assert "embedding" not in logical["mlm"] and "classifier" not in logical and "pooler" not in logical


def test_every_head_names_axes_from_the_rules_table_with_hf_paths():
    rules = {name for name, _ in parallel.LOGICAL_RULES}
    expected = {"classify": ["pooler.kernel", "classifier.kernel"], "tag": ["classifier.kernel"],
                "mlm": ["mlm.dense.kernel", "mlm.norm.scale", "mlm.bias", "pooler.kernel", "nsp.kernel"],
                "embed": []}
    for head, paths in expected.items():
        _, _, logical = abstract_model(tiny(head=head, nsp=head == "mlm"))
        flat = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda n: isinstance(n, tuple))[0]
        named = {jax.tree_util.keystr(p, simple=True, separator="."): axes for p, axes in flat}
        assert {a for axes in named.values() for a in axes} <= rules
        assert all(p in named for p in paths), (head, sorted(named))
        if head == "embed":
            assert not any(p.startswith(("pooler", "classifier", "mlm", "nsp")) for p in named)


def test_flops_and_forward_inputs_follow_the_head():
    tag, cls, mlm = tiny(head="tag"), tiny(head="classify"), tiny(head="mlm", nsp=True)
    assert mlm.flops_per_example(16) > tag.flops_per_example(16) > tiny(head="embed").flops_per_example(16)
    assert set(mlm.forward_inputs(2)) == {"inputs", "mask", "token_types"}
    assert set(cls.forward_inputs(2)) == {"inputs", "mask"}


def test_head_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.head: expected one of classify, tag, mlm, embed"):
        load_config(None, ["model.name=encoder", "model.head=regress"])
    with pytest.raises(ConfigError, match=r"model\.nsp: next-sentence prediction is part of the mlm head"):
        load_config(None, ["model.name=encoder", "model.nsp=true"])
    with pytest.raises(ValueError, match="num_classes must be set for head tag"):
        build_model(tiny(head="tag", num_classes=0), nnx.Rngs(0))
    build_model(tiny(head="mlm", num_classes=0), nnx.Rngs(0))   # mlm / embed need no classes


def test_mlm_with_nsp_exports_both_outputs(tmp_path):
    """The forward export of a model with two outputs (masked-LM and next-sentence logits) returns both, equal to
    the model in-process; its inputs include the token types."""
    import jax.numpy as jnp

    from fastserve.artifacts.loader import load_exported
    from fastserve.artifacts.options import ExportOptions
    from fastserve.artifacts.writer import export_params
    cfg = tiny(head="mlm", nsp=True, max_seq_len=T)
    model = build_model(cfg, nnx.Rngs(0))
    export_params(cfg, nnx.to_pure_dict(nnx.state(model)), None, str(tmp_path), ExportOptions(platforms=("cpu",),
                                                                                             batch_sizes=(4,)))
    tokens, mask, types = inputs()
    mlm, nsp = load_exported(str(tmp_path)).forward(tokens, mask=mask, token_types=types)
    want_mlm, want_nsp = jax.jit(lambda t, m, y: model(t, mask=m, token_types=y))(tokens, mask, types)
    assert mlm.shape == (3, T, V) and nsp.shape == (3, 2)
    np.testing.assert_allclose(mlm, np.asarray(want_mlm), atol=1e-4)
    np.testing.assert_allclose(nsp, np.asarray(want_nsp), atol=1e-5)
    assert float(jnp.abs(want_nsp[0] - want_nsp[1]).max()) > 1e-5


_MESH_CHILD = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import dataclasses
import numpy as np
from flax import nnx
from fastserve import parallel
from fastserve.config import MeshConfig, load_config
from fastserve.core.state import init_params

rng = np.random.default_rng(0)
tokens = rng.integers(1, 40, (4, 12)).astype(np.int32)
mask = np.arange(12)[None] < np.array([[4], [7], [12], [9]])
types = (np.arange(12)[None] >= 3).astype(np.int32).repeat(4, 0)
out = {}
for head in ("tag", "mlm"):
    cfg = dataclasses.replace(load_config(None, ["model.name=encoder"]).model, vocab_size=40, num_classes=5, d_model=32,
                              n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, head=head, nsp=head == "mlm")
    results = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = parallel.make_mesh(MeshConfig(*shape), jax.devices()[:int(np.prod(shape))])
        graphdef, variables, _ = init_params(cfg, mesh, seed=0)
        batch = parallel.host_to_global({"t": tokens, "m": mask, "y": types}, mesh)
        with jax.set_mesh(mesh):
            y = jax.jit(lambda v, b: nnx.merge(graphdef, v)(b["t"], mask=b["m"], token_types=b["y"]))(variables, batch)
        results.append([np.asarray(jax.device_get(a)) for a in (y if isinstance(y, tuple) else (y,))])
        if shape == (2, 2, 2):
            word = variables["embeddings"]["word"]["embedding"]
            out[head + "_word_spec"] = str(word.sharding.spec)
    out[head] = max(float(np.max(np.abs(a - b))) for a, b in zip(*results))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow      # a subprocess with 8 simulated devices: 4 compiles of a tiny model
def test_heads_on_a_2x2x2_mesh_equal_one_device():
    """The per-token heads' outputs (mlm's tied decoder with the vocabulary on `tensor`, and nsp) are the same on
    1 device and on 8 simulated devices as data × fsdp × tensor = 2 × 2 × 2."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _MESH_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert res["mlm_word_spec"] == "P('tensor', 'fsdp')", res
    for head in ("tag", "mlm"):
        assert res[head] < 1e-5, res
