"""`python -m fastserve.embed --config FILE [--text TEXT ...] [--out FILE.jsonl] [key=value ...]`: sentence embeddings
(mean-pooled, L2-normalized) of an encoder — a trained work dir or an imported BERT (`source.kind: hf`) — one JSON
object per text: {"index", "text", "tokens", "embedding"}, plus "label" and "probs" for a classifier.

Texts come from --text, `embed.texts` or `embed.texts_file` (one per line); `embed.max_len` cuts long inputs.
The code lives in fastserve/generation/encoders.py.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from fastserve import cli
    from fastserve.core.checkpoint import CheckpointError
    from fastserve.generation.encoders import read_texts, runner_from_config

    p = cli.parser("Sentence embeddings (and class predictions) of an encoder model, as JSON lines.")
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--out", help="write the JSON lines to this file (sets embed.out; default: standard output)")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"embed.out={args.out}"] if args.out else [])
    cfg = cli.load_or_exit(args.config, overrides)
    cli.quiet_logs()
    try:
        texts = read_texts(cfg, args.text)
        runner = runner_from_config(cfg)
        t0 = time.perf_counter()
        embeddings = runner.embed(texts)
        predictions = runner.classify(texts) if runner.cfg.head == "classify" else None
        seconds = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = open(cfg.embed.out, "w", encoding="utf-8") if cfg.embed.out else sys.stdout
    try:
        for i, (text, vector) in enumerate(zip(texts, embeddings)):
            record = {"index": i, "text": text, "tokens": len(runner.wrap(text)),
                      "embedding": [round(float(x), 7) for x in vector]}
            if predictions is not None:
                record.update(label=predictions[i].label, probs=predictions[i].probs)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"fastserve.embed: {len(texts)} texts, dimension {embeddings.shape[1]}, {seconds:.2f} s "
          f"(compiles included){' → ' + cfg.embed.out if cfg.embed.out else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
