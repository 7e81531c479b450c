"""`python -m fastserve.evaluate --config FILE [key=value ...]` (the code lives in fastserve/core/evaluator.py)."""
import sys

from fastserve.core.evaluator import main

if __name__ == "__main__":
    sys.exit(main())
