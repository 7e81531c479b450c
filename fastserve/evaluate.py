"""`python -m fastserve.evaluate --config FILE [key=value ...]` (the code lives in fastserve/evaluation.py)."""
import sys

from fastserve.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
