"""bench.cases.measure with a stand-in for pytest-benchmark's fixture: paired ratios and the error fields."""
import types

import torch

from bench.cases import EAGER, FASTPATCH, Case, Side, measure


class _Benchmark:
    """What measure uses of pytest-benchmark's fixture: pedantic(), stats, disabled, extra_info, group."""

    disabled = False

    def __init__(self):
        self.extra_info = {}
        self.stats = None

    def pedantic(self, target, setup, rounds, warmup_rounds):
        samples = []
        for index in range(warmup_rounds + rounds):
            setup()
            output = target()
            if index >= warmup_rounds:
                samples.append(1e-3)  # 1 ms per round: the ratios below follow from the partners' clocks
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(data=samples))
        return output


CASE = Case("toy", "forward", "s", 1, torch.float32, "cpu")


def _sides():
    x = torch.arange(4.0)
    return {EAGER: Side(lambda: x * 2), FASTPATCH: Side(lambda: x * 2 + 1e-3), "floor": Side(lambda: x)}


def test_error_against_the_baseline():
    bench = _Benchmark()
    measure(bench, CASE, FASTPATCH, _sides(), flops=None, rounds=3, partners=[EAGER])
    assert abs(bench.extra_info["max_rel_error_vs_eager"] - 1e-3 / 6) < 1e-9
    assert "error_baseline" not in bench.extra_info
    assert bench.extra_info["eager_ms_per_round"] and len(bench.extra_info["ms_per_round"]) == 3


def test_no_baseline_records_no_error():
    """A side that computes another function (a time floor) gets ratios but no error field value."""
    bench = _Benchmark()
    measure(bench, CASE, "floor", _sides(), flops=None, rounds=3, partners=[EAGER, FASTPATCH], baseline=None)
    info = bench.extra_info
    assert info["max_rel_error_vs_eager"] is None and "error_baseline" not in info
    assert info["vs_eager"] is not None and info["vs_fastpatch"] is not None  # every partner gets its ratio
