"""Sentence-embedding speed of all-MiniLM-L6-v2: fastserve (the imported weights, `EncoderRunner`, what
`python -m fastserve.embed` and `/v1/embeddings` run) against Hugging Face transformers on CPU PyTorch, on the same
sentences, interleaved in one run.

    python experiments/bench_embed.py            # 1,024 KJV verses, 3 interleaved rounds
    python experiments/bench_embed.py --quick    # 256 verses, 2 rounds (about a minute)

Both sides do the same work per round: tokenize (WordPiece; [CLS] … [SEP], cut at 256 tokens), sort by length,
batches of 32 padded to their longest (transformers) or to the smallest of fastserve's default buckets that
fits (every 8 tokens to 64, 16 to 128, 32 to 256; one compiled program per bucket), encode, mean-pool over the
mask, L2-normalize. Each side's compile / warm-up runs once before the timed rounds. A third side runs the same batches through the model's `forward` export
(`jax.export`, one function per length bucket, loaded without the model code): it shows what an export costs
against the in-process runner. Reports sentences/s per side (median round), the ratios, and the cosine between
the sides' embeddings (minimum over the sentences). Sentences: verses of the KJV (Debian
sword-text-kjv: real text of varied length, offline). The last line is one JSON object; a full run writes
experiments/results/bench_embed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from provenance import provenance  # noqa: E402  (experiments/: the script's own directory is on sys.path)

from fastserve.config import load_config  # noqa: E402
from fastserve.data.packages import MissingPackage  # noqa: E402
from fastserve.generation.encoders import DEFAULT_BUCKETS, EncoderRunner  # noqa: E402
from fastserve.workdir import load_model, resolve_path  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "minilm.yaml")
MAX_LEN, BATCH = 256, 32
BUCKETS = tuple(b for b in DEFAULT_BUCKETS if b <= MAX_LEN)   # the runner's defaults (embed.buckets)


def sentences(n: int) -> list[str]:
    """`n` KJV verses spread over the whole Bible (every k-th), so lengths vary as real text does."""
    from fastserve.data.sword import verses
    texts = [v.text for v in verses("engKJV2006eb")]
    step = max(1, len(texts) // n)
    return texts[::step][:n]


class TorchSide:
    """transformers' BertModel on CPU PyTorch with sentence-transformers' recipe (sorted batches, mean, normalize)."""

    def __init__(self, directory: str):
        import torch
        import transformers
        self.torch = torch
        self.tok = transformers.BertTokenizerFast.from_pretrained(directory)
        self.model = transformers.BertModel.from_pretrained(directory).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        lengths = [len(x) for x in self.tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                rows = order[start:start + BATCH]
                batch = self.tok([texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_LEN,
                                 return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                m = batch["attention_mask"].unsqueeze(-1).float()
                emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
                out[rows] = emb.numpy()
        return out


class ExportedSide:
    """The `forward` export of the same model (bucketed lengths, batch BATCH), fed the runner's tokenization in
    sorted batches padded to their longest row: the export picks the bucket."""

    def __init__(self, runner: EncoderRunner, loaded, directory: str):
        from fastserve.artifacts.loader import load_exported
        from fastserve.artifacts.options import ExportOptions
        from fastserve.artifacts.writer import export_params
        export_params(loaded.model_cfg, jax.device_get(loaded.params), loaded.tokenizer, directory,
                      ExportOptions(platforms=("cpu",), buckets=BUCKETS, batch_sizes=(BATCH,)))
        self.runner, self.exported = runner, load_exported(directory)

    def embed(self, texts: list[str]) -> np.ndarray:
        ids = self.runner.wrap_all(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(texts), self.runner.cfg.d_model), np.float32)
        for start in range(0, len(texts), BATCH):
            rows = order[start:start + BATCH]
            width = max(len(ids[i]) for i in rows)
            tokens = np.zeros((len(rows), width), np.int32)
            mask = np.zeros((len(rows), width), bool)
            for j, i in enumerate(rows):
                tokens[j, :len(ids[i])], mask[j, :len(ids[i])] = ids[i], True
            out[rows] = self.exported.forward(tokens, mask=mask)
        return out


def timed(fn, texts: list[str]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    result = fn(texts)
    return time.perf_counter() - t0, result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, rounds = (256, 2) if args.quick else (1024, 3)
    try:
        texts = sentences(n)
    except MissingPackage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = load_config(CONFIG)
    loaded = load_model(cfg)
    ours = EncoderRunner(loaded, BATCH, BUCKETS, MAX_LEN)
    theirs = TorchSide(resolve_path(cfg.source.path))
    with tempfile.TemporaryDirectory() as tmp:       # the export's weights are read at load: the files may go
        t0 = time.perf_counter()
        exported = ExportedSide(ours, loaded, os.path.join(tmp, "minilm"))
        t_export = time.perf_counter() - t0
    sides = {"fastserve": ours.embed, "exported": exported.embed, "torch": theirs.embed}
    t_compile, _ = timed(ours.embed, texts)          # compiles every bucket the texts need
    t_export_first, _ = timed(exported.embed, texts)
    t_warm, _ = timed(theirs.embed, texts[:BATCH])
    times: dict[str, list[float]] = {k: [] for k in sides}
    results: dict[str, np.ndarray] = {}
    for r in range(rounds):                          # interleaved, order rotated: every side sees the same load
        names = list(sides)[r % 3:] + list(sides)[:r % 3]
        for side in names:
            seconds, results[side] = timed(sides[side], texts)
            times[side].append(seconds)
        print(f"round {r}: " + ", ".join(f"{k} {n / v[-1]:.1f} sentences/s" for k, v in times.items()), flush=True)
    cosine = np.sum(results["fastserve"] * results["torch"], axis=-1)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    tokens = [len(ours.wrap(t)) for t in texts]
    import torch
    out = {"bench": "embed", "model": "all-MiniLM-L6-v2 (HF safetensors, float32)", "quick": args.quick,
           "sentences": n, "mean_tokens": round(float(np.mean(tokens)), 1), "max_tokens": int(max(tokens)),
           "batch": BATCH, "max_len": MAX_LEN, "rounds": rounds,
           "fastserve_sentences_per_s": round(rate["fastserve"], 1), "torch_sentences_per_s": round(rate["torch"], 1),
           "ratio_fastserve_over_torch": round(rate["fastserve"] / rate["torch"], 3),
           "exported_sentences_per_s": round(rate["exported"], 1),
           "ratio_exported_over_in_process": round(rate["exported"] / rate["fastserve"], 3),
           "export_s": round(t_export, 1), "exported_first_pass_s": round(t_export_first, 2),
           "exported_max_abs_diff": float(np.max(np.abs(results["exported"] - results["fastserve"]))),
           "cosine_min": float(np.min(cosine)), "fastserve_first_pass_s": round(t_compile, 2),
           "torch_warmup_s": round(t_warm, 2), "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **provenance()}
    out["machine"] = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.0f} at the end"
    out["headline"] = {"fastserve / torch sentences/s": out["ratio_fastserve_over_torch"],
                       "exported / in-process sentences/s": out["ratio_exported_over_in_process"],
                       "1 - cosine to transformers (max)": float(f"{1 - out['cosine_min']:.2g}")}
    if not args.quick:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_embed.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
