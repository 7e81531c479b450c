"""`python -m fastserve.compress --config FILE --checkpoint WORKDIR --out NEW [key=value ...]` (fastserve/compression.py)."""
import sys

from fastserve.compression import main

if __name__ == "__main__":
    sys.exit(main())
