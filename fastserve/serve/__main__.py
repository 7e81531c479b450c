"""`python -m fastserve.serve --config FILE [key=value ...]` (the code lives in fastserve/serve/cli.py)."""
import sys

from fastserve.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
