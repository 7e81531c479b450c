"""`python -m fastserve.export --config FILE --checkpoint WORKDIR --out DIR [key=value ...]`
(the code lives in fastserve/exporting.py)."""
import sys

from fastserve.exporting import main

if __name__ == "__main__":
    sys.exit(main())
