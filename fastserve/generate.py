"""`python -m fastserve.generate --config FILE [--checkpoint DIR] [--prompt TEXT ...] [key=value ...]`.

Weights come from `source` (a trained work dir by default, or a GGUF / HF import); prompts from --prompt, the
config's `generate.prompts`, or `generate.prompts_file` (one per line). The code lives in fastserve/generation/runner.py.
"""
import sys

from fastserve.generation.runner import main

if __name__ == "__main__":
    sys.exit(main())
