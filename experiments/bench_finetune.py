"""Fine-tuning all-MiniLM-L6-v2 on the fine-food sentiment reviews in fastserve and, in the same run, with Hugging Face
transformers on CPU PyTorch (BertForSequenceClassification from the same weights directory): the same batches in
the same order (fastserve's data pipeline makes them once; both sides consume them), the same sequence length,
batch size, steps, AdamW settings, learning-rate schedule, clipping and dropout. Phases alternate (`--phase` steps of
fastserve, then the same steps of PyTorch, …) so both see the same machine load; the first step of each padded
length (a compile in fastserve, a warm-up in PyTorch) is left out of both sides' examples/s. Then test accuracy and
macro-F1 of each, the majority-class and TF-IDF + logistic-regression baselines, and (full mode) the other
sentiment recipes trained as their headers say and scored on the test split.

    python experiments/bench_finetune.py            # configs/sentiment_minilm.yaml as written + the recipes
    python experiments/bench_finetune.py --quick    # a few minutes: 4 steps a side, test on 32 reviews, no recipes
    # what the recipe's header records (2 epochs; PyTorch on the first 16 batches only; test also after epoch 1):
    python experiments/bench_finetune.py --part minilm --peer-steps 16 --phase 8 --eval-at 216

Goals (issue 11): fastserve ≥ 1.0× PyTorch's examples/s at equal test accuracy (± 1 point); the fine-tuned MiniLM at
least 3 points above TF-IDF + logistic regression. Prints one JSON object on its last line; writes
experiments/results/bench_finetune.json and .md (full mode).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import islice

import numpy as np

from finetune_peers import TorchBertClassifier, baselines, scores
from provenance import provenance  # experiments/: the script's own directory is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = "configs/sentiment_minilm.yaml"
RECIPES = {"scratch": "configs/sentiment_scratch.yaml", "bilstm": "configs/sentiment_bilstm.yaml"}
# the test accuracy each recipe's header claims, at least (a recipe run that reaches less is reported as not met)
RECIPE_CLAIMS = {"bilstm": 0.78, "scratch": 0.77}


class FastserveClassifier:
    """The run `cfg` describes, driven step by step through the core (the same state, steps and data as
    `python -m fastserve.train`), so its phases can alternate with another framework's."""

    def __init__(self, cfg):
        from fastserve.core.setup import prepare_state
        from fastserve.core.state import merge_trees
        from fastserve.core.steps import make_eval_step, make_train_step
        from fastserve.data.dataset import fill_model_config
        from fastserve.tasks import make_task

        self.task = make_task(cfg.train.task)
        cfg = self.task.configure(cfg)
        self.data = cfg.data.load(cfg)
        self.cfg = cfg = dataclasses.replace(cfg, model=fill_model_config(cfg.model, self.data.model_fields))
        setup = prepare_state(cfg, restore=False)
        self.mesh, self.state = setup.mesh, setup.state
        self.train_step = make_train_step(setup.graphdef, self.task, setup.tx, setup.schedule, setup.shardings,
                                          setup.mesh, {})
        shardings = merge_trees(setup.shardings["params"], setup.shardings["model_state"])
        self.eval_step = make_eval_step(setup.graphdef, self.task, shardings, setup.mesh, {})
        self.merge_trees = merge_trees
        setup.checkpointer.close()

    def step(self, host_batch) -> float:
        import jax

        from fastserve import parallel
        from fastserve.core.steps import split_micro_batches

        batch = parallel.host_to_global(split_micro_batches(host_batch, 1), self.mesh, leading=1)
        self.state, metrics = self.train_step(self.state, batch, {})
        metrics = jax.device_get(metrics)
        return float(metrics["loss_sum"]) / max(float(metrics["weight"]), 1e-9)

    def evaluate(self, batches) -> dict[str, float]:
        from fastserve.core.trainer import evaluate_params

        variables = self.merge_trees(self.state["params"], self.state["model_state"])
        m = evaluate_params(self.eval_step, variables, batches, self.task, self.mesh, {})
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "loss": m["loss"]}


def test_batches(fs: FastserveClassifier, test_texts, test_labels):
    from fastserve.data.encoder_text import encode_texts, heldout_text_batches, length_buckets

    d = fs.cfg.data
    enc = encode_texts(fs.data.tokenizer, test_texts, d.seq_len)
    return heldout_text_batches(enc, test_labels, d.batch_size, sorted(d.buckets) or length_buckets(d.seq_len),
                                fs.data.tokenizer.pad_id)


def hf_directory(cfg) -> str:
    """The Hugging Face directory the fastserve run initializes from (`package:NAME/DIR` resolved)."""
    from fastserve.workdir import resolve_path

    return resolve_path(cfg.train.init_from)


def compare(cfg, steps: int, phase: int, n_test: int, splits, peer_steps: int | None = None,
            eval_at: tuple[int, ...] = ()) -> dict:
    """Alternating phases of fastserve and PyTorch steps on the same batches; test metrics of both. With `peer_steps`
    < `steps`, PyTorch trains (and is timed on) only the first `peer_steps` batches, interleaved as before, and is not
    scored on test (its schedule still spans `steps`, so the window is the same recipe's start); fastserve goes on
    alone to `steps`. `eval_at`: earlier steps at which fastserve is also scored on test."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    peer_steps = steps if peer_steps is None else min(peer_steps, steps)
    t0 = time.perf_counter()
    fs = FastserveClassifier(cfg)
    fs_setup_s = time.perf_counter() - t0
    o = cfg.optimizer
    t0 = time.perf_counter()
    pt = TorchBertClassifier(hf_directory(cfg), 2, o.learning_rate, min(o.warmup_steps, steps), steps,
                             o.weight_decay, o.clip_norm, o.b1, o.b2, o.eps, cfg.train.seed,
                             cfg.model.attention_dropout) if peer_steps > 0 else None
    pt_setup_s = time.perf_counter() - t0
    batches = list(islice(fs.data.train, steps))
    test_x, test_y = splits["test"]
    tb = test_batches(fs, test_x[:n_test], test_y[:n_test]) if n_test else []
    seen: set[int] = set()
    timed = {"fastserve": [0.0, 0], "pytorch": [0.0, 0]}
    window = {"fastserve": [0.0, 0], "pytorch": [0.0, 0]}     # the interleaved steps only: the speed ratio's
    losses = {"fastserve": [], "pytorch": []}
    compile_s = {"fastserve": 0.0, "pytorch": 0.0}
    t_train, earlier = time.perf_counter(), {}
    for start in range(0, steps, phase):
        sides = [("fastserve", fs.step, steps)] + ([("pytorch", pt.train_step, peer_steps)] if start < peer_steps
                                                   else [])
        for name, run, last in sides:
            for i in range(start, min(start + phase, last)):
                b = batches[i]
                t = time.perf_counter()
                losses[name].append(run(b))
                dt = time.perf_counter() - t
                length = b["inputs"].shape[1]
                first = (name, length) not in seen
                seen.add((name, length))
                if first:                          # a new padded length: compile / warm-up, not throughput
                    compile_s[name] += dt
                else:
                    timed[name][0] += dt
                    timed[name][1] += len(b["inputs"])
                    if i < peer_steps:
                        window[name][0] += dt
                        window[name][1] += len(b["inputs"])
        done = min(start + phase, steps)
        print(json.dumps({"step": done, "loss_fastserve": round(float(np.mean(losses["fastserve"][-phase:])), 4),
                          **({"loss_pytorch": round(float(np.mean(losses["pytorch"][-phase:])), 4)}
                             if start < peer_steps else {}),
                          "wall_s": round(time.perf_counter() - t_train, 1)}), flush=True)
        if done in eval_at and done < steps:
            earlier[done] = fs.evaluate(tb)
            print(json.dumps({"step": done, "test_fastserve": earlier[done]}), flush=True)
    t = time.perf_counter()
    fs_test = fs.evaluate(tb) if n_test else {}
    fs_eval_s = time.perf_counter() - t
    pt_test, pt_eval_s = {}, None
    if pt is not None and peer_steps == steps and n_test:
        t = time.perf_counter()
        pt_test = scores(pt.predict(tb), np.asarray(test_y[:n_test]))
        pt_eval_s = round(time.perf_counter() - t, 1)
    rate = {k: v[1] / max(v[0], 1e-9) for k, v in timed.items()}
    in_window = {k: v[1] / max(v[0], 1e-9) for k, v in window.items()}
    window_loss = {k: round(float(np.mean(v[:peer_steps])), 4) for k, v in losses.items() if v}
    lengths = sorted({b["inputs"].shape[1] for b in batches})
    return {"steps": steps, "batch_size": cfg.data.batch_size, "max_len": cfg.data.seq_len, "padded_lengths": lengths,
            "mean_padded_length": round(float(np.mean([b["inputs"].shape[1] for b in batches])), 1),
            "phase_steps": phase, "peer_steps": peer_steps, "test_examples": len(test_y[:n_test]),
            "mean_loss_first_peer_steps": window_loss,
            "fastserve": {"examples_per_s": round(rate["fastserve"], 2), "timed_examples": timed["fastserve"][1],
                          "setup_s": round(fs_setup_s, 1), "first_step_per_length_s": round(compile_s["fastserve"], 1),
                          "train_wall_s": round(time.perf_counter() - t_train - fs_eval_s, 1),
                          "test_eval_s": round(fs_eval_s, 1),
                          "final_loss": round(float(np.mean(losses["fastserve"][-10:])), 4), **fs_test,
                          "test_at_step": {str(k): v for k, v in earlier.items()}},
            "pytorch": {"examples_per_s": round(rate["pytorch"], 2), "timed_examples": timed["pytorch"][1],
                        "trained_steps": len(losses["pytorch"]),
                        "setup_s": round(pt_setup_s, 1), "first_step_per_length_s": round(compile_s["pytorch"], 1),
                        "test_eval_s": pt_eval_s,
                        "final_loss": round(float(np.mean(losses["pytorch"][-10:])), 4) if losses["pytorch"] else None,
                        **pt_test, "threads": torch.get_num_threads()},
            "window_examples_per_s": {k: round(v, 2) for k, v in in_window.items()},
            "window_timed_examples": {k: v[1] for k, v in window.items()},
            # fastserve's and PyTorch's examples/s on the same interleaved steps (the first peer_steps)
            "ratio_examples_per_s": round(in_window["fastserve"] / max(in_window["pytorch"], 1e-9), 3)}


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_recipe(name: str, recipe: str, overrides: list[str]) -> dict:
    """Trains `recipe` as written (in a fresh work dir) and scores its final checkpoint on the test split."""
    workdir = os.path.join(tempfile.mkdtemp(prefix=f"fastserve-{name}-"), "run")
    env = dict(os.environ, PYTHONPATH=REPO)
    py = sys.executable
    t0, cpu0 = time.time(), _children_cpu_s()
    train = subprocess.run([py, "-m", "fastserve.train", "--config", recipe, f"train.workdir={workdir}",
                            *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    train_s, train_cpu_s = time.time() - t0, _children_cpu_s() - cpu0
    if train.returncode:
        return {"recipe": recipe, "error": (train.stderr or train.stdout)[-2000:]}
    ev = subprocess.run([py, "-m", "fastserve.evaluate", "--config", os.path.join(workdir, "config.yaml"),
                         "data.eval_split=test", "train.eval_batches=0"], cwd=REPO, env=env, capture_output=True,
                        text=True)
    if ev.returncode:
        return {"recipe": recipe, "error": (ev.stderr or ev.stdout)[-2000:]}
    test = json.loads(ev.stdout.strip().splitlines()[-1])
    val = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    val = [r for r in val if r.get("split") == "eval" or "accuracy" in r]
    return {"recipe": recipe, "overrides": overrides, "train_wall_s": round(train_s, 1),
            "train_cpu_s": round(train_cpu_s, 1),
            "validation_accuracy": (val[-1].get("accuracy") if val else None),
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"), "test_loss": test.get("loss")}


def pretraining_done() -> bool:
    """Whether runs/mlm_pretrain holds a checkpoint of its last step (configs/mlm_pretrain.yaml's train.steps)."""
    import fastserve

    run = os.path.join(REPO, "runs", "mlm_pretrain")
    if not os.path.isfile(os.path.join(run, "config.yaml")) or not os.path.isdir(os.path.join(run, "checkpoints")):
        return False
    steps = [int(d) for d in os.listdir(os.path.join(run, "checkpoints")) if d.isdigit()]
    return bool(steps) and max(steps) >= fastserve.load_config(os.path.join(run, "config.yaml")).train.steps


def recipe_overrides(name: str) -> list[str]:
    """The scratch recipe starts from a finished runs/mlm_pretrain; without one it runs from random init (its own
    tokenizer trained on the training reviews), and the result says so."""
    if name == "scratch" and not pretraining_done():
        return ["train.init_from=", "tokenizer.path="]
    return []


def markdown(r: dict) -> str:
    c, b = r["minilm"], r["baselines"]
    lines = [f"# bench_finetune — sentiment fine-tuning (commit {r['commit'][:10]}{' dirty' if r['dirty'] else ''}, "
             f"{r['date']})", "",
             f"all-MiniLM-L6-v2 fine-tuned for {c['steps']} steps of batch {c['batch_size']} (max_len {c['max_len']}, "
             f"padded lengths {c['padded_lengths']}), phases of {c['phase_steps']} steps alternating; test on "
             f"{c['test_examples']} reviews.", "",
             "| run | test accuracy | test macro-F1 | train examples/s |", "|---|---|---|---|"]
    for side in ("fastserve", "pytorch"):
        s = c[side]
        if "accuracy" in s:
            span = f" (all {c['steps']} steps)" if c.get("peer_steps", c["steps"]) < c["steps"] else ""
            lines.append(f"| MiniLM, {side}{span} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} | "
                         f"{s['examples_per_s']:.2f} |")
        else:
            lines.append(f"| MiniLM, {side} (first {s['trained_steps']} steps only, not scored) | | | "
                         f"{s['examples_per_s']:.2f} |")
    lines.append(f"| majority class | {b['majority']['accuracy']:.3f} | {b['majority']['macro_f1']:.3f} | |")
    lines.append(f"| TF-IDF + logistic regression (C={b['tfidf_logreg']['C']}) | {b['tfidf_logreg']['accuracy']:.3f} | "
                 f"{b['tfidf_logreg']['macro_f1']:.3f} | |")
    for name, rec in r.get("recipes", {}).items():
        if "error" in rec:
            lines.append(f"| {rec['recipe']} | error | | |")
        else:
            init = " (random init: no runs/mlm_pretrain)" if "train.init_from=" in rec["overrides"] else ""
            lines.append(f"| {rec['recipe']}{init} ({rec['train_wall_s']:.0f} s) | {rec['test_accuracy']:.3f} | "
                         f"{rec['test_macro_f1']:.3f} | |")
    w = c.get("speed_window")
    if w:
        lines += ["", f"Speed ratio from a separate window (`--speed-only {w['steps']}`, commit {w['commit'][:10]}): the "
                  f"recipe's first {w['steps']} batches (padded lengths {w['padded_lengths']}), fastserve and PyTorch "
                  f"alternating every {w['phase_steps']} steps: {w['examples_per_s']['fastserve']:.2f} vs "
                  f"{w['examples_per_s']['pytorch']:.2f} examples/s."]
    g = r["goals"]
    equal = ("not measured (PyTorch trained a window only; mean loss over it: "
             f"{c.get('mean_loss_first_peer_steps')})" if g["accuracy_gap"] is None else
             f"{g['accuracy_gap']:+.3f} (goal ±0.01: {'met' if g['equal_accuracy'] else 'missed'})")
    ratio = ("not measured on the same steps" if c["ratio_examples_per_s"] is None else
             f"**{c['ratio_examples_per_s']:.3f}** (goal ≥ 1.0: {'met' if g['ratio'] else 'missed'})")
    lines += ["", f"fastserve / PyTorch examples/s: {ratio}; accuracy difference {equal}; MiniLM − TF-IDF "
              f"{g['over_tfidf']:+.3f} accuracy, {g.get('over_tfidf_macro_f1', float('nan')):+.3f} macro-F1 "
              f"(goal ≥ 0.03: {'met' if g['beats_tfidf'] else 'missed'})."]
    return "\n".join(lines) + "\n"


def speed_only(args, out: str, splits) -> int:
    """The first STEPS batches of configs/sentiment_minilm.yaml, fastserve and PyTorch interleaved; the examples/s of
    each (first step of each padded length left out) merged into the recorded full run."""
    import fastserve

    cfg = fastserve.load_config(MINILM, [f"train.workdir={tempfile.mkdtemp(prefix='fastserve-minilm-')}",
                                         *args.overrides])
    r = compare(cfg, args.speed_only, args.phase or max(1, args.speed_only // 4), 0, splits)
    window = {"steps": r["steps"], "phase_steps": r["phase_steps"], "padded_lengths": r["padded_lengths"],
              "examples_per_s": r["window_examples_per_s"], "timed_examples": r["window_timed_examples"],
              "ratio_examples_per_s": r["ratio_examples_per_s"], "mean_loss": r["mean_loss_first_peer_steps"],
              "date": time.strftime("%Y-%m-%d"), **provenance()}
    print(json.dumps({"speed_window": window}), flush=True)
    if os.path.isfile(out + ".json") and not args.quick:
        with open(out + ".json") as f:
            result = json.load(f)
        result["minilm"]["speed_window"] = window
        result["minilm"]["ratio_examples_per_s"] = window["ratio_examples_per_s"]
        result["goals"]["ratio"] = window["ratio_examples_per_s"] >= 1.0
        with open(out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(markdown(result))
    return 0


def main() -> int:
    import fastserve
    from fastserve.data.reviews import load_reviews

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phase", type=int, default=0, help="steps per alternating phase (default: steps / 4)")
    ap.add_argument("--part", choices=("all", "minilm", "recipes"), default="all",
                    help="minilm: the comparison and baselines only; recipes: only the recipes (merged into the "
                         "recorded result, so the two can run as separate processes)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="which recipes to run (comma-separated)")
    ap.add_argument("--peer-steps", type=int, default=None,
                    help="PyTorch trains (interleaved, timed) only the first N steps and is not scored on test; "
                         "default: the whole run")
    ap.add_argument("--eval-at", default="", help="earlier steps at which fastserve is also scored on test (comma-"
                                                  "separated)")
    ap.add_argument("--speed-only", type=int, default=0, metavar="STEPS",
                    help="only the speed ratio: STEPS interleaved steps a side, nothing scored; merged into the "
                         "recorded result as minilm.speed_window (and goals.ratio)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of configs/sentiment_minilm.yaml")
    args = ap.parse_args()
    os.chdir(REPO)
    t_start = time.time()
    out = os.path.join(REPO, "experiments", "results", "bench_finetune")
    splits = load_reviews()
    result = {"bench": "finetune", "quick": args.quick, "date": time.strftime("%Y-%m-%d"), **provenance()}
    if args.speed_only:
        return speed_only(args, out, splits)
    if args.part != "recipes":
        result["baselines"] = baselines(splits)
        print(json.dumps({"baselines": result["baselines"]}), flush=True)
        workdir = tempfile.mkdtemp(prefix="fastserve-minilm-")
        cfg = fastserve.load_config(MINILM, [f"train.workdir={workdir}", "data.eval_split=test", *args.overrides])
        steps = 4 if args.quick else cfg.train.steps
        n_test = 32 if args.quick else len(splits["test"][0])
        phase = args.phase or max(1, steps // 4)
        eval_at = tuple(int(x) for x in args.eval_at.split(",") if x)
        peer = None if args.peer_steps is None else (min(args.peer_steps, 2) if args.quick else args.peer_steps)
        result["minilm"] = compare(cfg, steps, phase, n_test, splits, peer, eval_at)
        result["minilm"]["overrides"] = args.overrides
        print(json.dumps({"minilm": result["minilm"]}), flush=True)
    if args.part != "minilm" and not args.quick:
        chosen = [n for n in args.recipes.split(",") if n]
        unknown = sorted(set(chosen) - set(RECIPES))
        if unknown:
            raise SystemExit(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
        result["recipes"] = {name: run_recipe(name, RECIPES[name], recipe_overrides(name)) for name in chosen}
        for name, rec in result["recipes"].items():
            rec.update(commit=result["commit"], dirty=result["dirty"], date=result["date"])
            if name in RECIPE_CLAIMS and "test_accuracy" in rec:
                rec.update(claim=RECIPE_CLAIMS[name], met=rec["test_accuracy"] >= RECIPE_CLAIMS[name])
        print(json.dumps({"recipes": result["recipes"]}), flush=True)
    if not args.quick and args.part != "all" and os.path.isfile(out + ".json"):
        with open(out + ".json") as f:          # keep the other part's recorded result
            earlier = json.load(f)
        for key in ("baselines", "minilm"):
            if key not in result and key in earlier:
                result[key] = earlier[key]
        result["recipes"] = {**earlier.get("recipes", {}), **result.get("recipes", {})}
    if "minilm" not in result:              # the recipes alone so far: recorded for the minilm part to merge
        if not args.quick:
            with open(out + ".json", "w") as f:
                json.dump(result, f, indent=1)
        print(json.dumps(result))
        return 0
    fs, pt = result["minilm"]["fastserve"], result["minilm"]["pytorch"]
    gap = fs["accuracy"] - pt["accuracy"] if "accuracy" in pt else None   # None: PyTorch ran a window only
    over = fs["accuracy"] - result["baselines"]["tfidf_logreg"]["accuracy"]
    over_f1 = fs["macro_f1"] - result["baselines"]["tfidf_logreg"]["macro_f1"]
    ratio = result["minilm"]["ratio_examples_per_s"]     # None: a recorded run whose ratio was withdrawn
    result["goals"] = {"ratio": None if ratio is None else ratio >= 1.0,
                       "accuracy_gap": None if gap is None else round(gap, 4),
                       "equal_accuracy": None if gap is None else abs(gap) <= 0.01, "over_tfidf": round(over, 4),
                       "over_tfidf_macro_f1": round(over_f1, 4), "beats_tfidf": over >= 0.03}
    result["wall_s"] = round(time.time() - t_start, 1)
    if not args.quick:
        with open(out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
