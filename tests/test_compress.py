"""`python -m fastserve.compress` on a tiny trained work dir: the new work dir is factorized as asked, generates,
fine-tunes from step 0 (held-out loss falls) and evaluates; int8 is inference-only; export applies `transforms`
and its functions equal the in-process compressed model; an imported BPE model compresses too."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from conftest import TINY
from fastserve.core.checkpoint import Checkpointer
from fastserve.transforms.report import REPORT_FILE, main as compress_main
from fastserve.config import SourceConfig, load_config
from fastserve.generation import decoding as infer
from fastserve.core.state import abstract_model
from fastserve.core.evaluator import evaluate
from fastserve.artifacts.loader import load_exported
from fastserve.artifacts.writer import main as export_main
from fastserve.workdir import BPE_TOKENIZER_FILE, load_model
from fastserve.generation.runner import generate
from fastserve.generation.runner import main as generate_cli_main
from fastserve.core.trainer import train
from fastserve.transforms import apply_transforms

EVAL = ["--eval-batches", "4"]
LOWRANK = ('transforms=[{lowrank: {rules: [{include: "layers.*.mlp.*", rank_ratio: 0.25}, '
           '{include: "attn.(q|o)", rank: 8}]}}]')


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    cfg = load_config(None, [*TINY, f"train.workdir={root / 'base'}", "train.steps=40", "train.eval_every=40",
                             "checkpoint.every=40", "train.eval_batches=4"])
    train(cfg)
    return root, cfg


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def test_compressed_work_dir_generates_fine_tunes_and_evaluates(base, capsys):
    root, cfg = base
    out = root / "lowrank"
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", str(out), *EVAL, "--decode-tokens", "8",
                          LOWRANK]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / REPORT_FILE).read_text())
    b, a, ratio = report["before"], report["after"], report["ratio"]
    # the printed table: each measure before, after and as a ratio (the report's numbers)
    table = {line[:24].strip(): line[24:].split() for line in printed.splitlines()[1:7]}
    assert list(table) == ["", "parameters", "bytes", "held-out loss", "held-out perplexity", "decode tokens/s (b=1)"]
    assert table["parameters"] == [f"{b['parameters'] / 1e6:.3f}M", f"{a['parameters'] / 1e6:.3f}M",
                                   f"{ratio['parameters']:.3f}"]
    assert table["bytes"][-1] == f"{ratio['bytes']:.3f}" and table["held-out perplexity"][:2] == [
        f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}"]
    assert float(table["decode tokens/s (b=1)"][2]) == pytest.approx(ratio["decode_tokens_per_s"], abs=1e-3)

    # an ordinary work dir: config with model.compressed and vocab, the tokenizer, a step-0 checkpoint
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["train"]["workdir"] == str(out) and written["transforms"] == []
    assert written["model"]["vocab_size"] == 400
    expected = {f"layers.{i}.mlp.{n}": {"kind": "lowrank", "rank": 16} for i in range(2) for n in ("gate", "up", "down")}
    expected.update({f"layers.{i}.attn.{n}": {"kind": "lowrank", "rank": 8} for i in range(2) for n in ("q", "o")})
    assert written["model"]["compressed"] == expected
    assert (out / "tokenizer.model").read_bytes() == (root / "base" / "tokenizer.model").read_bytes()
    assert Checkpointer(str(out / "checkpoints")).all_steps() == [0]

    # factorized as asked; the loaded model generates
    gen_cfg = load_config(out / "config.yaml", ["generate.max_new_tokens=4", "generate.batch_size=1",
                                                "generate.buckets=[16]"])
    loaded = load_model(gen_cfg)
    gate = loaded.params["layers"][0]["mlp"]["gate"]
    assert set(gate) == {"u", "v"} and gate["u"].shape == (64, 16) and gate["v"].shape == (16, 128)
    assert loaded.params["layers"][1]["attn"]["q"]["u"].shape == (64, 8)
    assert "kernel" in loaded.params["layers"][0]["attn"]["k"]           # not selected: dense
    (completion,) = generate(gen_cfg, ["The"])
    assert 1 <= len(completion.tokens) <= 4
    assert generate_cli_main([f"--checkpoint={out}", "--prompt", "The", "generate.max_new_tokens=4",
                              "generate.batch_size=1", "generate.buckets=[16]"]) == 0
    assert ">>> " in capsys.readouterr().out
    # fastserve.evaluate scores the step-0 checkpoint: the report's held-out numbers
    scored0 = evaluate(load_config(out / "config.yaml", ["train.eval_batches=4"]))
    assert scored0["step"] == 0 and scored0["loss"] == pytest.approx(a["loss"], abs=1e-5)

    assert a["parameters"] < b["parameters"] and ratio["bytes"] == pytest.approx(a["bytes"] / b["bytes"])
    assert a["loss"] > b["loss"] - 0.05 and b["decode_tokens_per_s"] > 0 and a["decode_tokens_per_s"] > 0
    assert sum(r["action"] == "factorized" for r in report["layers"]) == 10

    # recovery: `fastserve.train --config NEW/config.yaml train.steps=N` resumes the step-0 checkpoint
    ft = load_config(out / "config.yaml", ["train.steps=30", "train.eval_every=30", "checkpoint.every=30",
                                           "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=5"])
    results = train(ft)
    ev = _records(out, "eval")
    assert ev[0]["loss"] == pytest.approx(a["loss"], abs=1e-4)     # the compressed params, not a fresh init
    assert results["eval"]["loss"] < ev[0]["loss"] - 0.01, (ev[0]["loss"], results["eval"]["loss"])
    scored = evaluate(ft)
    assert scored["step"] == 30 and scored["loss"] == pytest.approx(results["eval"]["loss"], abs=1e-5)


def test_int8_work_dir_is_inference_only(base):
    root, cfg = base
    out = root / "int8"
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", str(out), "--heldout", "off",
                          "--decode-tokens", "0", "transforms=[{quantize: {bits: 8}}]"]) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["inference_only"] and 0.25 < report["ratio"]["bytes"] < 0.5
    gen_cfg = load_config(out / "config.yaml", ["generate.max_new_tokens=3", "generate.batch_size=1",
                                                "generate.buckets=[16]"])
    assert load_model(gen_cfg).params["layers"][0]["mlp"]["up"]["kernel"].dtype == jnp.int8
    assert len(generate(gen_cfg, ["The"])) == 1
    with pytest.raises(ValueError, match="inference-only"):
        train(load_config(out / "config.yaml", ["train.steps=5"]))
    # evaluate (params only) and export read it as they read any work dir
    scored = evaluate(load_config(out / "config.yaml", ["train.eval_batches=2"]))
    base_scored = evaluate(load_config(os.path.join(cfg.train.workdir, "config.yaml"), ["train.eval_batches=2"]))
    assert scored["step"] == 0 and scored["loss"] == pytest.approx(base_scored["loss"], abs=0.02)
    assert export_main(["--checkpoint", str(out), "--out", str(root / "int8_export"), "--platforms", "cpu",
                        "--buckets", "16", "--functions", "prefill"]) == 0
    manifest = load_exported(str(root / "int8_export")).manifest
    assert dict(zip(manifest["params"]["names"], manifest["params"]["dtypes"]))["layers.0.mlp.up.kernel"] == "int8"


def test_export_applies_the_config_transforms(base, tmp_path):
    root, cfg = base
    specs = [{"lowrank": {"include": "attn.*", "rank": 4}}, {"quantize": {"include": "mlp.*"}}]
    out = tmp_path / "export"
    assert export_main(["--checkpoint", cfg.train.workdir, "--out", str(out), "--platforms", "cpu", "--buckets", "16",
                        "--functions", "prefill", f"transforms={json.dumps(specs)}"]) == 0
    m = load_exported(str(out))
    dtypes = dict(zip(m.manifest["params"]["names"], m.manifest["params"]["dtypes"]))
    assert dtypes["layers.0.attn.q.u"] == "float32" and "layers.0.attn.q.kernel" not in dtypes
    assert dtypes["layers.1.mlp.down.kernel"] == "int8" and dtypes["layers.1.mlp.down.scale"] == "float32"
    assert m.manifest["model"]["compressed"]["layers.0.attn.k"] == {"kind": "lowrank", "rank": 4}
    assert m.manifest["source"]["transforms"] == specs

    loaded = load_model(dataclasses.replace(cfg, source=SourceConfig(path=cfg.train.workdir)))
    model_cfg, params, _ = apply_transforms(loaded.model_cfg, loaded.params, specs)
    graphdef, _, _ = abstract_model(model_cfg)
    model = nnx.merge(graphdef, params)
    tokens = (np.arange(16, dtype=np.int32)[None] * 7 + 5) % 400
    lengths = np.array([11], np.int32)
    ref, _ = infer.prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), model.init_cache(1, 64))
    np.testing.assert_allclose(np.asarray(m.prefill(tokens, lengths)[0]), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_imported_bpe_model_compresses(tmp_path, capsys):
    from test_interop import write_tiny_hf_llama

    write_tiny_hf_llama(tmp_path / "hf", tied=True)
    out = tmp_path / "out"
    assert compress_main(["--out", str(out), "--decode-tokens", "4", "source.kind=hf", f"source.path={tmp_path / 'hf'}",
                          "mesh.data=1", 'transforms=[{lowrank: {include: "mlp.*", rank: 4}}]']) == 0
    # the recovery hint for pretrained weights carries a fine-tuning rate, not the from-scratch defaults
    assert "train.steps=N optimizer.learning_rate=3e-5" in capsys.readouterr().out
    assert (out / BPE_TOKENIZER_FILE).is_file() and not (out / "tokenizer.model").exists()
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["heldout"] is None and "loss" not in report["after"] and report["ratio"]["parameters"] < 1
    cfg = load_config(out / "config.yaml", ["generate.max_new_tokens=3", "generate.batch_size=1",
                                            "generate.buckets=[32]", "generate.chat=true"])
    loaded = load_model(cfg)
    assert loaded.tokenizer.bos_id == 1 and loaded.chat_template and "u" in loaded.params["layers"][0]["mlp"]["up"]
    assert len(generate(cfg, ["hello world"])) == 1
    # the imported model fine-tunes (recovery) on text tokenized with its own byte-level BPE: held-out loss falls
    recover = load_config(out / "config.yaml", ["train.steps=30", "train.eval_every=30", "checkpoint.every=30",
                                                "data.seq_len=32", "data.batch_size=8", "train.eval_batches=2",
                                                "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=3",
                                                "log.progress=false", "log.tensorboard=false"])
    train(recover)
    evals = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"}
    assert evals[30]["loss"] < evals[0]["loss"] - 0.5
    assert (out / BPE_TOKENIZER_FILE).is_file() and not (out / "tokenizer.model").exists()  # never retrained


def test_errors_name_the_problem(base, capsys):
    root, cfg = base
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", str(root / "none")]) == 2
    assert "no transforms" in capsys.readouterr().err
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", cfg.train.workdir,
                          "transforms=[{quantize: {}}]"]) == 2
    assert "source work dir" in capsys.readouterr().err
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", str(root / "bad"),
                          "transforms=[{lowrank: {include: 'mlp.*', rnak: 4}}]"]) == 2
    assert "transforms[0].lowrank.rnak" in capsys.readouterr().err
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", str(root / "bad"),
                          "transforms=[{quantise: {}}]"]) == 2
    assert "unknown transform 'quantise'; did you mean 'quantize'" in capsys.readouterr().err
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", str(root / "bad"),
                          "transforms=[{lowrank: {include: 'layers.*.mpl.*', rank: 4}}]"]) == 2
    assert "'layers.*.mpl.*' matches no Linear layer" in capsys.readouterr().err
    assert compress_main(["--checkpoint", cfg.train.workdir, "--out", str(root / "bad"), "transforms=[lowrank]"]) == 2
    assert "transforms[0]: expected a mapping" in capsys.readouterr().err
    assert not (root / "bad" / "checkpoints").exists()                 # nothing written on a bad spec
    # export refuses a bad spec the same way, before writing anything
    assert export_main(["--checkpoint", cfg.train.workdir, "--out", str(root / "bad_export"),
                        "transforms=[{lowrank: {include: 'mlp.*', rank_ratio: 2}}]"]) == 2
    assert "transforms[0].lowrank.rank_ratio: expected a number in (0.0, 1.0]" in capsys.readouterr().err
    assert not (root / "bad_export").exists()


def test_compress_recipe_halves_the_quickstart_model():
    from fastserve import parallel
    from fastserve.transforms.report import param_stats
    from fastserve.config import MeshConfig
    from fastserve.core.state import init_params

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = load_config(os.path.join(root, "configs", "compress_quickstart.yaml"))
    assert recipe.source.kind == "checkpoint" and recipe.source.path == "runs/quickstart"
    model_cfg = load_config(os.path.join(root, "configs", "quickstart.yaml"), ["model.vocab_size=4000"]).model
    _, params, _ = init_params(model_cfg, parallel.make_mesh(MeshConfig(data=1)), seed=0)
    new_cfg, new_params, layers = apply_transforms(model_cfg, params, recipe.transforms)
    assert sum(r["action"] == "factorized" for r in layers) == 4 * 7       # every MLP and attention kernel
    ratio = param_stats(new_params)["bytes"] / param_stats(params)["bytes"]
    assert 0.45 < ratio <= 0.5, ratio
