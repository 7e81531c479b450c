"""English → Spanish translation (configs/translate_en_es.yaml): held-out BLEU / chrF on the test books, decode
speed, and the check of the claim in the recipe's header.

    python experiments/bench_translate.py            # scores the recipe's work dir (trains / resumes it first)
    python experiments/bench_translate.py --quick    # ~2 minutes: a tiny model, 40 steps, 32 test verses

Measured on the test books (data.test_books: whole books never trained on), every verse, source cut to the
model's max_source_len, references whole:
- a copy baseline (the English source as the hypothesis: what names, numbers and punctuation alone score);
- greedy and beam-4 decoding (cached decoder, fastserve.generation.seq2seq_decode): BLEU, chrF, sentences/s at
  batch 32 (the whole test set) and at batch 1 (the first 16 verses), the two settings interleaved;
- the uncached greedy reference (`Seq2Seq.generate`, the decoder re-run over the whole prefix each step) against
  the cached greedy decoder on the first 64 verses (two batches): the speed-up of the KV cache and the
  cross-attention memory, and whether the two give the same output;
- the exported functions (fastserve.export: translate / beam per source bucket, batch 32 and batch 1) run by
  `load_exported` without the model code: same tokens as in-process, and their speed relative to it at each batch
  (the two timed in turn, three rounds);
- training speed from the run's own log: target tokens/s, pairs/s, MFU against the matmul peak measured at start-up;
- a few translations beside their references.
Prints one JSON object on its last line; full mode writes experiments/results/bench_translate.json (+ .md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

import fastserve

from provenance import provenance  # experiments/: the script's own directory is on sys.path

RECIPE = "configs/translate_en_es.yaml"
# what the recipe's header claims on the test books (measured 24.22 / 26.04 at step 5000): full mode checks the
# scores reach these floors (a retrained model may land a little lower)
CLAIM = {"greedy_bleu": 22.0, "beam4_bleu": 24.0}
QUICK = ["model.d_model=64", "model.n_heads=2", "model.d_ff=128", "model.n_encoder_layers=1",
         "model.n_decoder_layers=1", "tokenizer.vocab_size=1000", "train.steps=40", "train.eval_every=40",
         "checkpoint.every=40", "data.max_eval_pairs=16", "train.task.bleu=false"]


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default="", help="default: the recipe's train.workdir (quick: a temp dir)")
    args = ap.parse_args()
    from fastserve.config import SourceConfig, load_config
    from fastserve.data.bible_pairs import verse_pairs
    from fastserve.generation.translation import DecodeSettings, corpus_scores, decode_batches
    from fastserve.workdir import load_model

    overrides = ["log.progress=false", *(QUICK if args.quick else [])]
    workdir = args.workdir or (tempfile.mkdtemp(prefix="fastserve-translate-") if args.quick else
                               load_config(RECIPE).train.workdir)
    overrides.append(f"train.workdir={workdir}")
    _, train_s = timed(fastserve.train, RECIPE, *overrides)      # resumes; a finished run returns at once
    n_test = 32 if args.quick else 0
    cfg = load_config(RECIPE, [*overrides, "data.eval_split=test", f"data.max_eval_pairs={n_test}"])
    data = cfg.data.load(cfg)
    loaded = load_model(dataclasses.replace(cfg, source=SourceConfig(kind="checkpoint", path=workdir)))
    tok, mc = data.tokenizer, loaded.model_cfg
    sources = [en for en, _ in verse_pairs(cfg.data)["test"]][:len(data.eval_texts)]
    refs = data.eval_texts
    result = {"bench": "translate", "quick": args.quick, "workdir": workdir, "step": loaded.step,
              "test_books": cfg.data.test_books, "test_sentences": len(refs), "train_call_s": round(train_s, 1),
              "copy_baseline": corpus_scores(sources, refs)}

    settings = {"greedy": DecodeSettings(), "beam4": DecodeSettings(beam_size=4, length_penalty=1.0)}
    decode = {name: (lambda s=s: decode_batches(loaded.graphdef, loaded.params, data.eval, loaded.mesh, tok, s,
                                                mc.max_target_len)) for name, s in settings.items()}
    singles = [{k: v[i:i + 1] for k, v in data.eval[0].items()} for i in range(16)]   # batch 1, sources as cut
    one_by_one = {name: (lambda s=s: decode_batches(loaded.graphdef, loaded.params, singles, loaded.mesh, tok, s,
                                                    mc.max_target_len)) for name, s in settings.items()}
    uncached = uncached_greedy(loaded, data.eval[:2], tok, mc.max_target_len)
    cached = lambda: decode_batches(loaded.graphdef, loaded.params, data.eval[:2], loaded.mesh, tok,  # noqa: E731
                                    settings["greedy"], mc.max_target_len)
    for fn in (*decode.values(), *one_by_one.values(), uncached):   # compile each once, outside the timings
        fn()
    times = {k: [] for k in (*decode, *(f"{n}_batch1" for n in one_by_one), "greedy_uncached", "greedy_cached")}
    hyps = {}
    for _ in range(1 if args.quick else 2):                         # interleaved repeats; the best time counts
        for name in decode:
            hyps[name], t = timed(decode[name])
            times[name].append(t)
            _, t = timed(one_by_one[name])
            times[f"{name}_batch1"].append(t)
        uncached_hyps, t = timed(uncached)
        times["greedy_uncached"].append(t)
        cached_hyps, t = timed(cached)
        times["greedy_cached"].append(t)
    for name in decode:
        result[name] = {**corpus_scores(hyps[name], refs),
                        "sentences_per_s_batch32": round(len(refs) / min(times[name]), 2),
                        "sentences_per_s_batch1": round(16 / min(times[f"{name}_batch1"]), 2)}
    n_first = len(cached_hyps)
    result["greedy_uncached"] = {"sentences": n_first,
                                 "sentences_per_s_batch32": round(n_first / min(times["greedy_uncached"]), 2),
                                 "cached_sentences_per_s_batch32": round(n_first / min(times["greedy_cached"]), 2),
                                 "same_output_as_cached": uncached_hyps == cached_hyps}
    result["kv_cache_speedup"] = round(min(times["greedy_uncached"]) / min(times["greedy_cached"]), 2)
    result["exported"] = exported_vs_in_process(loaded, workdir, data.eval, singles, hyps, tok, decode, one_by_one,
                                                len(refs))
    result["beam4_minus_greedy_bleu"] = round(result["beam4"]["bleu"] - result["greedy"]["bleu"], 2)
    result["samples"] = [{"source": sources[i], "reference": refs[i], "greedy": hyps["greedy"][i],
                          "beam4": hyps["beam4"][i]} for i in range(0, len(refs), max(1, len(refs) // 5))][:5]
    result["training"] = training_figures(workdir, cfg.data.batch_size)
    result["claim"] = CLAIM
    result["met"] = all(result[k.split("_")[0]]["bleu"] >= v for k, v in CLAIM.items())
    # the issue's goals: test BLEU >= 10 (within an hour of 2-core CPU: the recipe header's measured CPU time) and
    # beam 4 at least 0.5 BLEU above greedy on the same checkpoint
    result["goals"] = {"greedy_bleu_at_least_10": result["greedy"]["bleu"] >= 10,
                       "beam4_at_least_greedy_plus_0.5": result["beam4_minus_greedy_bleu"] >= 0.5}
    result.update(date=time.strftime("%Y-%m-%d"), **provenance())
    if not args.quick:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_translate")
        with open(out + ".json", "w") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
        with open(out + ".md", "w") as f:
            f.write(markdown(result))
    print(json.dumps(result, ensure_ascii=False))
    return 0 if result["met"] or args.quick else 1


def exported_vs_in_process(loaded, workdir, batches, singles, hyps, tok, decode, one_by_one, n):
    """Exports the model (batch 32 and batch 1, the model's source length), loads it back and decodes the same
    batches: whether the translations are the same, and sentences/s exported / in-process at batch 32 (the whole
    test set) and at batch 1 (the first 16 verses), the two timed in turn, three rounds, the best of each."""
    from fastserve.artifacts.loader import load_exported
    from fastserve.artifacts.options import ExportOptions
    from fastserve.artifacts.writer import export_params

    out = tempfile.mkdtemp(prefix="fastserve-translate-export-")
    _, export_s = timed(export_params, loaded.model_cfg, loaded.params, loaded.tokenizer, out,
                        ExportOptions(platforms=("cpu",), buckets=(), batch_sizes=(1, 32),
                                      functions=("translate", "beam")), source={"path": workdir})
    t = load_exported(out)
    row = {"export_s": round(export_s, 1)}
    for name, beam in (("greedy", False), ("beam4", True)):
        def run(bs):
            texts = []
            for b in bs:
                toks = t.translate_tokens(b["src"], b["src_mask"], beam=beam, length_penalty=1.0)
                texts.extend(tok.decode(r) for r, w in zip(toks, b["weights"]) if w > 0)
            return texts
        got = run(batches)                                           # compiles (and the tokens to compare)
        run(singles)
        best = {k: float("inf") for k in ("exp32", "in32", "exp1", "in1")}
        for _ in range(3):                                           # interleaved: load hits both alike
            for key, fn in (("exp32", lambda: run(batches)), ("in32", decode[name]),
                            ("exp1", lambda: run(singles)), ("in1", one_by_one[name])):
                best[key] = min(best[key], timed(fn)[1])
        row[name] = {"same_as_in_process": got == hyps[name], "sentences_per_s_batch32": round(n / best["exp32"], 2),
                     "exported_over_in_process_speed": round(best["in32"] / best["exp32"], 3),
                     "sentences_per_s_batch1": round(len(singles) / best["exp1"], 2),
                     "exported_over_in_process_speed_batch1": round(best["in1"] / best["exp1"], 3)}
    return row


def training_figures(workdir: str, batch_size: int) -> dict:
    """Training speed from the run's metrics.jsonl (logged by the trainer every `log.every` steps): medians over
    the logged intervals after the first (which compiles) of target tokens/s, pairs/s and MFU (against the float32
    matmul peak the trainer measured at start-up; useful FLOPs under length buckets), and the run's wall time."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r.get("split") == "train" and "tokens_per_s" in r]
    if len(rows) < 3:
        return {}
    pairs_per_s = [(b["step"] - a["step"]) * batch_size / (b["time"] - a["time"]) for a, b in zip(rows[1:], rows[2:])
                   if b["time"] > a["time"] and b["step"] > a["step"]]
    mfu = [r["mfu"] for r in rows[1:] if r.get("mfu") is not None]   # absent when no peak was measured
    return {"steps": rows[-1]["step"], "target_tokens_per_s_median": round(float(np.median(
                [r["tokens_per_s"] for r in rows[1:]])), 1),
            "pairs_per_s_median": round(float(np.median(pairs_per_s)), 2) if pairs_per_s else None,
            "mfu_median": round(float(np.median(mfu)), 4) if mfu else None,
            "wall_s_first_to_last_log": round(rows[-1]["time"] - rows[0]["time"], 1)}


def uncached_greedy(loaded, batches, tok, max_len):
    """Greedy translations by the model's uncached reference decoder, on the same batches."""
    import jax

    from fastserve import parallel
    from fastserve.generation.program import model_program

    program = model_program(loaded.graphdef, lambda m, s, k: m.generate(
        s, k, max_len=max_len, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id))

    def run():
        out = []
        for b in batches:
            g = parallel.host_to_global({"src": b["src"], "src_mask": b["src_mask"]}, loaded.mesh)
            with jax.set_mesh(loaded.mesh):
                rows = np.asarray(program(loaded.params, g["src"], g["src_mask"]))
            out.extend(tok.decode(r) for r, w in zip(rows, b["weights"]) if w > 0)
        return out
    return run


def markdown(r: dict) -> str:
    lines = [f"# bench_translate ({r['date']}, commit {r['commit'][:10]}{' dirty' if r['dirty'] else ''})", "",
             f"Test books {' '.join(r['test_books'])}: {r['test_sentences']} verses; checkpoint step {r['step']}.", "",
             "| decoding | BLEU | chrF | sentences/s batch 32 | batch 1 |", "|---|---|---|---|---|",
             f"| copy source (baseline) | {r['copy_baseline']['bleu']:.2f} | {r['copy_baseline']['chrf']:.2f} | | |"]
    for name in ("greedy", "beam4"):
        x = r[name]
        lines.append(f"| {name} | {x['bleu']:.2f} | {x['chrf']:.2f} | {x['sentences_per_s_batch32']} | "
                     f"{x['sentences_per_s_batch1']} |")
    u = r["greedy_uncached"]
    lines += ["", f"First {u['sentences']} verses, batch 32: uncached greedy (decoder re-run over the prefix) "
              f"{u['sentences_per_s_batch32']} sentences/s, cached {u['cached_sentences_per_s_batch32']}: the KV cache "
              f"is {r['kv_cache_speedup']}× faster; same output: {u['same_output_as_cached']}.", ""]
    for name in ("greedy", "beam4"):
        e = r["exported"][name]
        lines.append(f"Exported {name} (load_exported, no model code): {e['sentences_per_s_batch32']} sentences/s at "
                     f"batch 32, {e['exported_over_in_process_speed']}× in-process speed; at batch 1 "
                     f"{e.get('sentences_per_s_batch1')} sentences/s, {e.get('exported_over_in_process_speed_batch1')}×; "
                     f"same translations: {e['same_as_in_process']}.")
    t = r.get("training") or {}
    if t:
        lines += ["", f"Training (the run's log, medians after the first interval): {t['target_tokens_per_s_median']} "
                  f"target tokens/s, {t['pairs_per_s_median']} pairs/s, MFU "
                  + (f"{100 * t['mfu_median']:.1f} %" if t["mfu_median"] is not None else "not logged") + " of the "
                  f"float32 matmul peak measured at start-up; {t['steps']} steps in {t['wall_s_first_to_last_log']} s "
                  "of wall time between the first and last log lines."]
    g = r.get("goals") or {}
    if g:
        lines += ["", "Goals: " + ", ".join(f"{k}: {v}" for k, v in g.items()) + "."]
    lines += ["", "## Samples", ""]
    for s in r["samples"]:
        lines += [f"- EN: {s['source']}", f"  - reference: {s['reference']}", f"  - greedy: {s['greedy']}",
                  f"  - beam 4: {s['beam4']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
