"""Writes experiments/README.md: one table of every benchmark's latest recorded result (experiments/results/*.json)
with its command, date, commit, machine and headline figures as ratios.

    python experiments/summarize.py            # rewrite experiments/README.md
    python experiments/summarize.py --check    # exit 1 when the README is stale (tests/test_experiments_table.py)

A benchmark states its own headline by recording `headline: {figure: value}` in its JSON; the older benchmarks,
which predate that convention, are read by the extractors below.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"


def _compress(d: dict) -> dict:
    rows = {r["setting"]: r for r in d["rows"] if r["model"] == "quickstart"}
    best = [r for r in d["rows"] if r.get("bytes_ratio", 1) <= 0.5 and r.get("perplexity_ratio", 9) <= 1.10]
    out = {"settings meeting bytes ≤ 0.5× and perplexity ≤ 1.10×": len(best)}
    if best:
        r = min(best, key=lambda r: r["perplexity_ratio"])
        out["best: perplexity ratio"] = f"{r['perplexity_ratio']:.3f} ({r['model']}: {r['setting']})"
    del rows
    return out


def _decode(d: dict) -> dict:
    b1 = d["results"]["batch_1"]
    return {"batch 1 tokens/s": b1["inprocess"]["tokens_per_s"], "exported / in-process": b1["exported_vs_inprocess"],
            "step / bandwidth bound": b1["inprocess_step_over_bound"],
            "batch 16 tokens/s": d["results"]["batch_16"]["inprocess"]["tokens_per_s"]}


def _quickstart(d: dict) -> dict:
    return {"held-out loss": f"{d['held_out_loss_step0']} → {d['held_out_loss_final']}",
            "claim met": d["claim_met"], "tokens/s (median)": d["tokens_per_s_median"]}


def _recipes(d: dict) -> dict:
    return {r["recipe"].split("/")[-1]: f"{r['metric']} {r['value']} (claim ≥ {r['claim']})" for r in d["rows"]}


def _serving(d: dict) -> dict:
    t = d["targets"]
    high = set(t["high_load_rates"])
    by_rate = {r: v for r, v in t["fcfs_over_mlfq_mean_jct_by_rate"].items() if r in high}
    return {"MLFQ over static (req/s at p99 SLO)": t["mlfq_over_static"],
            "FCFS / MLFQ mean JCT at high load": f"{min(by_rate.values())}–{max(by_rate.values())} (goal 2×)"}


def _train(d: dict) -> dict:
    return {"fastserve / eager PyTorch tokens/s": d["ratio_tokens_per_s_jax_over_torch"],
            "MFU (vs measured matmul peak)": d["jax"]["mfu"]}


def _finetune(d: dict) -> dict:
    m, g = d["minilm"], d["goals"]
    return {"MiniLM fastserve / PyTorch examples/s": m["ratio_examples_per_s"], "test accuracy gap": g["accuracy_gap"],
            "over TF-IDF (goal ≥ 0.03)": g["over_tfidf"]}


def _encoder_tasks(d: dict) -> dict:
    t = d["tagging"]
    return {"tagging fastserve / PyTorch tokens/s": t["ratio_tokens_per_s"]}


def _fusion(d: dict) -> dict:
    h = d["heldout_loss"]
    return {"held-out loss base / best member / greedy soup / ensemble":
            f"{h['base']} / {min(v for k, v in h.items() if k.startswith('lr='))} / {h['greedy_soup']} / {h['ensemble']}",
            "ensemble / one model tokens/s": d["forward_tokens_per_s"]["ratio"]}


def _translate(d: dict) -> dict:
    return {"test BLEU greedy / beam 4 (copy baseline)":
            f"{d['greedy']['bleu']:.2f} / {d['beam4']['bleu']:.2f} ({d['copy_baseline']['bleu']:.2f})",
            "KV-cache speed-up": d["kv_cache_speedup"]}


def _vision(d: dict) -> dict:
    return {"MLP fastserve / Keras examples/s": d["mlp"]["ratio_wall"], "MLP accuracy gap (pt)": d["mlp"]["accuracy_gap_points"],
            "CNN fastserve / Keras examples/s": d["cnn"]["ratio_wall"], "ResNet-18 images/s": d["resnet"]["images_per_s_wall"]}


def _vision_recipe(d: dict) -> dict:
    return {f"{d['recipe']} test accuracy": f"{d['test_accuracy']} (claim ≥ {d['claim_test_accuracy']})",
            "met": d["met"]}


EXTRACTORS = {"bench_compress": _compress, "bench_decode": _decode, "bench_quickstart": _quickstart,
              "bench_recipes": _recipes, "bench_serving": _serving, "bench_train": _train,
              "bench_finetune": _finetune, "bench_encoder_tasks": _encoder_tasks, "bench_fusion": _fusion,
              "bench_fusion_quick": _fusion, "bench_translate": _translate, "bench_vision": _vision,
              "bench_vision_recipe_cnn": _vision_recipe, "bench_vision_recipe_resnet": _vision_recipe}
# results written by a mode of another script
COMMANDS = {"bench_fusion_quick": "python experiments/bench_fusion.py --quick",
            "bench_vision_recipe_cnn": "python experiments/bench_vision.py --recipe cnn",
            "bench_vision_recipe_resnet": "python experiments/bench_vision.py --recipe resnet"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def row(name: str, d: dict) -> str:
    headline = d.get("headline") or (EXTRACTORS[name](d) if name in EXTRACTORS else {})
    if isinstance(headline, str):            # a benchmark may record its headline as one sentence
        headline = {"": headline}
    figures = "; ".join(f"{k}: {_fmt(v)}" if k else str(v) for k, v in headline.items()) or "(no headline recorded)"
    prov = d.get("provenance") if isinstance(d.get("provenance"), dict) else d
    commit = prov.get("commit")
    commit = f"`{commit[:7]}`{' (dirty)' if prov.get('dirty') else ''}" if commit and commit != "unknown" else "not recorded"
    recorded_on = prov.get("recorded_on") or {}
    machine = d.get("machine") or d.get("device") or (f"{d['cpu_count']} CPU cores" if d.get("cpu_count") else
                                                      recorded_on.get("machine") or "not recorded")
    command = d.get("command") or COMMANDS.get(name) or f"python experiments/{name}.py"
    plots = " ".join(f"[plot](results/{p.name})" for p in sorted(RESULTS.glob(f"{name}*.png")))
    notes = " ".join(f"[notes](results/{p.name})" for p in sorted(RESULTS.glob(f"{name}*.md")))
    date = str(d.get("date") or recorded_on.get("date") or "")[:10]
    return (f"| {name} | `{command}` | {date} | {commit} | {machine} | {figures} | "
            f"{' '.join(x for x in (notes, plots) if x)} |")


def render() -> str:
    rows = []
    for path in sorted(RESULTS.glob("bench_*.json")):
        rows.append(row(path.stem, json.loads(path.read_text())))
    return "\n".join([
        "# Benchmarks",
        "",
        "Every benchmark's latest recorded result (`experiments/results/*.json`), written by "
        "`python experiments/summarize.py`; do not edit by hand. Each benchmark prints its figures as one JSON "
        "object on its last line, records the commit it measured (and whether the tree was dirty), and has a "
        "`--quick` mode. Peers are measured in the same run, interleaved; figures are ratios where a peer or a "
        "hardware limit exists. A result recorded at an older commit than the code it measures is stale: re-run it.",
        "",
        "| benchmark | command | date | commit | machine | headline | details |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if experiments/README.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not README.exists() or README.read_text() != text:
            print("experiments/README.md is stale: run python experiments/summarize.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(text)
    print(json.dumps({"wrote": str(README), "benchmarks": text.count("\n| bench_")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
