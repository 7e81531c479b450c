"""`python -m fastserve.train --config FILE [key=value ...]`: train (or resume) a model.

The code lives in fastserve/core/trainer.py; importing this module keeps `fastserve.train(...)` callable.
"""
import sys

from fastserve.cli.verb import callable_verb


def main(argv=None) -> int:
    from fastserve.core.trainer import main as run
    return run(argv)


callable_verb(__name__)

if __name__ == "__main__":
    sys.exit(main())
