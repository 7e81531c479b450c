"""python -m fastserve.kernels build|status: build the C++ kernels now (or report what is there) as JSON."""
import json
import logging
import sys

from fastserve.kernels.build import KernelBuildError, build, status


def main(argv: list[str]) -> int:
    if argv not in (["build"], ["status"]):
        print("usage: python -m fastserve.kernels build|status", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    if argv == ["build"]:
        try:
            build()
        except KernelBuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(json.dumps(status()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
