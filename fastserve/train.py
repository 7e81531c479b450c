"""`python -m fastserve.train --config FILE [key=value ...]` (the code lives in fastserve/training.py)."""
import sys

from fastserve.training import main

if __name__ == "__main__":
    sys.exit(main())
