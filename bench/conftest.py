"""Benchmark session set-up: honest fp32 on CUDA and the software/device facts in the JSON.

TF32 is turned off for CUDA matmuls and cuDNN convolutions, so float32 rows compare float32 math
(spec §12); ``machine_info["fastpatch"]`` records torch/triton versions, the device, CPU threads and
whether the full matrix ran, for ``bench/report.py``.
"""
import platform

import pytest
import torch

from .cases import DEVICE, FULL, device_name

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["fastpatch"] = {
        "device": device_name(DEVICE), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(), "full": FULL,
        "processor": platform.processor() or platform.machine(),
    }


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Drop a benchmark interrupted before its first round (a run cut short by ``timeout -s INT``),
    so pytest-benchmark still writes the JSON of the ones that finished."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None:
        benchmark_session.benchmarks[:] = [b for b in benchmark_session.benchmarks if b.stats and b.stats.data]
    yield
