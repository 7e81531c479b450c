"""Compression: low-rank rank ratios (with and without a recovery fine-tune or distillation) and int8, on a trained
and an imported model — parameters, bytes, held-out perplexity and greedy batch-1 decode tokens/s.

    flock /tmp/bench.lock python experiments/bench_compress.py          # quickstart + SmolLM2-135M; ~25 min, 2 cores
    flock /tmp/bench.lock python experiments/bench_compress.py --quick  # a small model, the whole path; ~1 min
    python experiments/bench_compress.py --render                       # redraw .md / .png from the recorded .json

Models:
- quickstart: configs/quickstart.yaml trained 300 steps into a cached work dir (runs/bench_compress/base300; it
  overfits past ~300), held-out perplexity on its own held-out split (all of it). Each low-rank setting goes through
  `fastserve.transforms.report.compress` (the `python -m fastserve.compress` path: a new work dir at step 0), then a
  recovery fine-tune of that work dir with `fastserve.core.trainer.train` (RECOVERY_STEPS at RECOVERY_LR); for the
  bytes-halving ratio also the same steps as distillation from the original (`train.task=distill`). The rank-1.0
  row's "recovery" is the control: the uncompressed model trained the same extra steps.
- SmolLM2-135M-Instruct (GGUF Q4_1 → float32; no fine-tune: byte-level BPE, which the training pipeline cannot
  read): perplexity on the pydoc held-out split tokenized with the model's BPE, SMOL_EVAL_BATCHES batches of 16×128.
Rank ratios apply to every MLP and attention kernel (`layers.*.mlp.*`, `layers.*.attn.*`); a kernel whose factors
would not be smaller (rank·(m+n) ≥ m·n) stays dense, so ratio 1.0 leaves the model unchanged. Besides 1.0 / 0.5 /
0.25 / 0.125, each model gets the largest ratio whose whole model (embeddings included) has at most half the bytes.
int8 quantizes every dense Linear kernel (per output channel; embeddings stay float32). Decode: greedy, batch 1, a
fixed prompt, median step over 32 new tokens (median of 3 rounds) — noisy on a shared 2-core CPU (±15 %).
Target (issue 4): a setting with at most half the bytes and held-out perplexity within 10 % of the original after
recovery. The full run writes experiments/results/bench_compress.{json,md,png}; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import numpy as np

from fastserve.transforms.report import (compress, decode_prompt_ids, heldout_batches, heldout_metrics, measure,
                                   transform_loaded)
from fastserve.config import SourceConfig, load_config
from fastserve.workdir import load_model
from fastserve.core.trainer import train
from fastserve.transforms.common import describe, get_node, replace_node, select
from fastserve.transforms.lowrank import choose_rank

from provenance import provenance  # experiments/: the script's own directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
SMOLLM = os.path.join(REPO, "configs", "smollm2_135m.yaml")
RESULTS = os.path.join(HERE, "results")
DECODE_TOKENS = 32
SMOL_EVAL_BATCHES = 2
RATIOS = (1.0, 0.5, 0.25, 0.125)
RECOVERY_STEPS = 100
RECOVERY_LR = 1e-3
# --quick: a smaller model of the same recipe, so the whole path (train, compress, recover, int8) runs in ~1 min
QUICK_MODEL = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=344",
               "tokenizer.vocab_size=1000", "data.batch_size=8", "train.eval_batches=4", "optimizer.warmup_steps=10"]


KERNELS = ["layers.*.mlp.*", "layers.*.attn.*"]


def lowrank(ratio: float) -> list[dict]:
    return [{"lowrank": {"include": KERNELS, "rank_ratio": ratio}}]


def lowrank_bytes_ratio(model_cfg, ratio: float) -> float:
    """Total parameter bytes after `lowrank(ratio)` over the original's, from shapes alone (no SVD): embeddings,
    norms and kernels kept dense count at their size, each factorized kernel as rank·(m+n) values."""
    abstract, layers = describe(model_cfg)
    size = lambda x: int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize  # noqa: E731
    total = sum(size(x) for x in jax.tree.leaves(abstract))
    after = total
    for path in select(layers, KERNELS, None, "lowrank"):
        kernel = get_node(abstract, path)["kernel"]
        (m, n), item = kernel.shape, np.dtype(kernel.dtype).itemsize
        r = choose_rank(None, m, n, {"rank_ratio": ratio})
        after -= (m * n - min(m * n, r * (m + n))) * item
    return after / total


def halving_ratio(model_cfg, step: float = 0.01) -> float:
    """The largest rank ratio (a multiple of `step`) whose low-rank model has at most half the original bytes."""
    ratios = [k * step for k in range(int(round(1 / step)), 0, -1)]
    return round(next(r for r in ratios if lowrank_bytes_ratio(model_cfg, r) <= 0.5), 4)


INT8 = [{"quantize": {"bits": 8}}]


def _row(model: str, setting: str, m: dict, original: dict, **extra) -> dict:
    row = {"model": model, "setting": setting, **extra, "parameters": m["parameters"], "bytes": m["bytes"],
           "bytes_ratio": m["bytes"] / original["bytes"], "loss": m.get("loss"), "perplexity": m.get("perplexity"),
           "perplexity_ratio": (m["perplexity"] / original["perplexity"]) if m.get("perplexity") else None,
           "decode_tokens_per_s": m.get("decode_tokens_per_s")}
    ppl = f"{row['perplexity']:.2f} ({row['perplexity_ratio']:.3f}x)" if row["perplexity"] else "-"
    tps = f"{row['decode_tokens_per_s']:.1f}" if row["decode_tokens_per_s"] else "-"
    print(f"[{model}] {setting:34} params {row['parameters'] / 1e6:7.3f}M  bytes {row['bytes'] / 1e6:7.2f} MB "
          f"({row['bytes_ratio']:.3f}x)  ppl {ppl:22}  decode {tps} tok/s", flush=True)
    return row


def _factorized(layers: list[dict]) -> int:
    return sum(r.get("action") == "factorized" for r in layers)


def bench_quickstart(scratch: str, quick: bool) -> list[dict]:
    steps, recovery = (40, 10) if quick else (300, RECOVERY_STEPS)
    name = "quickstart (small, quick)" if quick else "quickstart"
    base_dir = os.path.join(scratch, f"base{steps}")
    common = ["train.task.samples=0", "log.progress=false", "log.tensorboard=false", "mesh.data=1"]
    cfg = load_config(QUICKSTART, [*common, *(QUICK_MODEL if quick else []), f"train.workdir={base_dir}",
                                   f"train.steps={steps}", f"train.eval_every={steps}", f"checkpoint.every={steps}"])
    t0 = time.perf_counter()
    train(cfg)  # resumes: a finished work dir costs nothing
    print(f"[{name}] base trained {steps} steps in {base_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    loaded = load_model(dataclasses.replace(cfg, source=SourceConfig(path=base_dir)))
    batches = heldout_batches(cfg, loaded.tokenizer)
    prompt = decode_prompt_ids(loaded.tokenizer)
    decode_tokens = 8 if quick else DECODE_TOKENS
    original = measure(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh, batches, prompt, decode_tokens)
    half = halving_ratio(loaded.model_cfg)
    ratios = (half,) if quick else tuple(sorted({*RATIOS, half}, reverse=True))
    rows = [_row(name, "original", original, original, rank_ratio=None, recovered=False, base_steps=steps,
                 heldout_tokens=int(sum(float(b["weights"].sum()) for b in batches)))]

    def compressed(specs, out, source_cfg=cfg, src_loaded=loaded, before=original):
        shutil.rmtree(out, ignore_errors=True)
        return compress(dataclasses.replace(source_cfg, transforms=specs), out, heldout=True,
                        decode_tokens=decode_tokens, loaded=src_loaded, before=before)

    def recover(workdir, *extra):  # a short fine-tune of a compressed work dir, resumed from its step 0
        ft = load_config(os.path.join(workdir, "config.yaml"), [
            f"train.workdir={workdir}", f"train.steps={recovery}", f"train.eval_every={recovery}",
            f"checkpoint.every={recovery}", f"optimizer.learning_rate={RECOVERY_LR}",
            f"optimizer.warmup_steps={max(1, recovery // 10)}", *extra])
        return train(ft)["eval"]

    for ratio in ratios:
        out = os.path.join(scratch, f"rank{ratio}")
        rep = compressed(lowrank(ratio), out)
        label = f"lowrank {ratio}" + (" (halves bytes)" if ratio == half else "")
        info = dict(rank_ratio=ratio, factorized_layers=_factorized(rep["layers"]))
        rows.append(_row(name, label, rep["after"], original, recovered=False, **info))
        if ratio == half:  # the same compressed start, recovered by distillation from the original (the teacher)
            shutil.rmtree(out + "_distill", ignore_errors=True)
            shutil.copytree(out, out + "_distill")
        ev = recover(out)  # same structure as `after`: same bytes and speed; only the held-out numbers change
        rec = {**rep["after"], "loss": ev["loss"], "perplexity": ev["perplexity"]}
        rows.append(_row(name, f"{label} + recovery {recovery}", rec, original, recovered=True,
                         recovery_steps=recovery, **info))
        if ratio == half:
            ev = recover(out + "_distill", "train.task=distill", f"train.task.teacher={base_dir}")
            dist = {**rep["after"], "loss": ev["ce"], "perplexity": ev["perplexity"]}  # the data CE, as above
            rows.append(_row(name, f"{label} + distill {recovery}", dist, original, recovered=True,
                             recovery_steps=recovery, distilled=True, kl=ev["kl"], **info))
        if not quick and ratio in (0.5, half):  # int8 after the recovery: the intended order (train, then quantize)
            rec_cfg = load_config(os.path.join(out, "config.yaml"))
            rec_loaded = load_model(dataclasses.replace(rec_cfg, source=SourceConfig(path=out)))
            q = compressed(INT8, out + "_int8", source_cfg=rec_cfg, src_loaded=rec_loaded, before=rec)
            rows.append(_row(name, f"{label} + recovery + int8", q["after"], original, rank_ratio=ratio,
                             recovered=True, recovery_steps=recovery, int8=True))
    rep = compressed(INT8, os.path.join(scratch, "int8"))
    rows.append(_row(name, "int8", rep["after"], original, rank_ratio=None, recovered=False, int8=True))
    return rows


def bench_smollm() -> list[dict]:
    name = "SmolLM2-135M"
    cfg = load_config(SMOLLM, ["mesh.data=1"])
    t0 = time.perf_counter()
    loaded = load_model(cfg)
    half = halving_ratio(loaded.model_cfg)
    ratios = sorted({*RATIOS, half}, reverse=True)
    batches = heldout_batches(cfg, loaded.tokenizer, SMOL_EVAL_BATCHES)
    prompt = decode_prompt_ids(loaded.tokenizer)
    original = measure(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh, batches, prompt, DECODE_TOKENS)
    print(f"[{name}] loaded and measured in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [_row(name, "original", original, original, rank_ratio=None, recovered=False,
                 heldout_tokens=int(sum(float(b["weights"].sum()) for b in batches)))]
    settings = [(lowrank(r), f"lowrank {r}" + (" (halves bytes)" if r == half else ""), r) for r in ratios]
    for specs, label, ratio in [*settings, (INT8, "int8", None)]:
        t0 = time.perf_counter()
        new_cfg, graphdef, params, layers = transform_loaded(loaded, specs)
        if not new_cfg.compressed:  # every kernel kept dense: the model is the original, bit for bit
            m, note = original, "no kernel would shrink at this rank: all kept dense (identical to the original)"
        else:
            m, note = measure(graphdef, params, new_cfg, loaded.mesh, batches, prompt, DECODE_TOKENS), None
        rows.append(_row(name, label, m, original, rank_ratio=ratio, recovered=False, int8=specs is INT8,
                         factorized_layers=_factorized(layers), note=note, seconds=round(time.perf_counter() - t0)))
        del params
    return rows


def smollm_diagnosis(rank_ratio: float = 0.95) -> dict:
    """Why plain SVD truncation breaks SmolLM2 (one held-out batch): the factorization itself is exact at full rank,
    and isotropic noise of the same relative weight error as a 0.95-rank truncation costs little, while dropping the
    smallest singular directions costs a lot — the inputs carry energy in exactly those directions."""
    cfg = load_config(SMOLLM, ["mesh.data=1"])
    loaded = load_model(cfg)
    batches = heldout_batches(cfg, loaded.tokenizer, 1)
    ppl = lambda graphdef, params: heldout_metrics(graphdef, params, batches, loaded.mesh)["perplexity"]  # noqa: E731
    out: dict = {"heldout_batches": 1, "original": {"perplexity": ppl(loaded.graphdef, loaded.params)}}
    for label, ratio in (("full rank (forced)", 1.0), (f"rank {rank_ratio} (forced)", rank_ratio)):
        spec = [{"lowrank": {"include": KERNELS, "rank_ratio": ratio, "force": True}}]
        _, graphdef, params, layers = transform_loaded(loaded, spec)
        errors = [r["rel_error"] for r in layers if r.get("action") == "factorized"]
        out[label] = {"perplexity": ppl(graphdef, params), "mean_rel_error": float(np.mean(errors))}
        del params
    rel = out[f"rank {rank_ratio} (forced)"]["mean_rel_error"]
    rng, params = np.random.default_rng(0), loaded.params
    for path in select(describe(loaded.model_cfg)[1], KERNELS, None, "noise"):
        node = get_node(params, path)
        w = np.asarray(node["kernel"], np.float32)
        noise = rng.standard_normal(w.shape).astype(np.float32)
        noise *= rel * np.linalg.norm(w) / np.linalg.norm(noise)
        params = replace_node(params, path, {**node, "kernel": jax.device_put(w + noise, node["kernel"].sharding)})
    out["gaussian noise, same relative error"] = {"perplexity": ppl(loaded.graphdef, params), "rel_error": rel}
    for label, m in out.items():
        if isinstance(m, dict):
            print(f"[SmolLM2-135M diagnosis] {label:36} ppl {m['perplexity']:.2f}", flush=True)
    return out


def check_target(rows: list[dict]) -> dict:
    """Settings with ≤ half the bytes and perplexity within 10 % of the original (after recovery where run)."""
    met = [r for r in rows if r["setting"] != "original" and r["bytes_ratio"] <= 0.5 and r["perplexity_ratio"]
           and r["perplexity_ratio"] <= 1.10]
    lowrank_met = [r for r in met if r.get("rank_ratio") and not r.get("int8")]
    return {"rule": "bytes_ratio <= 0.5 and perplexity_ratio <= 1.10",
            "met_by": [f"{r['model']}: {r['setting']}" for r in met],
            "met_by_lowrank_alone": [f"{r['model']}: {r['setting']}" for r in lowrank_met]}


def write_markdown(out: dict, path: str) -> None:
    lines = [f"# bench_compress ({out['date']}, {out['device']}, jax {out['jax']}, {out['seconds']} s)", "",
             "`python experiments/bench_compress.py` (under `flock /tmp/bench.lock`). Rank ratios r/min(m, n) apply "
             "to every MLP and attention kernel; kernels whose factors would not be smaller stay dense (so 1.0 is the "
             "original); \"halves bytes\" is the largest ratio (step 0.01) whose whole model, embeddings included, "
             "has at most half the bytes. Perplexity: quickstart on its own held-out split; SmolLM2 on the same pydoc "
             f"held-out documents tokenized with its BPE ({SMOL_EVAL_BATCHES} batches of 16x128).", "",
             f"Recovery: {RECOVERY_STEPS} steps fine-tuning the compressed work dir (the `fastserve.train` of its "
             f"config.yaml) at lr {RECOVERY_LR}; \"distill\": the same steps with `train.task=distill` "
             "(alpha 0.5, T 2) and the original as teacher; the 1.0 row's recovery is the control (the original "
             "trained as long). int8 quantizes dense kernels only (low-rank factors stay float32): after recovery it "
             "takes the kernels still dense (at 0.5 the square attention q / o), at the halving ratio none remain. "
             "int8 layers decode through fastserve's C++ kernel (fastserve.kernels) on CPU: fewer bytes and "
             "faster batch-1 decode. SmolLM2 gets no recovery: the "
             "training data pipeline reads sentencepiece tokenizers only, and SmolLM2's is byte-level BPE (the "
             "trainer refuses such a work dir; so does distillation, which trains through the same pipeline).", "",
             "Decode: greedy, batch 1, median step over 32 new tokens; recovered rows reuse the compressed row's "
             "speed (same structure). The CPU is shared: decode speeds vary by ±15 % run to run.", ""]
    for model in dict.fromkeys(r["model"] for r in out["rows"]):
        lines += [f"## {model}", "", "| setting | params | bytes | bytes ratio | held-out ppl | ppl ratio | "
                  "decode tok/s |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in out["rows"] if r["model"] == model):
            ppl = f"{r['perplexity']:.2f}" if r["perplexity"] else "-"
            pr = f"{r['perplexity_ratio']:.3f}" if r["perplexity_ratio"] else "-"
            tps = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
            lines.append(f"| {r['setting']} | {r['parameters'] / 1e6:.3f}M | {r['bytes'] / 1e6:.2f} MB | "
                         f"{r['bytes_ratio']:.3f} | {ppl} | {pr} | {tps} |")
        lines.append("")
    if out.get("smollm_diagnosis"):
        d = out["smollm_diagnosis"]
        lines += ["## Why low-rank breaks SmolLM2 (one held-out batch)", "",
                  "| weights | rel. weight error | held-out ppl |", "|---|---:|---:|"]
        for label, m in d.items():
            if isinstance(m, dict):
                err = m.get("mean_rel_error", m.get("rel_error"))
                lines.append(f"| {label} | {'-' if err is None else f'{err:.3f}'} | {m['perplexity']:.2f} |")
        lines += ["", "The factorization is exact at full rank, and random noise of the same size as a 0.95-rank "
                  "truncation barely moves perplexity, but dropping the smallest singular directions wrecks it — presumably "
                  "the activations carry large energy along them (outlier features). Plain weight SVD cannot "
                  "compress this model; an activation-aware SVD (calibrated on inputs) and/or a recovery fine-tune "
                  "would be needed.", ""]
    t = out["target"]
    lines += ["## Target: half the bytes, perplexity within 10 %", "",
              f"Met by: {', '.join(t['met_by']) or 'none'}.", "",
              f"Met by low-rank alone (no int8): {', '.join(t['met_by_lowrank_alone']) or 'none'}.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    styles = {"original": ("k", "*", "original"), "lowrank": ("tab:blue", "o", "low-rank"),
              "recovered": ("tab:green", "s", "low-rank + recovery"), "int8": ("tab:red", "^", "int8"),
              "distilled": ("tab:orange", "P", "low-rank + distillation"),
              "both": ("tab:purple", "D", "low-rank + recovery + int8")}
    for ax, model in zip(axes[0], models):
        mr = [r for r in rows if r["model"] == model and r["perplexity"]]
        orig = next(r for r in mr if r["setting"] == "original")
        seen = set()
        for r in mr:
            kind = ("original" if r["setting"] == "original" else "both" if r.get("int8") and r.get("rank_ratio")
                    else "int8" if r.get("int8") else "distilled" if r.get("distilled")
                    else "recovered" if r.get("recovered") else "lowrank")
            c, mk, label = styles[kind]
            ax.scatter(r["bytes"] / 1e6, r["perplexity"], color=c, marker=mk, s=60,
                       label=None if kind in seen else label, zorder=4 if kind == "original" else 3)
            seen.add(kind)
            if r.get("rank_ratio") and r["rank_ratio"] < 1.0:
                ax.annotate(f"{r['rank_ratio']}", (r["bytes"] / 1e6, r["perplexity"]), textcoords="offset points",
                            xytext=(5, 4), fontsize=8)
        ax.axhline(1.1 * orig["perplexity"], color="gray", ls="--", lw=1, label="1.1 x original perplexity")
        ax.axvline(0.5 * orig["bytes"] / 1e6, color="gray", ls=":", lw=1, label="0.5 x original bytes")
        if max(r["perplexity"] for r in mr) > 5 * orig["perplexity"]:
            ax.set_yscale("log")
        ax.set_xlabel("parameter bytes (MB)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scratch", default=os.path.join(REPO, "runs", "bench_compress"),
                    help="scratch work dirs (the trained base is reused by a re-run)")
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--render", action="store_true", help="only redraw the .md and .png from the recorded .json")
    ap.add_argument("--smollm-diagnosis", action="store_true",
                    help="only (re)run the SmolLM2 diagnosis into the recorded .json, then redraw")
    args = ap.parse_args()
    if args.render or args.smollm_diagnosis:
        with open(os.path.join(RESULTS, "bench_compress.json")) as f:
            out = json.load(f)
        if args.smollm_diagnosis:
            out["smollm_diagnosis"] = smollm_diagnosis()
            with open(os.path.join(RESULTS, "bench_compress.json"), "w") as f:
                json.dump(out, f, indent=1)
        write_markdown(out, os.path.join(RESULTS, "bench_compress.md"))
        plot(out["rows"], os.path.join(RESULTS, "bench_compress.png"))
        return 0
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_start, t0 = os.getloadavg()[0], time.perf_counter()
    scratch = args.scratch + ("_quick" if args.quick else "")
    rows = bench_quickstart(scratch, args.quick)
    diagnosis = None
    if not args.quick and not args.skip_smollm:
        rows += bench_smollm()
        diagnosis = smollm_diagnosis()
    out = {"bench": "compress", "quick": args.quick, "rows": rows, "target": check_target(rows),
           "recovery_lr": RECOVERY_LR, "decode_tokens": 8 if args.quick else DECODE_TOKENS, "jax": jax.__version__,
           "device": str(jax.devices()[0].device_kind), "date": time.strftime("%Y-%m-%d"), **provenance(),
           "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
           "seconds": round(time.perf_counter() - t0), "smollm_diagnosis": diagnosis}
    if not args.quick:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "bench_compress.json"), "w") as f:
            json.dump(out, f, indent=1)
        write_markdown(out, os.path.join(RESULTS, "bench_compress.md"))
        plot(rows, os.path.join(RESULTS, "bench_compress.png"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
