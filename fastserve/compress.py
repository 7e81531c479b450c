"""`python -m fastserve.compress --config FILE --checkpoint WORKDIR --out NEW [key=value ...]` (fastserve/transforms/report.py)."""
import sys

from fastserve.transforms.report import main

if __name__ == "__main__":
    sys.exit(main())
