"""Token tagging on the KJV's Strong's / translators'-additions markup (configs/tag_strongs.yaml) in fastserve and, in
the same run, with Hugging Face transformers on CPU PyTorch (BertForTokenClassification of the same size, from
scratch): the same batches in the same order (fastserve's data pipeline makes them once; both sides consume them),
the same steps, AdamW settings, linear schedule, clipping and dropout. Phases alternate (`--phase` steps of
fastserve, then of PyTorch) so both see the same machine load; in full mode PyTorch trains only the first
`--peer-steps` (default 100) and both are scored there, fastserve continues to the recipe's steps; the first
step of each padded length (a compile, a warm-up) is left out of both sides' tokens/s. Both are scored on the held-out books with the same rules (token
accuracy over words; conlleval span F1, fastserve.tasks.spans), beside the most-frequent-tag-per-word baseline.

Full mode also reads the masked-LM pretraining run of configs/mlm_pretrain.yaml (`--mlm-workdir`, default
runs/mlm_pretrain: its metrics.jsonl) and reports its held-out masked-token perplexity at each evaluation;
`--mlm-only` re-records just that part (the pretraining takes far longer than the tagging runs).

    python experiments/bench_encoder_tasks.py            # tag_strongs.yaml as written, the peer for 100 steps
    python experiments/bench_encoder_tasks.py --quick    # 40 steps a side, 20 held-out batches (12.7 min wall
                                                         # measured under heavy load from other jobs; most of it
                                                         # reading the KJV, the tokenizer and PyTorch's steps)

Prints one JSON object on its last line; writes experiments/results/bench_encoder_tasks.json (full mode).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from itertools import islice
from typing import Any

import numpy as np

from provenance import provenance  # experiments/: the script's own directory is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG_RECIPE = "configs/tag_strongs.yaml"


class FastserveRun:
    """The run `cfg` describes, driven step by step through the core (the same state, steps and data as
    `python -m fastserve.train`), so its phases can alternate with another framework's."""

    def __init__(self, cfg: Any):
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
        self.eval_step = make_eval_step(setup.graphdef, self.task,
                                        merge_trees(setup.shardings["params"], setup.shardings["model_state"]),
                                        setup.mesh, {})
        self.merge_trees = merge_trees
        setup.checkpointer.close()

    def step(self, host_batch: dict) -> float:
        import jax

        from fastserve import parallel
        from fastserve.core.steps import split_micro_batches

        batch = parallel.host_to_global(split_micro_batches(host_batch, 1), self.mesh, leading=1)
        self.state, metrics = self.train_step(self.state, batch, {})
        metrics = jax.device_get(metrics)
        return float(metrics["loss_sum"]) / max(float(metrics["weight"]), 1e-9)

    def evaluate(self, batches: list[dict]) -> dict[str, float]:
        from fastserve.core.trainer import evaluate_params

        variables = self.merge_trees(self.state["params"], self.state["model_state"])
        return evaluate_params(self.eval_step, variables, batches, self.task, self.mesh, {})


class TorchBertTagger:
    """`BertForTokenClassification` of the fastserve model's size, from scratch, trained as fastserve's optimizer
    config does: AdamW (weight decay on matrices only), linear warmup then linear decay to 0, global-norm clipping."""

    def __init__(self, model_cfg: Any, opt: Any, total_steps: int, seed: int):
        import torch
        from transformers import BertConfig, BertForTokenClassification, get_linear_schedule_with_warmup

        torch.manual_seed(seed)
        self.torch = torch
        config = BertConfig(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model,
                            num_hidden_layers=model_cfg.n_layers, num_attention_heads=model_cfg.n_heads,
                            intermediate_size=model_cfg.d_ff, max_position_embeddings=model_cfg.max_seq_len,
                            type_vocab_size=max(model_cfg.type_vocab_size, 1), hidden_dropout_prob=model_cfg.dropout,
                            attention_probs_dropout_prob=model_cfg.attention_dropout, layer_norm_eps=model_cfg.norm_eps,
                            initializer_range=model_cfg.init_std, num_labels=model_cfg.num_classes)
        self.model = BertForTokenClassification(config)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=opt.learning_rate,
                                     betas=(opt.b1, opt.b2), eps=opt.eps)
        self.sched = get_linear_schedule_with_warmup(self.opt, min(opt.warmup_steps, total_steps), total_steps)
        self.clip_norm = opt.clip_norm

    def _logits(self, batch: dict) -> Any:
        t = self.torch
        return self.model(input_ids=t.from_numpy(batch["inputs"].astype(np.int64)),
                          attention_mask=t.from_numpy(batch["mask"].astype(np.int64))).logits

    def train_step(self, batch: dict) -> float:
        t = self.torch
        self.model.train()
        logits = self._logits(batch)
        w = t.from_numpy(batch["weights"].astype(np.float32))
        labels = t.from_numpy(np.where(batch["weights"] > 0, batch["labels"], 0).astype(np.int64))
        ce = t.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        loss = (ce * w.flatten()).sum() / w.sum().clamp_min(1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm > 0:
            t.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def predict(self, batch: dict) -> np.ndarray:
        self.model.eval()
        with self.torch.inference_mode():
            return self._logits(batch).argmax(-1).numpy()


def score_tags(pred_rows: list[list[str]], gold_rows: list[list[str]]) -> dict[str, float]:
    """Token accuracy over words and conlleval span precision / recall / F1 (host rule)."""
    from fastserve.tasks.spans import bio_spans, span_f1

    words = correct = 0
    counts = [0, 0, 0]
    for pred, gold in zip(pred_rows, gold_rows):
        words += len(gold)
        correct += sum(p == g for p, g in zip(pred, gold))
        p, g = bio_spans(pred), bio_spans(gold)
        counts = [counts[0] + len(p & g), counts[1] + len(p), counts[2] + len(g)]
    precision, recall, f1 = span_f1(*counts)
    return {"accuracy": correct / max(words, 1), "span_precision": precision, "span_recall": recall, "span_f1": f1}


def word_tags(batches: list[dict], predict) -> tuple[list[list[str]], list[list[str]]]:
    """(predicted, gold) tag names of the words (weighted tokens) of every real example of `batches`."""
    from fastserve.data.strongs import TAGS

    pred_rows, gold_rows = [], []
    for b in batches:
        pred = predict(b)
        for row in range(len(b["inputs"])):
            words = b["weights"][row] > 0
            if not b["mask"][row].any():
                continue                       # a padding example of the last held-out batch
            pred_rows.append([TAGS[int(c)] for c in pred[row][words]])
            gold_rows.append([TAGS[int(c)] for c in b["labels"][row][words]])
    return pred_rows, gold_rows


def compare_tagging(cfg: Any, steps: int, peer_steps: int, phase: int, eval_batches: int) -> dict:
    """fastserve trains `steps`; PyTorch trains the first `peer_steps` of them, in alternating phases. Both are
    scored after `peer_steps` (the same learning-rate history: both schedules span `steps`), fastserve again at the
    end; process CPU seconds per side (both use the 2 cores) give the recipe's CPU time."""
    import torch

    from fastserve.data import strongs

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    fs = FastserveRun(cfg)
    setup_s = time.perf_counter() - t0
    pt = TorchBertTagger(fs.cfg.model, fs.cfg.optimizer, steps, fs.cfg.train.seed)
    batches = list(islice(fs.data.train, steps))
    held = fs.data.eval[:eval_batches] if eval_batches else fs.data.eval
    seen: set = set()
    timed = {"fastserve": [0.0, 0], "pytorch": [0.0, 0]}
    cpu = {"fastserve": 0.0, "pytorch": 0.0}
    losses: dict[str, list[float]] = {"fastserve": [], "pytorch": []}
    at_peer: dict[str, Any] = {}
    for start in range(0, steps, phase):
        sides = (("fastserve", fs.step), ("pytorch", pt.train_step)) if start < peer_steps else (("fastserve", fs.step),)
        for name, run in sides:
            c = time.process_time()
            for b in batches[start:min(start + phase, peer_steps if name == "pytorch" else steps)]:
                t = time.perf_counter()
                losses[name].append(run(b))
                dt = time.perf_counter() - t
                key = (name, b["inputs"].shape[1])
                if key in seen:                   # a new padded length: compile / warm-up, not throughput
                    timed[name][0] += dt
                    timed[name][1] += int(b["mask"].sum())
                seen.add(key)
            cpu[name] += time.process_time() - c
        print(json.dumps({"step": min(start + phase, steps), **{f"loss_{k}": round(v[-1], 4) for k, v in losses.items()}}),
              flush=True)
        if min(start + phase, steps) == peer_steps:
            at_peer = {"fastserve": score_tags(*word_tags(held, lambda b: fs_predict(fs, b))),
                       "pytorch": score_tags(*word_tags(held, pt.predict))}
    fs_metrics = fs.evaluate(held)
    fs_words = word_tags(held, lambda b: fs_predict(fs, b))
    train_verses, held_verses = strongs.split_books(strongs.tagged_verses(), fs.cfg.data.eval_books)
    n_held = len(fs_words[1])
    baseline = strongs.most_frequent_tag_baseline(train_verses, held_verses[:n_held])
    rate = {k: v[1] / max(v[0], 1e-9) for k, v in timed.items()}
    return {"steps": steps, "peer_steps": peer_steps, "batch_size": fs.cfg.data.batch_size, "phase_steps": phase,
            "held_out_verses": n_held, "setup_s": round(setup_s, 1),
            "fastserve": {"tokens_per_s": round(rate["fastserve"], 1), "train_cpu_s": round(cpu["fastserve"], 1),
                          **score_tags(*fs_words), "task_metrics": {k: round(float(v), 4) for k, v in fs_metrics.items()},
                          "final_loss": round(float(np.mean(losses["fastserve"][-10:])), 4)},
            "pytorch": {"tokens_per_s": round(rate["pytorch"], 1), "train_cpu_s": round(cpu["pytorch"], 1),
                        "final_loss": round(float(np.mean(losses["pytorch"][-10:])), 4),
                        "threads": torch.get_num_threads()},
            f"at_step_{peer_steps}": at_peer,
            "baseline_most_frequent_tag": score_tags(baseline, [v.tags for v in held_verses[:n_held]]),
            "ratio_tokens_per_s": round(rate["fastserve"] / max(rate["pytorch"], 1e-9), 3)}


_PREDICT: dict = {}


def fs_predict(fs: FastserveRun, batch: dict) -> np.ndarray:
    """fastserve's per-token argmax on one held-out batch (one jitted forward per padded length)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    if "fn" not in _PREDICT:
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: fs.cfg.model.build(nnx.Rngs(0))))

        @jax.jit
        def forward(variables, inputs, mask):
            model = nnx.merge(graphdef, variables)
            model.eval()
            return jnp.argmax(model(inputs, mask=mask), axis=-1)
        _PREDICT["fn"] = forward
    variables = fs.merge_trees(fs.state["params"], fs.state["model_state"])
    return np.asarray(_PREDICT["fn"](variables, batch["inputs"], batch["mask"]))


def mlm_record(workdir: str) -> dict:
    """Held-out masked-token perplexity at every evaluation of the pretraining run in `workdir`."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {"workdir": workdir, "error": "no metrics.jsonl: run python -m fastserve.train --config "
                                             "configs/mlm_pretrain.yaml first"}
    evals = [r for r in map(json.loads, open(path)) if r["split"] == "eval"]
    return {"workdir": workdir, "evals": [{k: round(r[k], 4) for k in ("step", "perplexity", "accuracy", "loss")}
                                          for r in evals]}


def main() -> int:
    import fastserve

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phase", type=int, default=0, help="steps per alternating phase (default: steps / 5)")
    ap.add_argument("--peer-steps", type=int, default=100,
                    help="full mode: PyTorch trains only the first N steps (it is ~5x slower here)")
    ap.add_argument("--mlm-workdir", default=os.path.join(REPO, "runs", "mlm_pretrain"))
    ap.add_argument("--mlm-only", action="store_true",
                    help="only (re)record the MLM run into the results JSON, keeping its tagging part")
    args = ap.parse_args()
    results_path = os.path.join(REPO, "experiments", "results", "bench_encoder_tasks.json")
    if args.mlm_only:
        with open(results_path) as f:
            result = json.load(f)
        result["mlm_pretrain"] = {**mlm_record(args.mlm_workdir), "recorded": time.strftime("%Y-%m-%d %H:%M"),
                                  **provenance()}
        with open(results_path, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result["mlm_pretrain"]))
        return 0
    cfg = fastserve.load_config(os.path.join(REPO, TAG_RECIPE))
    steps = 40 if args.quick else cfg.train.steps
    peer_steps = steps if args.quick else min(args.peer_steps, steps)
    workdir = os.path.join("/tmp", f"fastserve-bench-tag-{os.getpid()}")
    cfg = fastserve.load_config(os.path.join(REPO, TAG_RECIPE), [f"train.workdir={workdir}", f"train.steps={steps}"])
    t0 = time.time()
    phase = args.phase or max(1, peer_steps // 5)
    tagging = compare_tagging(cfg, steps, peer_steps, phase, 20 if args.quick else 0)
    result = {"bench": "encoder_tasks", "quick": args.quick, "tagging": tagging, "wall_s": round(time.time() - t0, 1),
              "date": time.strftime("%Y-%m-%d"), **provenance()}
    if not args.quick:
        result["mlm_pretrain"] = mlm_record(args.mlm_workdir)
        if "error" in result["mlm_pretrain"] and os.path.exists(results_path):
            # no pretraining run here (it takes hours): keep the recorded one, which carries its own provenance
            with open(results_path) as f:
                recorded = json.load(f).get("mlm_pretrain", {})
            if "evals" in recorded:
                result["mlm_pretrain"] = recorded
        with open(results_path, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
