"""`python -m fastserve.evaluate --config FILE [key=value ...]`: held-out metrics of a work dir.

The code lives in fastserve/core/evaluator.py; importing this module keeps `fastserve.evaluate(...)` callable.
"""
import sys

from fastserve.cli.verb import callable_verb


def main(argv=None) -> int:
    from fastserve.core.evaluator import main as run
    return run(argv)


callable_verb(__name__)

if __name__ == "__main__":
    sys.exit(main())
