"""`python -m fastserve.export --config FILE --checkpoint WORKDIR --out DIR [key=value ...]`
(the code lives in fastserve/artifacts/writer.py)."""
import sys

from fastserve.artifacts.writer import main

if __name__ == "__main__":
    sys.exit(main())
