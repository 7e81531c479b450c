"""`python -m fastserve.translate --config FILE (--text "…" … | --input FILE --output FILE) [options] [key=value …]`

Translates with a trained encoder–decoder work dir (`train.workdir`, or --checkpoint DIR): each --text, or each
line of --input (empty lines stay empty), printed or written one translation per line. Decoding: greedy by
default, beam search with --beam N (--length-penalty, fairseq convention), sampling with --temperature. A source
sentence longer than the model's max_source_len, or an empty --text, is an error that names it.
The code lives in fastserve/generation/translation.py.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Sequence

from fastserve import cli

if TYPE_CHECKING:
    from fastserve.data.bible_pairs import PairTokenizer


def _parser():
    p = cli.parser("Translate text with a trained encoder–decoder (seq2seq) model.")
    p.add_argument("--checkpoint", help="a fastserve work dir (or its checkpoints/ folder); sets source.path")
    p.add_argument("--text", action="append", default=[], help="a source sentence (repeatable)")
    p.add_argument("--input", help="a UTF-8 file, one source sentence per line")
    p.add_argument("--output", help="write translations here, one per line (default: print them)")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob / length ** this")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: sample (with --beam 1)")
    p.add_argument("--max-len", type=int, default=0, help="target tokens at most (0: the model's max_target_len)")
    p.add_argument("--batch-size", type=int, default=16, help="sentences per compiled batch")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"source.path={args.checkpoint}"] if args.checkpoint else [])
    cfg = cli.load_or_exit(args.config, overrides)
    cli.quiet_logs()
    if bool(args.text) == bool(args.input):
        print("error: give either --text (repeatable) or --input FILE", file=sys.stderr)
        return 2
    if args.beam < 1 or args.batch_size < 1 or args.max_len < 0:
        print("error: --beam and --batch-size must be >= 1, --max-len >= 0", file=sys.stderr)
        return 2
    from fastserve.generation.translation import DecodeSettings
    settings = DecodeSettings(beam_size=args.beam, length_penalty=args.length_penalty, temperature=args.temperature)
    try:
        lines = args.text if args.text else open(args.input, encoding="utf-8").read().splitlines()
        t0 = time.perf_counter()
        out = translate_from_config(cfg, lines, settings, keep_empty=bool(args.input), max_len=args.max_len,
                                    batch_size=args.batch_size, seed=args.seed)
        seconds = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t in out)
    else:
        for src, tgt in zip(lines, out):
            print(f">>> {src}\n{tgt}\n", flush=True)
    print(f"translated {sum(1 for s in lines if s.strip())} sentences in {seconds:.1f} s (model loading and "
          "compilation included)", file=sys.stderr)
    return 0


def translate_from_config(cfg, lines: Sequence[str], settings=None, *, keep_empty: bool = False, max_len: int = 0,
                          batch_size: int = 16, seed: int = 0) -> list[str]:
    """Translations of `lines` by the work dir of `cfg.source` (default: the trained one), aligned with them;
    with `keep_empty`, empty lines translate to '' (else an empty line is an error)."""
    from flax import nnx

    from fastserve.generation.seq2seq_decode import is_seq2seq
    from fastserve.generation.translation import DecodeSettings, translate_texts
    from fastserve.workdir import load_model

    loaded = load_model(cfg)
    if not is_seq2seq(nnx.merge(loaded.graphdef, loaded.params)):
        raise ValueError(f"model.name '{loaded.model_cfg.name}' is not an encoder–decoder model: use "
                         "fastserve.generate for language models")
    tok = pair_tokenizer(cfg)
    keep = [i for i, s in enumerate(lines) if s.strip()] if keep_empty else list(range(len(lines)))
    mc = loaded.model_cfg
    done = translate_texts(loaded.graphdef, loaded.params, loaded.mesh, tok, [lines[i] for i in keep],
                           max_source_len=mc.max_source_len, max_len=max_len or mc.max_target_len,
                           settings=settings or DecodeSettings(), batch_size=batch_size, seed=seed)
    out = [""] * len(lines)
    for i, text in zip(keep, done):
        out[i] = text
    return out


def pair_tokenizer(cfg) -> "PairTokenizer":
    """The source and target vocabularies of the seq2seq work dir `cfg.source` names (default: the trained one)."""
    from fastserve.data.bible_pairs import pair_tokenizer_from_workdir
    workdir = cfg.source.path or cfg.train.workdir
    if os.path.basename(os.path.normpath(workdir)) == "checkpoints":
        workdir = os.path.dirname(os.path.normpath(workdir))
    return pair_tokenizer_from_workdir(workdir)


if __name__ == "__main__":
    sys.exit(main())
