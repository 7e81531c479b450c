"""Export (jax.export) and load without the model code: the exported functions equal the in-process ones.

A tiny random DecoderLM and a tiny sentencepiece tokenizer are exported for CPU once per module; a fresh Python
process that cannot import flax, fastserve.models or fastserve.core loads the export and its results are compared
with the in-process model (exact tokens, logits to 1e-5).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fresh_process import WITHOUT_MODEL_CODE
from fastserve.core.checkpoint import Checkpointer
from fastserve.config import Config, MeshConfig, ModelConfig, dump_config
from fastserve.generation import decoding as infer
from fastserve.core.optim import make_optimizer
from fastserve.core.state import init_params
from fastserve.data import load_texts, train_tokenizer
from fastserve.artifacts.writer import ExportError, ExportOptions, export_params, main as export_main
from fastserve.artifacts.loader import (ExportIntegrityError, MissingExportFileError, UnsupportedPlatformError,
                                load_exported)
from fastserve.parallel import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = (8, 16)
MAX_NEW = 8
CACHE_LEN = 64
# Sharp enough logits (init_std 0.3) that greedy decoding is not a string of near-ties.
# Per-layer weights, as `fastserve.export` gets them from a work dir (load_model unstacks scanned layers).
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, init_std=0.3, scan_layers=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tok = train_tokenizer(load_texts("pydoc")[:4], 360, str(root / "tok.model"))
    cfg = ModelConfig(vocab_size=tok.vocab_size, **TINY)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    graphdef, params, _ = init_params(cfg, mesh, seed=0)
    out = root / "cpu"
    manifest = export_params(cfg, params, tok, str(out),
                             ExportOptions(platforms=("cpu",), buckets=BUCKETS, max_new_tokens=MAX_NEW))
    return SimpleNamespace(root=root, tok=tok, cfg=cfg, graphdef=graphdef, params=params, out=out, manifest=manifest)


def _inputs(tok):
    """Three prompts of different lengths (BOS first, as training packs them), padded to the 16 bucket."""
    texts = ["def f(x):\n  ", "The", "import"]
    ids = [[tok.bos_id] + tok.encode(t) for t in texts]
    assert all(len(i) <= max(BUCKETS) for i in ids) and len({len(i) for i in ids}) == 3
    tokens, lengths = infer.pad_prompts(ids, buckets=BUCKETS)
    return texts, ids, tokens, lengths


# The whole loader side, run in a fresh interpreter that cannot import the model code.
_CHILD = WITHOUT_MODEL_CODE + textwrap.dedent("""
    import numpy as np
    from fastserve.artifacts.loader import load_exported

    export_dir, inputs, out = sys.argv[1:4]
    d = np.load(inputs)
    m = load_exported(export_dir)
    logits, cache = m.prefill(d["tokens"], d["lengths"])
    nxt = np.asarray(logits).argmax(-1).astype(np.int32)
    dlogits, dcache = m.decode(nxt, d["lengths"], cache)
    prompts = [list(d["tokens"][i, :d["lengths"][i]]) for i in range(len(d["lengths"]))]
    greedy = m.generate_tokens(prompts, max_new_tokens=%(max_new)d)
    sampled = m.generate_tokens(prompts, max_new_tokens=%(max_new)d, temperature=[0.8, 1.0, 0.7], top_k=[20, 0, 5],
                                top_p=[0.9, 1.0, 0.8], seed=3)
    short = m.generate_tokens(prompts, max_new_tokens=3)
    texts = m.generate(json.loads(d["texts"].item()), max_new_tokens=%(max_new)d)
    np.savez(out, logits=np.asarray(logits), next=nxt, dlogits=np.asarray(dlogits),
             cache=np.stack([np.stack([np.asarray(c["k"]), np.asarray(c["v"])]) for c in dcache]))
    blocked_loaded = [k for k in sys.modules if any(k == b or k.startswith(b + ".") for b in BLOCKED)]
    print("RESULT " + json.dumps({"greedy": greedy, "sampled": sampled, "short": short, "texts": texts,
                                  "blocked_loaded": blocked_loaded,
                                  "fastserve_modules": sorted(k for k in sys.modules if k.startswith("fastserve"))}))
""") % {"max_new": MAX_NEW}


def _reference(t, tokens, lengths, temperature, top_k, top_p, seed, max_new=MAX_NEW):
    graphdef, b = t.graphdef, tokens.shape[0]
    stop = np.array([t.tok.eos_id, -1, -1, -1], np.int32)

    @jax.jit
    def gen(params, tokens, lengths, temperature, top_k, top_p, row_max_new):
        model = nnx.merge(graphdef, params)
        return infer.generate(model, tokens, lengths, jax.random.key(np.uint32(seed)), max_new_tokens=MAX_NEW,
                              temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop,
                              row_max_new=row_max_new)

    out, count = gen(t.params, tokens, lengths, np.asarray(temperature, np.float32), np.asarray(top_k, np.int32),
                     np.asarray(top_p, np.float32), np.full((b,), max_new, np.int32))
    out, count = np.asarray(out), np.asarray(count)
    return [out[i, :count[i]].tolist() for i in range(b)]


def test_fresh_process_without_model_code_matches_in_process(tiny, tmp_path):
    t = tiny
    texts, ids, tokens, lengths = _inputs(t.tok)
    np.savez(tmp_path / "in.npz", tokens=tokens, lengths=lengths, texts=np.array(json.dumps(texts)))
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(t.out), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    got = np.load(tmp_path / "out.npz")
    assert res["blocked_loaded"] == []
    assert "fastserve.artifacts.loader" in res["fastserve_modules"]

    # prefill + one decode step, in process
    graphdef = t.graphdef

    @jax.jit
    def prefill_decode(params, tokens, lengths):
        model = nnx.merge(graphdef, params)
        logits, cache = infer.prefill(model, tokens, lengths, model.init_cache(tokens.shape[0], CACHE_LEN))
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        dlogits, cache = infer.decode(model, nxt, lengths, cache)
        return logits, nxt, dlogits, cache

    logits, nxt, dlogits, cache = jax.device_get(prefill_decode(t.params, tokens, lengths))
    np.testing.assert_allclose(got["logits"], logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got["next"], nxt)
    np.testing.assert_allclose(got["dlogits"], dlogits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["cache"], np.stack([np.stack([c["k"], c["v"]]) for c in cache]), atol=1e-5)

    # generation: greedy and sampled (per-row settings, one seed) give the very same tokens
    b = len(ids)
    greedy = _reference(t, tokens, lengths, np.zeros(b), np.zeros(b), np.ones(b), seed=0)
    assert res["greedy"] == greedy
    assert all(len(g) >= 1 for g in greedy)
    sampled = _reference(t, tokens, lengths, [0.8, 1.0, 0.7], [20, 0, 5], [0.9, 1.0, 0.8], seed=3)
    assert res["sampled"] == sampled
    assert res["short"] == [g[:3] for g in greedy]
    # text generation: BOS-prefixed prompts, detokenized continuations without the stop token
    expected = [t.tok.decode([x for x in g if x != t.tok.eos_id]) for g in greedy]
    assert res["texts"] == expected


def test_manifest_describes_the_export(tiny):
    m = json.loads((tiny.out / "manifest.json").read_text())
    assert m == tiny.manifest
    assert m["format_version"] == 1 and m["platforms"] == ["cpu"] and m["buckets"] == list(BUCKETS)
    assert set(m["functions"]) == {"prefill_8", "prefill_16", "decode", "generate_8", "generate_16"}
    assert m["params"]["names"][0] == "embed.embedding" and "layers.0.attn.q.kernel" in m["params"]["names"]
    assert m["tokenizer"]["eos_id"] == tiny.tok.eos_id and m["tokenizer"]["add_bos"]
    pre = m["functions"]["prefill_16"]
    assert pre["batch"] == "b"
    assert pre["args"][1] == {"name": "tokens", "shape": ["b", 16], "dtype": "int32"}
    assert pre["results"][0] == {"name": "logits", "shape": ["b", tiny.cfg.vocab_size], "dtype": "float32"}
    assert pre["results"][1]["shape"] == ["b", CACHE_LEN, 2, 8] and pre["results"][1]["layers"] == 2
    gen = m["functions"]["generate_8"]
    assert gen["results"] == [{"name": "tokens", "shape": ["b", MAX_NEW], "dtype": "int32"},
                              {"name": "counts", "shape": ["b"], "dtype": "int32"}]
    files = {p.name for p in tiny.out.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == files
    # weights are arguments, not constants: every function file is far smaller than the weights
    weights = m["files"]["weights.safetensors"]["bytes"]
    assert weights >= 4 * m["params"]["num_parameters"]
    assert all(m["files"][fn["file"]]["bytes"] < 100_000 for fn in m["functions"].values())


def _copy(tiny, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny.out, dst)
    return dst


def test_corrupted_weights_fail_the_hash_check(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    data = bytearray((d / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (d / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportIntegrityError, match=r"weights\.safetensors.*sha256 mismatch"):
        load_exported(d)


def test_missing_file_is_named(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    os.unlink(d / "decode.jax_exported")
    with pytest.raises(MissingExportFileError, match=r"decode\.jax_exported"):
        load_exported(d)
    os.unlink(d / "manifest.json")
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        load_exported(d)


def test_platform_not_exported_fails_clearly(tiny):
    with pytest.raises(UnsupportedPlatformError, match=r"'tpu'.*\['cpu'\]"):
        load_exported(tiny.out, platform="tpu")


def test_multi_platform_export_serializes(tiny, tmp_path):
    out = tmp_path / "multi"
    manifest = export_params(tiny.cfg, tiny.params, tiny.tok, str(out),
                             ExportOptions(platforms=("cpu", "cuda", "tpu"), buckets=(8,), max_new_tokens=4))
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert set(manifest["functions"]) == {"prefill_8", "decode", "generate_8"}
    for fn in manifest["functions"].values():
        exp = jax.export.deserialize(bytearray((out / fn["file"]).read_bytes()))
        assert tuple(exp.platforms) == ("cpu", "cuda", "tpu") and fn["platforms"] == ["cpu", "cuda", "tpu"]
    with pytest.raises(UnsupportedPlatformError, match=r"'rocm'.*\['cpu', 'cuda', 'tpu'\]"):
        load_exported(out, platform="rocm")
    # the CPU part of a multi-platform export runs here and equals the CPU-only export
    multi, single = load_exported(out, platform="cpu"), load_exported(tiny.out)
    _, _, tokens, lengths = _inputs(tiny.tok)
    tokens, lengths = tokens[:, :8], np.minimum(lengths, 8)
    np.testing.assert_allclose(np.asarray(multi.prefill(tokens, lengths)[0]),
                               np.asarray(single.prefill(tokens, lengths)[0]), atol=1e-5, rtol=1e-5)


def test_fixed_batch_sizes_and_bad_options(tiny, tmp_path):
    out = tmp_path / "fixed"
    manifest = export_params(tiny.cfg, tiny.params, tiny.tok, str(out),
                             ExportOptions(platforms=("cpu",), buckets=(8, 500), batch_sizes=(4,),
                                           generate_batch_sizes=(2,), max_new_tokens=4))
    assert manifest["buckets"] == [8]  # 500 > max_seq_len: dropped
    assert set(manifest["functions"]) == {"prefill_8_b4", "decode_b4", "generate_8_b2"}
    assert manifest["functions"]["prefill_8_b4"]["args"][1]["shape"] == [4, 8]
    m = load_exported(out)
    tokens = np.full((4, 8), 5, np.int32)
    with pytest.raises(ValueError, match="not an exported batch size"):
        m.prefill(tokens[:3], np.array([8, 8, 8], np.int32))
    logits, cache = m.prefill(tokens, np.array([8, 3, 1, 8], np.int32))
    assert logits.shape == (4, tiny.cfg.vocab_size) and cache[0]["k"].shape == (4, CACHE_LEN, 2, 8)
    with pytest.raises(ValueError, match="positions must be in"):
        m.decode(np.zeros(4, np.int32), np.full(4, CACHE_LEN, np.int32), cache)
    # 3 prompts on a batch-2 generate: a full chunk, then one row padded to 2
    prompts = [[2, 5, 6], [2, 7], [2, 9, 10, 11]]
    out3 = m.generate_tokens(prompts, max_new_tokens=4)
    assert len(out3) == 3 and all(1 <= len(o) <= 4 for o in out3)
    assert all(0 <= x < tiny.cfg.vocab_size for o in out3 for x in o)
    assert m.generate_tokens(prompts, max_new_tokens=4) == out3
    with pytest.raises(ValueError, match="at most 4"):
        m.generate_tokens(prompts, max_new_tokens=5)
    with pytest.raises(ExportError, match="platforms"):
        export_params(tiny.cfg, tiny.params, tiny.tok, str(tmp_path / "bad"), ExportOptions(platforms=("metal",)))
    with pytest.raises(ExportError, match="buckets"):
        export_params(tiny.cfg, tiny.params, tiny.tok, str(tmp_path / "bad"), ExportOptions(buckets=(128,)))
    wrong = {**tiny.params, "final_norm": {"scale": jnp.ones((7,))}}
    with pytest.raises(ExportError, match="final_norm.scale"):
        export_params(tiny.cfg, wrong, tiny.tok, str(tmp_path / "bad"), ExportOptions(platforms=("cpu",)))


def test_cli_exports_a_training_work_dir(tiny, tmp_path):
    """A work dir as training leaves it (config.yaml, tokenizer.model, orbax checkpoints/) → export → same logits."""
    work = tmp_path / "run"
    work.mkdir()
    cfg = Config(model=tiny.cfg)
    cfg.train.workdir, cfg.train.steps, cfg.data.seq_len = str(work), 3, 32
    (work / "config.yaml").write_text(dump_config(cfg))
    shutil.copy(tiny.root / "tok.model", work / "tokenizer.model")
    # the train state's layout (create_train_state's keys), built eagerly: jitting its init costs seconds here
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
    params = jax.tree.map(lambda x: x * 1.5, tiny.params)  # not the fixture's weights: the restored ones must be used
    state = {"step": jnp.int32(3), "params": params, "model_state": {}, "opt_state": tx.init(params),
             "rng": jax.random.key_data(jax.random.key(1))}
    ckpt = Checkpointer(str(work / "checkpoints"), async_save=False)
    ckpt.save(3, state, {"data": {}})
    ckpt.close()
    out = tmp_path / "cli"
    rc = export_main(["--checkpoint", str(work), "--out", str(out), "--platforms", "cpu", "--buckets", "8",
                      "--functions", "prefill"])
    assert rc == 0
    m = load_exported(out)
    assert m.manifest["source"]["step"] == 3
    tokens = np.arange(4, 12, dtype=np.int32)[None]
    lengths = np.array([8], np.int32)
    graphdef = tiny.graphdef
    model = nnx.merge(graphdef, state["params"])
    ref, _ = infer.prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), model.init_cache(1, CACHE_LEN))
    np.testing.assert_allclose(np.asarray(m.prefill(tokens, lengths)[0]), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert export_main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
