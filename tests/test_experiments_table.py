"""experiments/README.md is generated from the recorded results; it must match them."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_table_is_current():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "experiments" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    assert (ROOT / "experiments" / "README.md").read_text() == summarize.render(), (
        "experiments/README.md is stale: run `python experiments/summarize.py`")
    for result in (ROOT / "experiments" / "results").glob("bench_*.json"):
        assert f"| {result.stem} |" in summarize.render()
