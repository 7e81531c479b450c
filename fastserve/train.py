"""`python -m fastserve.train --config FILE [key=value ...]` (the code lives in fastserve/core/trainer.py)."""
import sys

from fastserve.core.trainer import main

if __name__ == "__main__":
    sys.exit(main())
