"""`python -m fastserve.compress --config FILE --checkpoint WORKDIR --out NEW [key=value ...]`: transforms.

The code lives in fastserve/transforms/report.py; importing this module keeps `fastserve.compress(...)` callable.
"""
import sys

from fastserve.cli.verb import callable_verb


def main(argv=None) -> int:
    from fastserve.transforms.report import main as run
    return run(argv)


callable_verb(__name__)

if __name__ == "__main__":
    sys.exit(main())
