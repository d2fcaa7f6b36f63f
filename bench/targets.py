"""Issue 11's GPU targets, each read from the benchmark rows that measure it.

    python -m bench.targets RESULTS.json [MORE.json ...]
    python bench/targets.py RESULTS.json [MORE.json ...]

Prints a markdown table of the GPU targets (for docs/benchmarks.md): a header (device, torch/triton/CUDA versions, commit,
date) and, per target, the baseline, the goal, the measured ratio, the fastpatch row's TFLOP/s and %
of the GPU's dense peak (``bench/report.py``'s ``PEAK_TFLOPS``), and met / missed / not measured.
``python -m bench.report`` appends the same table to ``report.md`` as a "Targets" section when a row
ran on a GPU. Standard library only; rows, paired ratios and peaks come from ``bench/report.py``.

* Measured ratio: the best fastpatch provider's speedup over the fastest of the target's baseline
  rows, paired per round inside one test (the baseline timed just before each round,
  ``bench/cases.py``). Where no test timed the two together (fastpatch vs ``eager_compiled``), it
  is the quotient of both rows' paired ratios over eager, marked "via eager".
* Met only with a measured ratio at or above the goal (and the % of dense peak, where the goal has
  one). Not measured: a row is missing (named), no paired timing exists, or the GPU's peak is
  unknown. A target with several fastpatch providers (the full pair: CUDA graphs allowed) is met by
  any of them, and missed only when all of them were measured.
* No host sync (patch embedding): the CUDA tests that check it (``torch.cuda`` sync debug mode
  ``"error"``), with their result from the junit ``tests.xml`` that ``bench/gpu_run.sh`` writes
  beside the JSON files.
"""
from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

if __package__:
    from .report import load_rows, ratio
else:  # python bench/targets.py, or imported by python bench/report.py
    from report import load_rows, ratio

__all__ = ["Target", "TARGETS", "NO_HOST_SYNC_TESTS", "Outcome", "gpu_device", "evaluate", "host_sync_outcome",
           "table", "section", "main"]


@dataclass(frozen=True)
class Target:
    """One goal of issue 11: the best ``providers`` row of ``case`` against the fastest ``baselines`` row.

    ``opt_in``: more fastpatch providers that count when their rows exist (a bench runs them only on
    request), without which the target can still be missed.
    """

    what: str  # the wording
    against: str  # the baseline and the rows that stand for it
    goal: float  # minimum speedup
    case: str  # the benchmark case name (bench/cases.py Case.name)
    baselines: Tuple[str, ...]
    providers: Tuple[str, ...] = ("fastpatch",)
    opt_in: Tuple[str, ...] = ()
    min_percent_peak: Optional[float] = None  # of the fastpatch row, when the goal has one
    note: str = ""

    @property
    def goal_text(self) -> str:
        peak = f" and >= {self.min_percent_peak:g}% of dense peak" if self.min_percent_peak is not None else ""
        return f">= {self.goal:g}x{peak}"


ATTENTION_B8 = "rope_attention-{mode}-n768-b8-{dtype}-cuda"  # bench/test_bench_attention.py
ENCODER_B8 = "encoder-forward-384x512-b8-bfloat16-cuda"  # bench/test_bench_model.py
PAIR_B1 = "pair-forward-384x512-b1-bfloat16-cuda"  # bench/test_bench_model.py, bench/test_bench_pair_latency.py
PATCH_EMBED_B8 = "patch_embed-forward-384x512-b8-{dtype}-cuda"  # bench/test_bench_patch_embed.py
EMBED_EAGER = "conv + flatten + transpose + positions (`eager`)"

TARGETS = [
    Target("rope_attention fwd, B=8 H=16 N=768 Dh=64 bf16",
           "torch RoPE + best SDPA backend: fastest of `torch_path`, `sdpa_flash`, `sdpa_cudnn`", 1.3,
           ATTENTION_B8.format(mode="forward", dtype="bfloat16"), ("torch_path", "sdpa_flash", "sdpa_cudnn")),
    Target("rope_attention fwd+bwd, same shape", "torch RoPE + SDPA (`torch_path`)", 1.3,
           ATTENTION_B8.format(mode="forward_backward", dtype="bfloat16"), ("torch_path",)),
    Target("rope_attention fwd, same shape, fp32 with TF32 allowed", "upstream eager with TF32 (`eager_tf32`)", 5.0,
           ATTENTION_B8.format(mode="forward", dtype="float32"), ("eager_tf32",), ("fastpatch_tf32",)),
    Target("ViT-L encoder, 512x384, batch 8, bf16", "eager", 2.5, ENCODER_B8, ("eager",)),
    Target("ViT-L encoder, 512x384, batch 8, bf16", "torch.compile of eager + SDPA (`eager_compiled`)", 1.15,
           ENCODER_B8, ("eager_compiled",), min_percent_peak=55.0,
           note="`eager_compiled` is `torch.compile` of the eager model, whose attention is an explicit softmax; "
                "inductor's attention pattern rewrites it into SDPA (seen on CPU, fp32 and bf16 autocast, on "
                "the reference `Block`; not checked on CUDA). No test times fastpatch and it together: the "
                "ratio is taken via eager."),
    Target("full pair forward, batch 1, bf16 (CUDA graphs allowed)", "eager", 2.0, PAIR_B1, ("eager",),
           ("fastpatch", "fastpatch_cuda_graphs"), opt_in=("fastpatch_compiled_graphs",)),
    Target("patch embedding, 512x384, batch 8, bf16", EMBED_EAGER, 3.0,
           PATCH_EMBED_B8.format(dtype="bfloat16"), ("eager",)),
    Target("patch embedding, 512x384, batch 8, fp32", EMBED_EAGER, 3.0,
           PATCH_EMBED_B8.format(dtype="float32"), ("eager",)),
]

# The CUDA tests that prove "no host sync" for the patch embedding: sync debug mode "error" on the
# patch_embed op (forward + backward) and on a patched model with PatchEmbedDust3R / ManyAR_PatchEmbed.
NO_HOST_SYNC_TESTS = ("tests/ops/test_patch_embed_devices.py::test_no_device_synchronisation",
                      "tests/ops/test_cuda_sync.py::test_patched_forward_and_backward_do_not_sync")


@dataclass
class Outcome:
    """A target's line of the table."""

    what: str
    against: str
    goal: str
    measured: str
    tflops: Optional[float]
    percent_peak: Optional[float]
    status: str  # "met", "missed (...)", "not measured: ..."


def gpu_device(rows: List[Dict]) -> Optional[str]:
    """The GPU the rows ran on; None if none did; ValueError if several did (targets compare one run)."""
    devices = sorted({r["info"].get("device", "cpu") for r in rows} - {"cpu"})
    if len(devices) > 1:
        raise ValueError(f"rows from several GPUs ({', '.join(devices)}): the targets compare one run on one GPU")
    return devices[0] if devices else None


def _speedup(row: Dict, baseline: str, baseline_rows: List[Dict]) -> Tuple[Optional[float], bool]:
    """(``row``'s speedup over ``baseline``, whether it was taken via eager); (None, False) if unpaired."""
    paired = ratio(row["info"], baseline, row["median_ms"])
    if paired is not None:
        return paired, False
    via_eager = [row["vs_eager"] / b["vs_eager"] for b in baseline_rows if row["vs_eager"] and b["vs_eager"]]
    return (min(via_eager), True) if via_eager else (None, False)


def _names(providers: Sequence[str]) -> str:
    return ", ".join(f"`{p}`" for p in providers)


def _best(rows_of: Dict[str, List[Dict]], providers: Sequence[str], baselines: Sequence[str]) -> Optional[tuple]:
    """(speedup, via eager, provider, baseline, row): the best provider row against its fastest baseline;
    None when no provider row has a paired timing of every baseline."""
    candidates = []
    for provider in providers:
        for row in rows_of[provider]:
            speedups = {b: _speedup(row, b, rows_of[b]) for b in baselines}
            if all(value is not None for value, _ in speedups.values()):
                fastest_baseline = min(speedups, key=lambda b: speedups[b][0])
                candidates.append((*speedups[fastest_baseline], provider, fastest_baseline, row))
    return max(candidates, key=lambda c: c[0]) if candidates else None


def _evaluate(target: Target, index: Dict[Tuple[str, str], List[Dict]]) -> Outcome:
    rows_of = {p: index.get((target.case, p), []) for p in target.baselines + target.providers + target.opt_in}
    providers = [p for p in target.providers + target.opt_in if rows_of[p]]
    baselines = [b for b in target.baselines if rows_of[b]]
    best = _best(rows_of, providers, baselines) if providers and baselines else None
    measured, row = "", None
    if best is not None:
        value, via_eager, provider, baseline, row = best
        fastest = "" if len(target.baselines) == 1 else (
            f", the fastest of {len(baselines)}{'' if baselines == list(target.baselines) else ' measured'}")
        repeats = f", best of {len(rows_of[provider])} rows" if len(rows_of[provider]) > 1 else ""
        measured = f"{value:.2f}x: `{provider}` vs `{baseline}`{fastest}{', via eager' if via_eager else ''}{repeats}"

    def outcome(status: str) -> Outcome:
        return Outcome(target.what, target.against, target.goal_text, measured, row["tflops"] if row else None,
                       row["percent_peak"] if row else None, status)

    missing = [b for b in target.baselines if not rows_of[b]] + ([] if providers else list(target.providers))
    not_run = [p for p in target.opt_in if not rows_of[p]]
    if missing:
        return outcome(f"not measured: no row of `{target.case}` for {_names(missing)}")
    if best is None:
        return outcome(f"not measured: no paired timing of {_names(providers)} against {_names(baselines)}")
    shortfalls = [] if value >= target.goal else [f"{value:.2f}x < {target.goal:g}x"]
    if target.min_percent_peak is not None:
        if row["percent_peak"] is None:
            info = row["info"]
            return outcome(f"not measured: no dense peak known for {info.get('device')} ({info.get('dtype')})")
        if row["percent_peak"] < target.min_percent_peak:
            shortfalls.append(f"{row['percent_peak']:.1f}% < {target.min_percent_peak:g}% of dense peak")
    if not shortfalls:
        return outcome("met")
    unmeasured = [p for p in target.providers if not rows_of[p]]
    if unmeasured:
        return outcome(f"not measured: no row of `{target.case}` for {_names(unmeasured)} (the others miss: "
                       f"{'; '.join(shortfalls)})")
    opt_in = f"; {_names(not_run)} not run" if not_run else ""
    return outcome(f"missed ({'; '.join(shortfalls)}{opt_in})")


def _junit_key(test_id: str) -> str:
    """``tests/test_x.py::test_y`` -> ``test_x::test_y``, as :func:`_junit_outcomes` keys it."""
    path, function = test_id.split("::")
    return f"{os.path.splitext(os.path.basename(path))[0]}::{function}"


def _junit_outcomes(paths: Sequence[str]) -> Optional[Dict[str, List[str]]]:
    """``module::function`` (module without package, no parameters) -> the outcomes ("passed", "failed",
    "skipped: why") of its cases in the ``tests.xml`` files beside ``paths``; None when there is none."""
    files = sorted({os.path.join(os.path.dirname(os.path.abspath(p)), "tests.xml") for p in paths})
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        return None
    outcomes: Dict[str, List[str]] = {}
    for path in files:
        for case in ElementTree.parse(path).getroot().iter("testcase"):
            module = case.get("classname", "").split(".")[-1]
            key = f"{module}::{case.get('name', '').split('[')[0]}"
            skipped = case.find("skipped")
            if case.find("failure") is not None or case.find("error") is not None:
                result = "failed"
            elif skipped is not None:
                result = f"skipped: {skipped.get('message', '')}"
            else:
                result = "passed"
            outcomes.setdefault(key, []).append(result)
    return outcomes


def host_sync_outcome(paths: Sequence[str]) -> Outcome:
    """The patch embedding's "no host sync" line, from the junit results beside ``paths``."""
    def outcome(measured: str, status: str) -> Outcome:
        return Outcome("patch embedding: no host sync", "", "no host sync", measured, None, None, status)

    junit = _junit_outcomes(paths)
    if junit is None:
        return outcome(f"see {_names(NO_HOST_SYNC_TESTS)}", "not measured: no tests.xml beside the results")
    results = {test: junit.get(_junit_key(test), []) for test in NO_HOST_SYNC_TESTS}
    cells = []
    for test, outcomes in results.items():
        counts = {kind: sum(o.startswith(kind) for o in outcomes) for kind in ("passed", "failed", "skipped")}
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "not in tests.xml"
        cells.append(f"`{test}`: {summary}")
    everything = [o for outcomes in results.values() for o in outcomes]
    if any(o == "failed" for o in everything):
        return outcome("; ".join(cells), "missed (a test failed)")
    if all(outcomes and all(o == "passed" for o in outcomes) for outcomes in results.values()):
        return outcome("; ".join(cells), "met")
    reasons = sorted({o for o in everything if o.startswith("skipped")} or {"not run"})
    return outcome("; ".join(cells), f"not measured: {'; '.join(reasons)}")


def evaluate(rows: List[Dict], paths: Sequence[str] = ()) -> List[Outcome]:
    """Every target's outcome from ``bench/report.py`` rows (``load_rows``), then the no-host-sync line."""
    index: Dict[Tuple[str, str], List[Dict]] = {}
    for row in rows:
        index.setdefault((row["case"], row["provider"]), []).append(row)
    return [_evaluate(target, index) for target in TARGETS] + [host_sync_outcome(paths)]


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1f}"


def table(rows: List[Dict], paths: Sequence[str] = ()) -> List[str]:
    """The markdown table and its notes (lines)."""
    lines = ["| target | against | goal | measured ratio | TFLOP/s | % of dense peak | status |",
             "|---|---|---|---|---:|---:|---|"]
    for o in evaluate(rows, paths):
        lines.append(f"| {o.what} | {o.against} | {o.goal} | {o.measured} | {_fmt(o.tflops)} | "
                     f"{_fmt(o.percent_peak)} | {o.status} |")
    notes = [f"- {target.what} vs {target.against}: {target.note}" for target in TARGETS if target.note]
    return lines + ([""] + notes if notes else [])


def section(rows: List[Dict], paths: Sequence[str]) -> str:
    """``report.md``'s "Targets" section when a row ran on a GPU, else ""."""
    try:
        device = gpu_device(rows)
    except ValueError as error:
        return f"\n## Targets (issue 11)\n\nnot evaluated: {error}\n"
    if device is None:
        return ""
    intro = (f"Issue 11's goals on {device} (same run); ratios paired per round as above, TFLOP/s and % of dense "
             "peak of the fastpatch row. `python -m bench.targets` prints this table.")
    return "\n".join(["", "## Targets (issue 11)", "", intro, ""] + table(rows, paths)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s) of one GPU run")
    args = parser.parse_args(argv)
    header, rows = load_rows(args.results)
    try:
        device = gpu_device(rows)
    except ValueError as error:
        parser.error(str(error))
    if device is None:
        print(f"No GPU rows in {', '.join(args.results)} (device: {header.get('device', 'unknown')}): "
              "issue 11's targets are GPU targets, not applicable to these results.")
        return 0
    dirty = " (uncommitted changes)" if header.get("dirty") else ""
    print("\n".join([
        f"- device: {device}",
        f"- torch {header.get('torch', '?')}, triton {header.get('triton', '?')}, CUDA {header.get('cuda')}",
        f"- commit: {header.get('commit')}{dirty}",
        f"- date: {header.get('date')}", ""] + table(rows, args.results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
