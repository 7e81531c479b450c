"""Export by capability: an encoder classifier and a CNN with batch norm export a `forward` function that a fresh
process, unable to import flax or the model code, runs to the same outputs as the model in eval mode."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from fresh_process import WITHOUT_MODEL_CODE
from fastserve import parallel
from fastserve.artifacts.options import ExportError, ExportOptions
from fastserve.artifacts.writer import export_params
from fastserve.config import MeshConfig
from fastserve.core.state import init_params
from fastserve.models.cnn import CNNConfig
from fastserve.models.encoder import EncoderConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = WITHOUT_MODEL_CODE + textwrap.dedent("""
    import numpy as np
    from fastserve.artifacts.loader import load_exported

    export_dir, inputs, out = sys.argv[1:4]
    d = dict(np.load(inputs))
    m = load_exported(export_dir)
    x = d.pop("inputs")
    np.save(out, m.forward(x, **d))
    print("RESULT " + json.dumps({"kind": type(m).__name__, "functions": m.functions}))
""")


def _export_and_run(model_cfg, variables, inputs, tmp_path, **opts):
    out = tmp_path / model_cfg.name
    manifest = export_params(model_cfg, variables, None, str(out), ExportOptions(platforms=("cpu",), **opts))
    np.savez(tmp_path / "in.npz", **inputs)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(tmp_path / "in.npz"), str(tmp_path / "o.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    return manifest, res, np.load(tmp_path / "o.npy")


def _model(cfg, seed=0):
    mesh = parallel.make_mesh(MeshConfig(data=1))
    graphdef, variables, _ = init_params(cfg, mesh, seed)
    return graphdef, jax.device_get(variables)


def test_cnn_with_batch_norm_exports_forward_with_its_running_statistics(tmp_path):
    cfg = CNNConfig(image_size=8, channels=1, num_classes=3, widths=[4, 8], blocks=[1, 1], dropout=0.5)
    graphdef, variables = _model(cfg)
    # running statistics far from their initial values: the export must carry and use them
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.7 if "mean" in jax.tree_util.keystr(p) else x * 2.5 if "var" in jax.tree_util.keystr(p)
        else x, variables)
    images = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
    expected = np.asarray(nnx.merge(graphdef, variables)(images))     # eval mode: build_model returns it so
    manifest, res, got = _export_and_run(cfg, variables, {"inputs": images}, tmp_path)
    assert manifest["capability"] == "forward" and res["kind"] == "ExportedForward"
    assert res["functions"] == ["forward"] and "tokenizer" not in manifest
    assert any("mean" in n for n in manifest["params"]["names"])       # batch-norm statistics travel with the weights
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_encoder_classifier_exports_forward_with_a_padding_mask_at_fixed_batch_sizes(tmp_path):
    cfg = EncoderConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=12, num_classes=2)
    graphdef, variables = _model(cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, 40, (3, 12)).astype(np.int32)
    mask = np.arange(12)[None, :] < np.array([[12], [7], [3]])
    expected = np.asarray(nnx.merge(graphdef, variables)(tokens, mask=mask))
    manifest, res, got = _export_and_run(cfg, variables, {"inputs": tokens, "mask": mask}, tmp_path, batch_sizes=(4,))
    # the default buckets (32, 64, …) are all longer than max_seq_len: one length, max_seq_len
    assert res["functions"] == ["forward_12_b4"] and manifest["inputs"]["mask"]["dtype"] == "bool"
    assert manifest["buckets"] == [12] and manifest["inputs"]["mask"]["shape"] == ["4", "t"]
    np.testing.assert_allclose(got, expected, atol=1e-5)                 # 3 rows run padded to the exported 4


_BUCKET_CHILD = WITHOUT_MODEL_CODE + textwrap.dedent("""
    import numpy as np
    from fastserve.artifacts.loader import load_exported

    export_dir, inputs, out = sys.argv[1:4]
    d = dict(np.load(inputs))
    m = load_exported(export_dir)
    results, used = {}, []
    for case in ("short", "long", "unpadded"):
        m._calls.clear()
        out_ = m.forward(d[case + "_inputs"], mask=d[case + "_mask"])
        results[case] = out_
        used.append(sorted(m._calls))      # the function each call compiled: the bucket it ran at
    try:
        m.forward(np.ones((1, 20), np.int32), mask=np.ones((1, 20), bool))
        error = ""
    except ValueError as e:
        error = str(e)
    np.savez(out, **results)
    print("RESULT " + json.dumps({"functions": m.functions, "used": used, "error": error}))
""")


def test_encoder_forward_runs_at_the_shortest_length_bucket_that_holds_the_input(tmp_path):
    """A tagger (per-token outputs) exported at lengths 4 / 8 / 16: 3 tokens run at 4 and come back at the caller's
    width; rows padded to 16 whose mask ends at 6 run at 8; outputs equal the model's on every unmasked position."""
    cfg = EncoderConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16, num_classes=3,
                        head="tag")
    graphdef, variables = _model(cfg)
    model = nnx.merge(graphdef, variables)
    rng = np.random.default_rng(2)
    cases = {"short": (2, 3, 3), "long": (3, 16, 6), "unpadded": (2, 16, 16)}   # rows, width, longest row
    inputs, expected = {}, {}
    for case, (rows, width, longest) in cases.items():
        tokens = rng.integers(2, 40, (rows, width)).astype(np.int32)
        mask = np.arange(width)[None, :] < np.linspace(1, longest, rows).round().astype(int)[:, None]
        inputs[case + "_inputs"], inputs[case + "_mask"] = tokens, mask
        expected[case] = np.asarray(model(tokens, mask=mask))
    out = tmp_path / "tagger"
    manifest = export_params(cfg, variables, None, str(out), ExportOptions(platforms=("cpu",), buckets=(4, 8)))
    assert manifest["buckets"] == [4, 8, 16] and manifest["per_token_outputs"] == [True]
    np.savez(tmp_path / "in.npz", **inputs)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _BUCKET_CHILD, str(out), str(tmp_path / "in.npz"),
                           str(tmp_path / "o.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert res["functions"] == ["forward_16", "forward_4", "forward_8"]
    assert res["used"] == [["forward_4"], ["forward_8"], ["forward_16"]]
    assert "20 tokens" in res["error"] and "16" in res["error"]
    got = np.load(tmp_path / "o.npz")
    for case in cases:
        mask = inputs[case + "_mask"]
        assert got[case].shape == expected[case].shape
        np.testing.assert_allclose(got[case][mask], expected[case][mask], atol=1e-5)
    assert not got["long"][:, 8:].any()      # the long rows ran at 8: positions past it come back as zeros


def test_a_forward_model_refuses_language_model_functions(tmp_path):
    cfg = CNNConfig(image_size=8, channels=1, num_classes=3, widths=[4], blocks=[1])
    _, variables = _model(cfg)
    with pytest.raises(ExportError, match="can export forward"):
        export_params(cfg, variables, None, str(tmp_path / "x"), ExportOptions(platforms=("cpu",),
                                                                              functions=("generate",)))
