"""Shared machinery of the launch-config sweeps (``bench/sweep_attention.py``, ``bench/sweep_patch_embed.py``).

A sweep times every candidate config of a kernel on the GPU it runs on, checks each candidate's
result against a float64 reference (a candidate that computes wrong numbers is never picked),
and re-times the best candidate against the config table's current entry *interleaved* (A, B, A,
B, ...) so the reported speedup is a side-by-side ratio. It is a one-off tuning tool, run by hand
or by ``bench/gpu_tune.sh``: the chosen configs go into the kernels' config tables, whose
docstrings point at the committed results; nothing autotunes at run time.

Compiling is most of a sweep's cost on a fresh machine (one Triton compile per candidate, ~1-3 s
each): :func:`precompile` spreads the candidates over worker processes that launch each one once
on a small input with the same specialisation, filling Triton's on-disk cache, so the timing
process only loads the binaries.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["Deadline", "Probe", "time_ms", "timer", "measure_candidate", "interleaved_ratio", "total_ms",
           "sweep_steps", "step_table", "environment", "compile_pool", "precompile", "tf32_switch", "tolerance",
           "sweep_device", "step_sections", "dense_peak", "header_lines", "main", "write_json", "shard"]

#: do_bench settings on CUDA (milliseconds of warm-up and of timed repetitions per candidate).
WARMUP_MS, REPETITION_MS = 10, 40
#: Calls per measurement on CPU (the interpreter: only the sweep's own tests run there).
CPU_REPETITIONS = 1


class Deadline:
    """Wall-clock budget of a sweep: :meth:`expired` once ``seconds`` have passed since creation."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of one ``fn()`` call: Triton's ``do_bench`` (CUDA events, L2 flushed) on CUDA,
    a wall-clock median of :data:`CPU_REPETITIONS` calls elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=WARMUP_MS, rep=REPETITION_MS, return_mode="median"))
    samples = []
    for _ in range(CPU_REPETITIONS):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def timer(make_call: Callable[[], Callable[[], object]], device: torch.device,
          context: Callable[[], ContextManager] = contextlib.nullcontext) -> Callable[[], float]:
    """A zero-argument function that times ``make_call()``'s call with :func:`time_ms` inside ``context()``
    (a config override, a precision switch): one side of :func:`interleaved_ratio`."""
    def time_side() -> float:
        with context():
            return time_ms(make_call(), device)
    return time_side


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a sweep checks and times of a candidate at one shape.

    ``errors()`` returns relative errors vs the float64 reference by output name; ``make_call()``
    returns the zero-argument call to time (inputs prepared outside it); ``flops`` is that call's work.
    """

    errors: Callable[[], Dict[str, float]]
    make_call: Callable[[], Callable[[], object]]
    flops: float


def measure_candidate(row: Dict[str, object], context: Callable[[], ContextManager], probes: Dict[str, Probe],
                      tolerance: float, device: torch.device, peak: Optional[float]) -> Dict[str, object]:
    """Fill ``row`` (the candidate's identifying fields) with, per probe name: the largest relative
    error, ms, TFLOP/s and % of ``peak`` -- all measured inside ``context()`` -- and a ``status``:
    ``ok``, ``wrong: ...`` (an error above ``tolerance``: never ranked) or ``failed: <exception>``
    (e.g. Triton's out-of-resources: a candidate that cannot compile or launch is data, not a crash)."""
    row.update(ms={}, tflops={}, percent_peak={}, error={}, status="ok")
    try:
        with context():
            for name, probe in probes.items():
                errors = probe.errors()
                row["error"][name] = max(errors.values())
                if row["error"][name] > tolerance:
                    row["status"] = f"wrong: {errors} above {tolerance}"
                ms = time_ms(probe.make_call(), device)
                tflops = probe.flops / ms * 1e-9
                row["ms"][name], row["tflops"][name] = ms, tflops
                row["percent_peak"][name] = None if peak is None else 100.0 * tflops / peak
    except Exception as error:  # noqa: BLE001 -- see the docstring
        message = str(error).strip().splitlines()
        row["status"] = f"failed: {type(error).__name__}: {message[0] if message else ''}"
    return row


def interleaved_ratio(time_baseline: Callable[[], float], time_candidate: Callable[[], float],
                      rounds: int = 5) -> Tuple[float, List[float], List[float]]:
    """(median over rounds of baseline ms / candidate ms, baseline ms per round, candidate ms per round).

    ``time_baseline`` / ``time_candidate`` each measure one side (e.g. :func:`time_ms` under a config
    override) and are called alternately, so a drift in clocks or load hits both sides alike.
    """
    base, cand = [], []
    for _ in range(rounds):
        base.append(time_baseline())
        cand.append(time_candidate())
    return statistics.median(b / c for b, c in zip(base, cand)), base, cand


def total_ms(row: Dict[str, object]) -> float:
    """A candidate row's time summed over its shapes; infinite unless its status is ``ok``."""
    return sum(row["ms"].values()) if row["status"] == "ok" and row["ms"] else float("inf")


def sweep_steps(document: Dict[str, object], path: str, variant: str, steps: Sequence[str], best: object,
                options: Callable[[str, object], List[object]], measure: Callable[[str, object], Dict[str, object]],
                compare: Callable[[str, object], Dict[str, object]], decode: Callable[[Dict[str, object]], object],
                deadline: Deadline, log: Callable[[str], None]) -> object:
    """Run ``steps`` of one variant in order and return the last best config (``best`` if none ran).

    Per step: ``measure(step, option)`` every config of ``options(step, best)`` into ``document["rows"]``;
    the fastest ``ok`` row's config (``decode``d from its dict) becomes ``best`` and
    ``compare(step, best)`` (an interleaved best-vs-table timing) goes to ``document["comparisons"]``;
    ``path`` is rewritten after each step. A step that starts after ``deadline`` is listed in
    ``document["skipped"]`` instead.
    """
    for step in steps:
        if deadline.expired():
            document["skipped"].append(f"{variant} {step}")
            continue
        rows = [measure(step, option) for option in options(step, best)]
        document["rows"] += rows
        winner = min(rows, key=total_ms)
        if total_ms(winner) < float("inf"):
            best = decode(winner["config"])
            document["comparisons"].append(compare(step, best))
        log(f"{variant} {step}: {len(rows)} candidates, best {winner['config']} {winner['ms']} ms")
        write_json(path, document)
    return best


def _cell(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def step_table(rows: List[Dict[str, object]], describe: Callable[[Dict[str, object]], str],
               baseline: Dict[str, object], top: int = 8) -> List[str]:
    """Markdown lines: the ``top`` fastest ``ok`` rows of one step and the table's entry (marked), then
    a count of the wrong / failed ones. Rows are :func:`sweep_attention.measure`-style dicts; ``describe``
    names a row's config; ``baseline`` is the config dict of the table's entry."""
    shapes = list(next((r["ms"] for r in rows if r["ms"]), {}))
    head = "| config | " + " | ".join(f"{s} ms | {s} TFLOP/s | {s} % peak" for s in shapes) + " | max rel err |"
    lines = [head, "|" + "---|" * (2 + 3 * len(shapes))]
    ranked = sorted((r for r in rows if r["status"] == "ok"), key=total_ms)
    shown = ranked[:top] + [r for r in ranked[top:] if r["config"] == baseline]
    for row in shown:
        mark = " (table)" if row["config"] == baseline else ""
        cells = " | ".join(f"{_cell(row['ms'].get(s), '.4g')} | {_cell(row['tflops'].get(s), '.1f')} | "
                           f"{_cell(row['percent_peak'].get(s), '.1f')}" for s in shapes)
        lines.append(f"| {describe(row)}{mark} | {cells} | {max(row['error'].values()):.2e} |")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines.append("")
        lines.append(f"{len(bad)} candidate(s) not ranked: " + "; ".join(
            f"{describe(r)}: {r['status'][:160]}" for r in bad))
    return lines


def _git_commit() -> Tuple[str, Optional[bool]]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit or "unknown", dirty


def environment(device: torch.device) -> Dict[str, object]:
    """Device, versions, commit and UTC date of a sweep, for its JSON and markdown headers."""
    import triton

    commit, dirty = _git_commit()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "processor": platform.processor() or platform.machine(), "commit": commit, "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def shard(items: Sequence, parts: int) -> List[List]:
    """``items`` dealt round-robin into at most ``parts`` non-empty lists."""
    parts = max(1, min(parts, len(items)))
    return [list(items[i::parts]) for i in range(parts)]


@contextlib.contextmanager
def compile_pool(workers: int) -> Iterator[Optional[concurrent.futures.Executor]]:
    """``workers`` spawned processes for :func:`precompile` (CUDA cannot be re-initialised in a forked
    child), or None for ``workers <= 0`` (the timing process then compiles each candidate on first use)."""
    if workers <= 0:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield pool


def precompile(pool: Optional[concurrent.futures.Executor], worker: Callable[[List], Dict[str, str]],
               jobs: Sequence, workers: int) -> Dict[str, str]:
    """Run ``worker`` on ``workers`` shards of ``jobs`` in ``pool`` (from :func:`compile_pool`); returns the
    merged ``{job key: error message}`` of the jobs that failed (typically Triton's out-of-resources).

    ``worker`` must be a module-level function (it is pickled by name). Nothing runs without a pool.
    """
    failures: Dict[str, str] = {}
    if pool is None or not jobs:
        return failures
    for result in pool.map(worker, shard(jobs, workers)):
        failures.update(result)
    return failures


@contextlib.contextmanager
def tf32_switch(backend, enabled: bool) -> Iterator[None]:
    """``backend.allow_tf32`` (``torch.backends.cuda.matmul`` or ``torch.backends.cudnn``: what the launchers
    and torch's own ops read) set to ``enabled`` inside the block, restored after."""
    saved = backend.allow_tf32
    backend.allow_tf32 = enabled
    try:
        yield
    finally:
        backend.allow_tf32 = saved


def tolerance(dtype: torch.dtype, tf32: bool, step: str) -> float:
    """The largest relative error a candidate may have (:data:`fastpatch.testing.TOLERANCES`): the
    forward bound for ``step == "forward"``, the gradient bound otherwise; TF32's row when ``tf32``."""
    from fastpatch.testing import TOLERANCES

    bounds = TOLERANCES["tf32" if tf32 else dtype]
    return bounds.forward if step == "forward" else bounds.backward


def sweep_device() -> torch.device:
    """Where a sweep runs: the current CUDA device by index (the key its launchers' overrides use), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def step_sections(document: Dict[str, object], variants: Sequence[str],
                  steps: Sequence[str]) -> Iterator[Tuple[str, str, List[Dict[str, object]], Optional[Dict]]]:
    """(variant, step, its candidate rows, its interleaved comparison or None) for every step that ran, in
    ``variants`` x ``steps`` order: what a sweep's markdown reports section by section."""
    for variant in variants:
        for step in steps:
            rows = [r for r in document["rows"] if r["variant"] == variant and r["step"] == step]
            if rows:
                comparison = next((c for c in document["comparisons"]
                                   if c["variant"] == variant and c["step"] == step), None)
                yield variant, step, rows, comparison


def dense_peak(device: torch.device, dtype: torch.dtype, tf32: bool) -> Optional[float]:
    """The GPU's dense peak TFLOP/s for ``dtype`` (float32 on TF32 tensor cores when ``tf32``); None on CPU."""
    if device.type != "cuda":
        return None
    from .report import peak_tflops

    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "tfloat32" if tf32 else "float32")
    return peak_tflops(torch.cuda.get_device_name(device), name)


def header_lines(title: str, document: Dict[str, object], shapes_line: str, flops_note: str) -> List[str]:
    """The first lines of a sweep's markdown: title, device and versions, commit and date, shapes, units,
    and the steps the budget skipped."""
    env = document["environment"]
    lines = [f"# {title}", "",
             f"- device: {env['device']} (capability {env['capability']}), torch {env['torch']}, "
             f"triton {env['triton']}, CUDA {env['cuda']}",
             f"- commit: {env['commit']}{' (uncommitted changes)' if env['dirty'] else ''}, {env['date']}",
             f"- {shapes_line}: " + ", ".join(f"{k} {tuple(v)}" for k, v in document["shapes"].items()),
             "- ms: " + ("median of triton.testing.do_bench (L2 flushed)" if env["capability"] else
                         "one wall-clock call (Triton interpreter: a functional check, not a timing)") +
             f"; TFLOP/s from bench/flops.py ({flops_note})", ""]
    if document["precompile"]:
        lines += [f"- precompile failures: {len(document['precompile'])} (listed in the JSON)", ""]
    if document["skipped"]:
        lines += ["- not run (budget spent or interrupted): " + ", ".join(document["skipped"]), ""]
    return lines


def main(argv: Optional[Sequence[str]], description: str, variants: Sequence[str], shapes: Dict[str, tuple],
         shape_fields: str, run: Callable[..., Dict[str, object]], markdown: Callable[[Dict[str, object]], str],
         report_name: str) -> int:
    """Command line of a sweep: parse ``--out --variants --shape --budget-s --workers --quick``, call
    ``run(out, variants, shapes, device, budget_s, workers, quick)`` and write ``markdown(document)`` to
    ``OUT/report_name``. ``shape_fields`` names a shape's comma-separated sizes (e.g. ``B,H,N``).
    Interrupted (SIGINT, e.g. by ``timeout -s INT``), it writes the report of the sweep's last JSON
    write (``OUT/<report_name stem>.json``) and returns 130."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="results folder (created)")
    parser.add_argument("--variants", default=",".join(variants),
                        help="comma-separated subset of " + ",".join(variants))
    parser.add_argument("--shape", action="append", metavar=f"NAME={shape_fields}",
                        help="replace the DUSt3R shapes (repeatable)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new step after this many seconds")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="precompile processes (CUDA only; 0 compiles while timing)")
    parser.add_argument("--quick", action="store_true", help="one extra candidate per kernel (tests)")
    args = parser.parse_args(argv)
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(variants)}")
    if args.shape:
        shapes = {}
        for spec in args.shape:
            name, _, sizes = spec.partition("=")
            shapes[name] = tuple(int(size) for size in sizes.split(","))
            if len(shapes[name]) != len(shape_fields.split(",")):
                parser.error(f"--shape {spec!r}: expected NAME={shape_fields}")
    device = sweep_device()
    os.makedirs(args.out, exist_ok=True)
    status = 0
    try:
        document = run(args.out, chosen, shapes, device, args.budget_s, args.workers, args.quick)
    except KeyboardInterrupt:  # `timeout -s INT`: report what the last JSON write holds
        json_path = os.path.join(args.out, os.path.splitext(report_name)[0] + ".json")
        if not os.path.exists(json_path):
            raise
        with open(json_path) as f:
            document = json.load(f)
        document["skipped"].append("the rest (interrupted)")
        status = 130
    with open(os.path.join(args.out, report_name), "w") as f:
        f.write(markdown(document))
    return status


def write_json(path: str, document: Dict[str, object]) -> None:
    """Write ``document`` to ``path`` atomically (a sweep cut short by its timeout keeps the last full write)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(tmp, path)
