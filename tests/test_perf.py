"""MFU a user can trust: published peaks on accelerators, a measured peak on CPU that is re-measured when the
achieved rate exceeds it, and never more than 100 %."""
import jax
import pytest

from fastserve.core.perf import PeakFlops, published_peak


@pytest.mark.parametrize("kind,dtype,peak", [
    ("TPU v5 lite", "bfloat16", 197e12), ("TPU v5p", "bfloat16", 459e12), ("TPU v2", "float32", 22.5e12),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H200", "float32", 494.7e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12), ("cpu", "float32", None)])
def test_published_peaks_by_device_kind(kind, dtype, peak):
    assert published_peak(kind, dtype) == peak


def test_measured_peak_is_remeasured_when_exceeded_and_mfu_never_passes_one():
    calls = []

    def busy_then_quiet(dtype, device):  # first measured while the machine was loaded, then quiet
        calls.append(dtype)
        return 10e9 if len(calls) == 1 else 40e9

    peak = PeakFlops(0.0, "float32", jax.devices("cpu")[0], measure=busy_then_quiet)
    assert peak.per_device == 10e9 and "measured" in peak.describe()
    assert peak.mfu(5e9, 1) == pytest.approx(0.5)
    assert len(calls) == 1
    assert peak.mfu(20e9, 1) == pytest.approx(0.5)       # 200 % against the busy peak → re-measured at 40 GFLOP/s
    assert len(calls) == 2 and peak.per_device == 40e9
    assert peak.mfu(60e9, 1) == 1.0                       # still above a fresh measurement: capped, peak raised
    assert peak.per_device == 60e9


def test_given_peak_is_kept_and_capped():
    peak = PeakFlops(1e9, "float32", jax.devices("cpu")[0], measure=lambda **_: pytest.fail("must not measure"))
    assert peak.mfu(0.5e9, 1) == pytest.approx(0.5) and peak.mfu(4e9, 2) == 1.0
    assert "log.peak_flops" in peak.describe()
