"""Launch-config sweep of the RoPE flash-attention kernels at DUSt3R's shapes (run on a GPU).

    python -m bench.sweep_attention --out DIR [--budget-s S] [--workers N] [--variants bf16,tf32,fp16,fp32]

Shapes (512x384 images: 768 tokens on a 24x32 grid, head dim 64, batch 8): the encoder's 16 heads
and the decoder's 12, q/k/v as strided views of a fused ``(B, N, 3, H, Dh)`` qkv projection as in
the real blocks, RoPE100 on q and k. Per variant -- ``bf16``, ``fp16``, ``tf32`` (float32 on TF32
tensor cores, torch's TF32 switch on) and ``fp32`` (IEEE float32) -- in that order, four steps:

1. ``forward``: every candidate :class:`KernelConfig` of the forward kernel (backward: the table's);
2. ``backward_dq``: candidates of the dQ kernel, timed as the whole backward (dK/dV: the table's);
3. ``backward_dkdv``: candidates of the dK/dV kernel, with step 2's best dQ config;
4. ``k_rotation``: the best configs with keys rotated inside the loop vs pre-rotated once by the RoPE
   kernel (:data:`~fastpatch.kernels.rope_attention_configs.K_ROTATIONS`), forward + backward.

Candidates are the table's entry plus a grid of tile sizes, warps and stages (:data:`GRIDS`); the
best is the least time summed over both shapes among the candidates whose outputs (and gradients)
match a float64 reference within :data:`fastpatch.testing.TOLERANCES`, and it is re-timed
against the table's entry interleaved (:func:`bench.sweep.interleaved_ratio`).

Writes ``DIR/sweep-attention.json`` after every step (environment, every candidate with its ms per
shape, TFLOP/s, % of dense peak, relative error and status, the interleaved comparisons) and
``DIR/sweep-attention.md`` at the end. ``--budget-s`` stops starting new steps once spent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fastpatch.kernels.rope_attention_configs import (
    K_ROTATIONS,
    KernelConfig,
    RopeAttentionConfig,
    rope_attention_config,
)
from fastpatch.launchers.rope_attention import override_config, rope_attention_backward, rope_attention_forward
from fastpatch.ops.rope_attention_torch import rope_attention_torch
from fastpatch.testing import relative_error

from . import flops, sweep
from .sweep import (
    Deadline,
    Probe,
    compile_pool,
    dense_peak,
    environment,
    header_lines,
    interleaved_ratio,
    measure_candidate,
    precompile,
    step_sections,
    step_table,
    sweep_device,
    sweep_steps,
    tf32_switch,
    timer,
    tolerance,
    write_json,
)

__all__ = ["SHAPES", "VARIANTS", "GRIDS", "STEPS", "candidates", "make_inputs", "main"]

HEAD_DIM = 64
ROPE_BASE, ROPE_F0 = 100.0, 1.0
GRID_COLS = 32  # 24 x 32 patch grid at 512x384
#: name -> (batch, heads, tokens)
SHAPES: Dict[str, Tuple[int, int, int]] = {"encoder": (8, 16, 768), "decoder": (8, 12, 768)}
#: name -> (storage dtype, dot precision)
VARIANTS: Dict[str, Tuple[torch.dtype, str]] = {
    "bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"),
    "tf32": (torch.float32, "tf32"), "fp32": (torch.float32, "ieee"),
}
STEPS = ("forward", "backward_dq", "backward_dkdv", "k_rotation")
#: (precision class, kernel) -> (block_m, block_n, num_warps, num_stages) values crossed into candidates.
#: IEEE fp32 takes twice the registers per operand and has no tensor-core pipeline: small tiles, 1 stage.
GRIDS: Dict[Tuple[str, str], Tuple[Tuple[int, ...], ...]] = {
    ("half", "forward"): ((64, 128), (64, 128), (4, 8), (2, 3)),
    ("half", "backward_dq"): ((64, 128), (32, 64), (4, 8), (1, 2)),
    ("half", "backward_dkdv"): ((32, 64, 128), (64, 128), (4, 8), (1, 2)),
    ("tf32", "forward"): ((64, 128), (32, 64), (4, 8), (1, 2)),
    ("tf32", "backward_dq"): ((64, 128), (32, 64), (4, 8), (1, 2)),
    ("tf32", "backward_dkdv"): ((32, 64), (32, 64, 128), (4, 8), (1, 2)),
    ("ieee", "forward"): ((32, 64), (32, 64), (4, 8), (1,)),
    ("ieee", "backward_dq"): ((32, 64), (32, 64), (4, 8), (1,)),
    ("ieee", "backward_dkdv"): ((32, 64), (32, 64), (4, 8), (1,)),
}
#: ``--quick``: one extra candidate per kernel (the sweep's own tests, in the interpreter).
QUICK_GRID = ((32,), (32,), (4,), (1,))


def _precision_class(variant: str) -> str:
    dtype, precision = VARIANTS[variant]
    return "half" if dtype != torch.float32 else precision


def table_config(variant: str, device: torch.device) -> RopeAttentionConfig:
    """The config table's entry for ``variant`` on ``device`` (the sweep's baseline)."""
    dtype, precision = VARIANTS[variant]
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return rope_attention_config(HEAD_DIM, dtype, capability, precision)


def candidates(variant: str, kernel: str, table: RopeAttentionConfig, quick: bool = False) -> List[KernelConfig]:
    """The table's ``kernel`` config first, then the grid's other configs (:data:`GRIDS` or :data:`QUICK_GRID`)."""
    grid = QUICK_GRID if quick else GRIDS[(_precision_class(variant), kernel)]
    current = getattr(table, kernel)
    crossed = [KernelConfig(*values) for values in itertools.product(*grid)]
    return [current] + [c for c in crossed if c != current]


@dataclasses.dataclass
class Inputs:
    """One shape's tensors: q, k, v (B, H, N, Dh) views of a (B, N, 3, H, Dh) buffer, positions (B, N, 2),
    the upstream gradient (B, N, H, Dh), and the float64 reference output and gradients (filled lazily)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    grad_out: torch.Tensor
    reference: Optional[Tuple[torch.Tensor, ...]] = None


def make_inputs(shape: Tuple[int, int, int], dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs of ``shape`` = (batch, heads, tokens) in the real blocks' memory layout."""
    batch, heads, tokens = shape
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, HEAD_DIM, generator=generator).to(device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    cols = GRID_COLS if tokens % GRID_COLS == 0 else tokens
    index = torch.arange(tokens)
    pos = torch.stack((index // cols, index % cols), dim=-1).expand(batch, tokens, 2).contiguous().to(device)
    grad_out = torch.randn(batch, tokens, heads, HEAD_DIM, generator=generator).to(device=device, dtype=dtype)
    return Inputs(q, k, v, pos, grad_out)


def _reference(inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    """float64 (out (B, N, H, Dh), dq, dk, dv) of the torch path, computed once per shape."""
    if inputs.reference is None:
        q, k, v = (t.detach().double().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
        with torch.enable_grad():
            out = rope_attention_torch(q, k, v, inputs.pos, inputs.pos, ROPE_BASE, ROPE_F0, HEAD_DIM ** -0.5)
            out.backward(inputs.grad_out.double().transpose(1, 2))
        inputs.reference = (out.detach().transpose(1, 2), q.grad, k.grad, v.grad)
    return inputs.reference


def _forward(inputs: Inputs) -> Tuple[torch.Tensor, torch.Tensor]:
    return rope_attention_forward(inputs.q, inputs.k, inputs.v, inputs.pos, inputs.pos, ROPE_BASE, ROPE_F0,
                                  HEAD_DIM ** -0.5)


def _backward(inputs: Inputs, out: torch.Tensor, lse: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return rope_attention_backward(inputs.grad_out, inputs.q, inputs.k, inputs.v, out, lse, inputs.pos, inputs.pos,
                                   ROPE_BASE, ROPE_F0, HEAD_DIM ** -0.5)


def _timed_call(step: str, inputs: Inputs) -> Callable[[], object]:
    """What a step times: the forward, the backward alone (forward outputs made once), or both."""
    if step == "forward":
        return lambda: _forward(inputs)
    if step in ("backward_dq", "backward_dkdv"):
        out, lse = _forward(inputs)
        return lambda: _backward(inputs, out, lse)
    return lambda: _backward(inputs, *_forward(inputs))


def _errors(step: str, inputs: Inputs) -> Dict[str, float]:
    """Relative errors of the forward output (and, past step 1, the gradients) vs the float64 reference."""
    out, lse = _forward(inputs)
    reference = _reference(inputs)
    errors = {"out": relative_error(out, reference[0])}
    if step != "forward":
        for name, grad, expected in zip(("dq", "dk", "dv"), _backward(inputs, out, lse), reference[1:]):
            errors[name] = relative_error(grad, expected)
    return errors


def _flops(step: str, shape: Tuple[int, int, int]) -> float:
    batch, heads, tokens = shape
    forward = flops.attention_core(batch, heads, tokens, tokens, HEAD_DIM)
    backward = (flops.FWD_BWD_ATTENTION - 1.0) * forward
    return {"forward": forward, "k_rotation": forward + backward}.get(step, backward)


def _config_dict(config: RopeAttentionConfig) -> Dict[str, object]:
    return dataclasses.asdict(config)


def _probes(step: str, shapes: Dict[str, Inputs]) -> Dict[str, Probe]:
    return {name: Probe(errors=lambda inputs=inputs: _errors(step, inputs),
                        make_call=lambda inputs=inputs: _timed_call(step, inputs),
                        flops=_flops(step, tuple(inputs.q.shape[:3])))
            for name, inputs in shapes.items()}


def _launching(variant: str, config: RopeAttentionConfig, device: torch.device) -> Callable[[], ContextManager]:
    """Context factory: torch's TF32 switch for ``variant`` and ``config`` in place of the table's entry."""
    dtype, precision = VARIANTS[variant]

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with tf32_switch(torch.backends.cuda.matmul, precision == "tf32"), \
                override_config(config, device, dtype, HEAD_DIM, precision):
            yield
    return context


def measure(variant: str, step: str, config: RopeAttentionConfig, shapes: Dict[str, Inputs],
            device: torch.device, peak: Optional[float]) -> Dict[str, object]:
    """One candidate of ``step`` at every shape (:func:`bench.sweep.measure_candidate`)."""
    row = {"variant": variant, "step": step, "config": _config_dict(config)}
    return measure_candidate(row, _launching(variant, config, device), _probes(step, shapes),
                             tolerance(VARIANTS[variant][0], VARIANTS[variant][1] == "tf32", step), device, peak)


def _with(config: RopeAttentionConfig, step: str, value) -> RopeAttentionConfig:
    field = "k_rotation" if step == "k_rotation" else step
    return dataclasses.replace(config, **{field: value})


def _step_options(variant: str, step: str, base: RopeAttentionConfig, table: RopeAttentionConfig, quick: bool):
    """The configs step ``step`` times: ``base`` with each candidate of the step's kernel (or K rotation)."""
    if step == "k_rotation":
        rotations = [table.k_rotation] + [r for r in K_ROTATIONS if r != table.k_rotation]
        return [_with(base, step, rotation) for rotation in rotations]
    return [_with(base, step, candidate) for candidate in candidates(variant, step, table, quick)]


def _compile_worker(jobs: List[Tuple[str, str, Dict[str, object], Tuple[int, int, int]]]) -> Dict[str, str]:
    """Precompile worker (a spawned process): launch each (variant, step, config, shape) once at batch 1
    (same specialisation as the timed batch-8 call: batch is only in the grid), filling Triton's cache.
    Returns ``{job: error}`` for the jobs that raised."""
    device = sweep_device()
    failures = {}
    for variant, step, config, shape in jobs:
        config = _config_from_dict(config)
        inputs = make_inputs((1,) + tuple(shape[1:]), VARIANTS[variant][0], device)
        try:
            with _launching(variant, config, device)():
                _timed_call(step, inputs)()
        except Exception as error:  # noqa: BLE001 -- reported, the timing process skips nothing on its own
            failures[repr((variant, step, config, shape))] = f"{type(error).__name__}: {error}"
    return failures


def _config_from_dict(config: Dict[str, object]) -> RopeAttentionConfig:
    kernels = {name: KernelConfig(**config[name]) for name in ("forward", "backward_dq", "backward_dkdv")}
    return RopeAttentionConfig(rope_block=config["rope_block"], k_rotation=config["k_rotation"], **kernels)


def _precompile_jobs(variant: str, shapes: Dict[str, Tuple[int, int, int]], table: RopeAttentionConfig,
                     quick: bool):
    """Every candidate of steps 1-3 of ``variant`` (table partners) per shape: what the workers compile."""
    jobs = []
    for step in STEPS[:3]:
        for config in _step_options(variant, step, table, table, quick):
            jobs += [(variant, step, _config_dict(config), shape) for shape in shapes.values()]
    return jobs


def _compare(variant: str, step: str, table: RopeAttentionConfig, best: RopeAttentionConfig,
             shapes: Dict[str, Inputs], device: torch.device, rounds: int) -> Dict[str, object]:
    """The best config vs the table's entry, timed interleaved per shape: ratio > 1 means the best is faster."""
    result = {"variant": variant, "step": step, "table": _config_dict(table), "best": _config_dict(best), "ratio": {}}
    for name, probe in _probes(step, shapes).items():
        ratio, base, cand = interleaved_ratio(timer(probe.make_call, device, _launching(variant, table, device)),
                                              timer(probe.make_call, device, _launching(variant, best, device)),
                                              rounds)
        result["ratio"][name] = {"ratio": ratio, "table_ms": base, "best_ms": cand}
    return result


def run(out_dir: str, variants: Sequence[str], shapes: Dict[str, Tuple[int, int, int]], device: torch.device,
        budget_s: Optional[float] = None, workers: int = 0, quick: bool = False,
        log: Callable[[str], None] = print) -> Dict[str, object]:
    """The sweep (see the module docstring); returns the JSON document it wrote."""
    deadline = Deadline(budget_s)
    path = os.path.join(out_dir, "sweep-attention.json")
    document: Dict[str, object] = {"environment": environment(device), "shapes": shapes, "head_dim": HEAD_DIM,
                                   "rows": [], "comparisons": [], "chosen": {}, "skipped": [], "precompile": {}}
    write_json(path, document)  # an interrupted sweep still leaves its environment
    with compile_pool(workers if device.type == "cuda" else 0) as pool:
        for variant in variants:
            _sweep_variant(document, path, variant, shapes, device, deadline, pool, workers, quick, log)
    return document


def _sweep_variant(document: Dict[str, object], path: str, variant: str, shapes: Dict[str, Tuple[int, int, int]],
                   device: torch.device, deadline: Deadline, pool, workers: int, quick: bool,
                   log: Callable[[str], None]) -> None:
    """Steps 1-4 of one variant, appending to ``document`` and rewriting ``path`` after each."""
    dtype, _ = VARIANTS[variant]
    table = table_config(variant, device)
    if not deadline.expired():
        document["precompile"].update(precompile(pool, _compile_worker, _precompile_jobs(variant, shapes, table, quick),
                                                 workers))
    peak = dense_peak(device, dtype, VARIANTS[variant][1] == "tf32")
    inputs = {name: make_inputs(shape, dtype, device, seed) for seed, (name, shape) in enumerate(shapes.items())}
    best = sweep_steps(
        document, path, variant, STEPS, table,
        options=lambda step, best: _step_options(variant, step, best, table, quick),
        measure=lambda step, config: measure(variant, step, config, inputs, device, peak),
        compare=lambda step, best: _compare(variant, step, table, best, inputs, device, 1 if quick else 5),
        decode=_config_from_dict, deadline=deadline, log=log)
    if any(row["variant"] == variant for row in document["rows"]):
        document["chosen"][variant] = _config_dict(best)
    write_json(path, document)


def _describe(step: str) -> Callable[[Dict[str, object]], str]:
    def describe(row: Dict[str, object]) -> str:
        if step == "k_rotation":
            return row["config"]["k_rotation"]
        c = row["config"][step]
        return f"M{c['block_m']} N{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
    return describe


def markdown(document: Dict[str, object]) -> str:
    """The sweep's report: environment, per variant and step the ranked candidates, the interleaved
    best-vs-table ratios and the chosen configs (to copy into ``kernels/rope_attention_configs.py``)."""
    lines = header_lines("RoPE attention launch-config sweep", document,
                         f"shapes (B, H, N) at head dim {document['head_dim']}", "backward: 2.5x the forward")
    for variant, step, rows, comparison in step_sections(document, VARIANTS, STEPS):
        baseline = rows[0]["config"]  # each step times the table's option first
        lines += [f"## {variant} {step}", ""] + step_table(rows, _describe(step), baseline) + [""]
        if comparison:
            ratios = ", ".join(f"{name} {r['ratio']:.3f}x" for name, r in comparison["ratio"].items())
            same = " (the best is the table's entry: the spread of the timing)" if (
                comparison["best"] == comparison["table"]) else ""
            lines += [f"Best so far vs the table's entry, interleaved (> 1: best faster): {ratios}{same}", ""]
    if document["chosen"]:
        lines += ["## Chosen configs", ""]
        lines += [f"- {variant}: {config}" for variant, config in document["chosen"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return sweep.main(argv, __doc__.split("\n")[0], list(VARIANTS), SHAPES, "B,H,N", run, markdown,
                      "sweep-attention.md")


if __name__ == "__main__":
    sys.exit(main())
