"""`python -m fastserve.export --config FILE --checkpoint WORKDIR --out DIR [key=value ...]`: serving functions.

The code lives in fastserve/artifacts/writer.py; importing this module keeps `fastserve.export(...)` callable.
"""
import sys

from fastserve.cli.verb import callable_verb


def main(argv=None) -> int:
    from fastserve.artifacts.writer import main as run
    return run(argv)


callable_verb(__name__)

if __name__ == "__main__":
    sys.exit(main())
