"""Launch-config sweep of the patch-embedding kernels against cuDNN's convolution (run on a GPU).

    python -m bench.sweep_patch_embed --out DIR [--budget-s S] [--workers N] [--variants bf16,tf32,fp32]

Shape: DUSt3R's encoder input, batch 8 of 3x384x512 images, 16x16 patches, 1024 channels (ViT-L):
a (6144 x 768) @ (768 x 1024) GEMM with the im2col done by the loads. Variants: ``bf16``, ``tf32``
(float32 with cuDNN's TF32 switch on, as the conv it replaces) and ``fp32`` (IEEE). One
:class:`~fastpatch.kernels.patch_embed_configs.PatchEmbedConfig` serves the forward and both backward kernels,
so every candidate is timed in two steps:

1. ``forward``: tokens + positions (``patch_embed_forward``), the inference path;
2. ``backward``: weight/bias gradient + image gradient (``patch_embed_grad_params`` + ``patch_embed_grad_image``).

Each step ranks the candidates that match a float64 reference within
:data:`fastpatch.testing.TOLERANCES` and re-times the best against the table's entry interleaved;
``cudnn`` rows time the torch path (``conv2d`` + flatten + transpose + positions, and its autograd
backward) interleaved against the table's entry and the best. Writes ``DIR/sweep-patch-embed.json``
after every step and ``DIR/sweep-patch-embed.md`` at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fastpatch.kernels.patch_embed_configs import PatchEmbedConfig, patch_embed_config
from fastpatch.launchers.patch_embed import (
    override_config,
    patch_embed_forward,
    patch_embed_grad_image,
    patch_embed_grad_params,
)
from fastpatch.ops.patch_embed_torch import patch_embed_torch
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

__all__ = ["SHAPES", "VARIANTS", "GRIDS", "STEPS", "candidates", "make_inputs", "run", "markdown", "main"]

PATCH = 16
#: name -> (batch, height, width, embed dim)
SHAPES: Dict[str, Tuple[int, int, int, int]] = {"encoder": (8, 384, 512, 1024)}
#: name -> (dtype, cuDNN TF32 switch on)
VARIANTS: Dict[str, Tuple[torch.dtype, bool]] = {
    "bf16": (torch.bfloat16, False), "tf32": (torch.float32, True), "fp32": (torch.float32, False),
}
STEPS = ("forward", "backward")
#: "half" / "fp32" -> (block_m, block_n, block_k, num_warps, num_stages) values crossed into candidates.
#: Sized for the tuning run's budget (each candidate compiles three kernels): one pipeline depth per
#: precision and no 256-row tiles (in the static pass, bench/results/2026-11-27-static/, the 4-warp
#: 256x128 ones spill on sm_90 and half of the 256-row ones on sm_80; 8-warp 256-row tiles fit 1-2
#: programs per SM on sm_90, as 128-row ones do: add them back with a larger budget).
GRIDS: Dict[str, Tuple[Tuple[int, ...], ...]] = {
    "half": ((64, 128), (64, 128, 256), (32, 64), (4, 8), (3,)),
    "fp32": ((32, 64, 128), (64, 128), (16, 32), (4, 8), (2,)),
}
#: ``--quick``: one extra candidate (the sweep's own tests, in the interpreter).
QUICK_GRID = ((32,), (32,), (32,), (4,), (1,))


def table_config(variant: str, embed_dim: int, device: torch.device) -> PatchEmbedConfig:
    """The config table's entry for ``variant`` at ``embed_dim`` on ``device`` (the sweep's baseline)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return patch_embed_config(embed_dim, VARIANTS[variant][0], capability)


def candidates(variant: str, table: PatchEmbedConfig, quick: bool = False) -> List[PatchEmbedConfig]:
    """The table's config first, then the grid's others."""
    grid = QUICK_GRID if quick else GRIDS["half" if VARIANTS[variant][0] != torch.float32 else "fp32"]
    crossed = [PatchEmbedConfig(*values) for values in itertools.product(*grid)]
    return [table] + [c for c in crossed if c != table]


@dataclasses.dataclass
class Inputs:
    """One shape's tensors: image (B, 3, H, W) NCHW, weight (E, 3, p, p), bias (E,), upstream gradient
    (B, N, E), and the float64 reference (tokens, grad weight, grad bias, grad image), filled lazily."""

    img: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    grad_tokens: torch.Tensor
    reference: Optional[Tuple[torch.Tensor, ...]] = None


def make_inputs(shape: Tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs of ``shape`` = (batch, height, width, embed dim), weights at ViT init scale."""
    batch, height, width, embed_dim = shape
    generator = torch.Generator().manual_seed(seed)

    def tensor(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(device=device, dtype=dtype)
    tokens = (height // PATCH) * (width // PATCH)
    return Inputs(img=tensor(batch, 3, height, width), weight=tensor(embed_dim, 3, PATCH, PATCH, scale=0.02),
                  bias=tensor(embed_dim, scale=0.02), grad_tokens=tensor(batch, tokens, embed_dim))


def _reference(inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    if inputs.reference is None:
        img, weight, bias = (t.detach().double().requires_grad_() for t in (inputs.img, inputs.weight, inputs.bias))
        with torch.enable_grad():
            tokens, _ = patch_embed_torch(img, weight, bias, PATCH)
            tokens.backward(inputs.grad_tokens.double())
        inputs.reference = (tokens.detach(), weight.grad, bias.grad, img.grad)
    return inputs.reference


def _backward(inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    grad_weight, grad_bias = patch_embed_grad_params(inputs.grad_tokens, inputs.img, inputs.weight, PATCH)
    return grad_weight, grad_bias, patch_embed_grad_image(inputs.grad_tokens, inputs.img, inputs.weight, PATCH)


def _errors(step: str, inputs: Inputs) -> Dict[str, float]:
    reference = _reference(inputs)
    if step == "forward":
        tokens, _ = patch_embed_forward(inputs.img, inputs.weight, inputs.bias, PATCH)
        return {"tokens": relative_error(tokens, reference[0])}
    return {name: relative_error(grad, expected)
            for name, grad, expected in zip(("weight", "bias", "img"), _backward(inputs), reference[1:])}


def _kernel_call(step: str, inputs: Inputs) -> Callable[[], object]:
    if step == "forward":
        return lambda: patch_embed_forward(inputs.img, inputs.weight, inputs.bias, PATCH)
    return lambda: _backward(inputs)


def _cudnn_call(step: str, inputs: Inputs) -> Callable[[], object]:
    """The torch path: conv2d + flatten + transpose + positions; backward = its autograd (graph built once)."""
    if step == "forward":
        return lambda: patch_embed_torch(inputs.img, inputs.weight, inputs.bias, PATCH)
    leaves = tuple(t.detach().requires_grad_() for t in (inputs.img, inputs.weight, inputs.bias))
    with torch.enable_grad():
        tokens, _ = patch_embed_torch(*leaves, PATCH)
    return lambda: torch.autograd.grad(tokens, leaves, inputs.grad_tokens, retain_graph=True)


def _flops(step: str, inputs: Inputs) -> float:
    batch, _, height, width = inputs.img.shape
    forward = flops.patch_embed(batch, (height // PATCH) * (width // PATCH), inputs.weight.shape[0], PATCH)
    return forward if step == "forward" else 2.0 * forward


def _launching(variant: str, config: Optional[PatchEmbedConfig], inputs: Inputs) -> Callable[[], ContextManager]:
    """Context factory: cuDNN's TF32 switch for ``variant`` and (unless None) ``config`` in place of the table's."""
    dtype, tf32 = VARIANTS[variant]

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with tf32_switch(torch.backends.cudnn, tf32):
            if config is None:
                yield
            else:
                with override_config(config, inputs.img.device, dtype, inputs.weight.shape[0]):
                    yield
    return context


def _config_dict(config: PatchEmbedConfig) -> Dict[str, int]:
    return config._asdict()


def measure(variant: str, step: str, config: PatchEmbedConfig, shapes: Dict[str, Inputs], device: torch.device,
            peak: Optional[float]) -> Dict[str, object]:
    """One candidate of ``step`` at every shape (:func:`bench.sweep.measure_candidate`); the shapes share an
    embedding width (the override is keyed by it)."""
    first = next(iter(shapes.values()))
    probes = {name: Probe(errors=lambda inputs=inputs: _errors(step, inputs),
                          make_call=lambda inputs=inputs: _kernel_call(step, inputs), flops=_flops(step, inputs))
              for name, inputs in shapes.items()}
    row = {"variant": variant, "step": step, "config": _config_dict(config)}
    return measure_candidate(row, _launching(variant, config, first), probes, tolerance(*VARIANTS[variant], step),
                             device, peak)


def _compare(variant: str, step: str, table: PatchEmbedConfig, best: PatchEmbedConfig, shapes: Dict[str, Inputs],
             device: torch.device, rounds: int) -> Dict[str, object]:
    """Interleaved speedups per shape, "X vs Y" = Y's time / X's (> 1: X is faster): best vs the table's
    entry, the table's entry vs cuDNN, the best vs cuDNN."""
    result = {"variant": variant, "step": step, "table": _config_dict(table), "best": _config_dict(best), "ratio": {}}
    for name, inputs in shapes.items():
        def kernel(config):
            return timer(lambda: _kernel_call(step, inputs), device, _launching(variant, config, inputs))
        cudnn = timer(lambda: _cudnn_call(step, inputs), device, _launching(variant, None, inputs))
        best_vs_table, table_ms, best_ms = interleaved_ratio(kernel(table), kernel(best), rounds)
        table_vs_cudnn, cudnn_ms, _ = interleaved_ratio(cudnn, kernel(table), rounds)
        best_vs_cudnn, _, _ = interleaved_ratio(cudnn, kernel(best), rounds)
        result["ratio"][name] = {"ratio": best_vs_table, "table_ms": table_ms, "best_ms": best_ms,
                                 "table_vs_cudnn": table_vs_cudnn, "best_vs_cudnn": best_vs_cudnn,
                                 "cudnn_ms": cudnn_ms}
    return result


def _compile_worker(jobs: List[Tuple[str, Dict[str, int], Tuple[int, int, int, int]]]) -> Dict[str, str]:
    """Precompile worker (a spawned process): run each (variant, config, shape) forward and backward once at
    batch 1 (the same specialisation as batch 8), filling Triton's cache. Returns ``{job: error}``."""
    device = sweep_device()
    failures = {}
    for variant, config, shape in jobs:
        config = PatchEmbedConfig(**config)
        inputs = make_inputs((1,) + tuple(shape[1:]), VARIANTS[variant][0], device)
        try:
            with _launching(variant, config, inputs)():
                for step in STEPS:
                    _kernel_call(step, inputs)()
        except Exception as error:  # noqa: BLE001 -- reported; the timing process records it per candidate
            failures[repr((variant, config, shape))] = f"{type(error).__name__}: {error}"
    return failures


def run(out_dir: str, variants: Sequence[str], shapes: Dict[str, Tuple[int, int, int, int]], device: torch.device,
        budget_s: Optional[float] = None, workers: int = 0, quick: bool = False,
        log: Callable[[str], None] = print) -> Dict[str, object]:
    """The sweep (see the module docstring); returns the JSON document it wrote."""
    if len({shape[3] for shape in shapes.values()}) != 1:
        raise ValueError(f"the shapes of one sweep share an embedding width, got {shapes}")
    deadline = Deadline(budget_s)
    path = os.path.join(out_dir, "sweep-patch-embed.json")
    document: Dict[str, object] = {"environment": environment(device), "shapes": shapes, "patch": PATCH,
                                   "rows": [], "comparisons": [], "chosen": {}, "skipped": [], "precompile": {}}
    write_json(path, document)  # an interrupted sweep still leaves its environment
    embed_dim = next(iter(shapes.values()))[3]
    with compile_pool(workers if device.type == "cuda" else 0) as pool:
        for variant in variants:
            table = table_config(variant, embed_dim, device)
            options = candidates(variant, table, quick)
            if not deadline.expired():
                jobs = [(variant, _config_dict(c), shape) for c in options for shape in shapes.values()]
                document["precompile"].update(precompile(pool, _compile_worker, jobs, workers))
            inputs = {name: make_inputs(shape, VARIANTS[variant][0], device, seed)
                      for seed, (name, shape) in enumerate(shapes.items())}
            peak = dense_peak(device, *VARIANTS[variant])
            chosen = {}
            for step in STEPS:
                chosen[step] = sweep_steps(
                    document, path, variant, (step,), None, options=lambda step, best: options,
                    measure=lambda step, config: measure(variant, step, config, inputs, device, peak),
                    compare=lambda step, best: _compare(variant, step, table, best, inputs, device,
                                                        1 if quick else 5),
                    decode=lambda config: PatchEmbedConfig(**config), deadline=deadline, log=log)
            measured = {step: _config_dict(config) for step, config in chosen.items() if config is not None}
            if measured:
                document["chosen"][variant] = measured
            write_json(path, document)
    return document


def _describe(row: Dict[str, object]) -> str:
    c = row["config"]
    return f"M{c['block_m']} N{c['block_n']} K{c['block_k']} w{c['num_warps']} s{c['num_stages']}"


def markdown(document: Dict[str, object]) -> str:
    """The sweep's report: environment, per variant and step the ranked candidates, the interleaved ratios
    (best vs table, table and best vs cuDNN) and the chosen configs (for ``kernels/patch_embed.py``)."""
    lines = header_lines("Patch-embedding launch-config sweep", document,
                         f"shapes (B, H, W, E), patch {document['patch']}", "backward: 2x the forward")
    for variant, step, rows, comparison in step_sections(document, VARIANTS, STEPS):
        lines += [f"## {variant} {step}", ""] + step_table(rows, _describe, rows[0]["config"]) + [""]
        if comparison:
            for name, r in comparison["ratio"].items():
                lines.append(f"- {name}, interleaved: best vs table {r['ratio']:.3f}x; table vs cuDNN "
                             f"{r['table_vs_cudnn']:.3f}x; best vs cuDNN {r['best_vs_cudnn']:.3f}x "
                             "(X vs Y = Y's time / X's: > 1, X is faster)")
            lines.append("")
    if document["chosen"]:
        lines += ["## Chosen configs", "", "One table entry serves the forward and both backward kernels; where "
                  "the forward and backward winners differ, the forward (inference) one is proposed.", ""]
        lines += [f"- {variant}: {steps}" for variant, steps in document["chosen"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return sweep.main(argv, __doc__.split("\n")[0], list(VARIANTS), SHAPES, "B,H,W,E", run, markdown,
                      "sweep-patch-embed.md")


if __name__ == "__main__":
    sys.exit(main())
