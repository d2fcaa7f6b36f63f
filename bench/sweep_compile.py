"""Static pass over the sweeps' candidates: compile each for a GPU on the CPU (no GPU needed) and read
its resources, to prune what the GPU sweeps time.

    python -m bench.sweep_compile --out DIR [--capability 90] [--workers N]

For every candidate config of :mod:`bench.sweep_attention` (forward, dQ and dK/dV kernels; variants
bf16, fp16, tf32, fp32) and of :mod:`bench.sweep_patch_embed` (forward kernel; bf16, tf32, fp32), the
real launcher is called at the sweep's first shape on ``torch.empty`` CPU tensors under
``override_config`` (nothing runs: the launch is recorded, :func:`fastpatch_dev.aot.recorded_launches`),
the launch is specialised as Triton's runtime would and compiled for ``sm_<capability>``, and the
cubin's registers per thread, stack frame (register spills), shared memory and whether the PTX uses
``wgmma`` are written to ``DIR/sweep-compile.json`` and ``DIR/sweep-compile.md``, with the resident
programs per SM those resources allow (registers, shared memory, warps; Hopper / A100 limits). A
candidate that spills or fits few programs per SM is rarely the fastest; one that does not compile
never runs. Registers depend on the Triton version: this is a guide for the grids, not a timing.

Runs without ``TRITON_INTERPRET`` (the interpreter changes the launch keywords, e.g. the bf16 upcast).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fastpatch.kernels.gpu_classes import GPU_CLASSES

from . import sweep_attention, sweep_patch_embed
from .sweep import compile_pool, environment, shard, tf32_switch, write_json

__all__ = ["resident_programs", "jobs", "compile_job", "run", "markdown", "main"]

#: Per-SM limits by GPU class (fastpatch.kernels.gpu_classes): registers, shared memory usable by programs
#: (bytes), reserved shared memory per program, warps, programs (CUDA's per-capability specifications).
SM_LIMITS = {90: (65536, 228 * 1024, 1024, 64, 32), 80: (65536, 164 * 1024, 1024, 64, 32),
             86: (65536, 100 * 1024, 1024, 48, 16), 100: (65536, 228 * 1024, 1024, 64, 32),
             120: (65536, 100 * 1024, 1024, 48, 32)}


def resident_programs(registers: int, shared: int, num_warps: int, capability: int) -> int:
    """Programs (CTAs) of a kernel that fit on one SM at once, from its registers per thread (allocated
    per warp in units of 256), its shared memory and its warps."""
    max_registers, max_shared, reserved, max_warps, max_programs = SM_LIMITS[capability]
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = max_registers // (per_warp * num_warps) if per_warp else max_programs
    by_shared = max_shared // (shared + reserved)
    return min(by_registers, by_shared, max_warps // num_warps, max_programs)


def _attention_launch(variant: str, step: str, config: Dict[str, object]):
    """The recorded (kernel, arguments, options) of ``step``'s kernel for one attention candidate."""
    from fastpatch.launchers import rope_attention as launchers

    dtype, precision = sweep_attention.VARIANTS[variant]
    batch, heads, tokens = next(iter(sweep_attention.SHAPES.values()))
    head_dim = sweep_attention.HEAD_DIM
    qkv = torch.empty(batch, tokens, 3, heads, head_dim, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    pos = torch.empty(batch, tokens, 2, dtype=torch.int64)
    kernel = {"forward": launchers.rope_attention_fwd_kernel, "backward_dq": launchers.rope_attention_bwd_dq_kernel,
              "backward_dkdv": launchers.rope_attention_bwd_dkdv_kernel}[step]
    rope = (sweep_attention.ROPE_BASE, sweep_attention.ROPE_F0, head_dim ** -0.5)
    with tf32_switch(torch.backends.cuda.matmul, precision == "tf32"), \
            launchers.override_config(sweep_attention._config_from_dict(config), torch.device("cpu"), dtype,
                                      head_dim, precision), \
            _recording() as launches:
        out, lse = launchers.rope_attention_forward(q, k, v, pos, pos, *rope)
        if step != "forward":
            launchers.rope_attention_backward(torch.empty_like(out), q, k, v, out, lse, pos, pos, *rope)
    return next(launch for launch in launches if launch[0] is kernel)


def _patch_embed_launch(variant: str, config: Dict[str, int]):
    """The recorded (kernel, arguments, options) of the forward kernel for one patch-embedding candidate."""
    from fastpatch.kernels.patch_embed_configs import PatchEmbedConfig
    from fastpatch.launchers import patch_embed as launchers

    dtype, tf32 = sweep_patch_embed.VARIANTS[variant]
    batch, height, width, embed_dim = next(iter(sweep_patch_embed.SHAPES.values()))
    patch = sweep_patch_embed.PATCH
    img = torch.empty(batch, 3, height, width, dtype=dtype)
    weight, bias = torch.empty(embed_dim, 3, patch, patch, dtype=dtype), torch.empty(embed_dim, dtype=dtype)
    with tf32_switch(torch.backends.cudnn, tf32), \
            launchers.override_config(PatchEmbedConfig(**config), torch.device("cpu"), dtype, embed_dim), \
            _recording() as launches:
        launchers.patch_embed_forward(img, weight, bias, patch)
    return next(launch for launch in launches if launch[0] is launchers.patch_embed_fwd_kernel)


@contextlib.contextmanager
def _recording() -> Iterator[List]:
    """Every Triton kernel of fastpatch recorded instead of launched."""
    from fastpatch.kernels import patch_embed, rope, rope_attention_bwd, rope_attention_fwd
    from fastpatch_dev.aot import recorded_launches

    kernels = [patch_embed.patch_embed_fwd_kernel, patch_embed.patch_embed_grad_weight_kernel,
               patch_embed.patch_embed_grad_image_kernel, rope.rope_rotate_kernel,
               rope_attention_fwd.rope_attention_fwd_kernel, rope_attention_bwd.rope_attention_bwd_dq_kernel,
               rope_attention_bwd.rope_attention_bwd_dkdv_kernel]
    with recorded_launches(kernels) as launches:
        yield launches


def jobs(capability: int) -> List[Tuple[str, str, str, Dict[str, object], bool]]:
    """(kind, variant, step, config dict, is the table's entry) of every candidate of both sweeps."""
    found = []
    capability_tuple = GPU_CLASSES[capability].capability
    for variant, (dtype, precision) in sweep_attention.VARIANTS.items():
        table = sweep_attention.rope_attention_config(sweep_attention.HEAD_DIM, dtype, capability_tuple, precision)
        for step in ("forward", "backward_dq", "backward_dkdv"):
            for option in sweep_attention._step_options(variant, step, table, table, quick=False):
                found.append(("attention", variant, step, sweep_attention._config_dict(option), option == table))
    embed_dim = next(iter(sweep_patch_embed.SHAPES.values()))[3]
    for variant, (dtype, _) in sweep_patch_embed.VARIANTS.items():
        table = sweep_patch_embed.patch_embed_config(embed_dim, dtype, capability_tuple)
        for option in sweep_patch_embed.candidates(variant, table):
            found.append(("patch_embed", variant, "forward", option._asdict(), option == table))
    return found


def compile_job(job: Tuple[str, str, str, Dict[str, object], bool], capability: int) -> Dict[str, object]:
    """Compile one candidate's launch for ``sm_<capability>``; its resources, or ``error``."""
    from fastpatch_dev.aot import compile_summary, launch_specialization

    kind, variant, step, config, is_table = job
    row: Dict[str, object] = {"kind": kind, "variant": variant, "step": step, "config": config, "table": is_table}
    try:
        kernel, arguments, options = (_attention_launch(variant, step, config) if kind == "attention"
                                      else _patch_embed_launch(variant, config))
        spec = launch_specialization(kernel, arguments, capability)
        summary = compile_summary(kernel, spec, capability, **options)
    except Exception as error:  # noqa: BLE001 -- a candidate that cannot compile is a result
        message = str(error).strip().splitlines()
        row["error"] = f"{type(error).__name__}: {message[0] if message else ''}"
        return row
    row.update({key: summary[key] for key in ("registers", "local_bytes", "stack", "shared", "wgmma", "mma_sync")})
    row["programs_per_sm"] = resident_programs(summary["registers"], summary["shared"], options["num_warps"],
                                               capability)
    return row


def _compile_shard(arguments: Tuple[List, int]) -> List[Dict[str, object]]:
    shard_jobs, capability = arguments
    return [compile_job(job, capability) for job in shard_jobs]


def run(out_dir: str, capability: int, workers: int, selected: Optional[Sequence] = None) -> Dict[str, object]:
    """Compile every candidate (or ``selected`` jobs) in ``workers`` spawned processes; writes the JSON."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("bench.sweep_compile compiles for a GPU: unset TRITON_INTERPRET")
    todo = list(selected) if selected is not None else jobs(capability)
    document: Dict[str, object] = {"environment": environment(torch.device("cpu")), "capability": capability,
                                   "rows": []}
    with compile_pool(workers if workers > 1 else 0) as pool:
        if pool is None:
            document["rows"] = _compile_shard((todo, capability))
        else:
            for rows in pool.map(_compile_shard, [(part, capability) for part in shard(todo, workers)]):
                document["rows"] += rows
    write_json(os.path.join(out_dir, "sweep-compile.json"), document)
    return document


def _describe(row: Dict[str, object]) -> str:
    c = row["config"]
    if row["kind"] == "attention":
        c = c[row["step"]]
        return f"M{c['block_m']} N{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
    return f"M{c['block_m']} N{c['block_n']} K{c['block_k']} w{c['num_warps']} s{c['num_stages']}"


def _spills(row: Dict[str, object]) -> int:
    """Bytes per thread of register spills: the stack frame (see fastpatch_dev.aot.resource_usage)."""
    return row["stack"] + row["local_bytes"]


def markdown(document: Dict[str, object]) -> str:
    """Per kernel and variant: candidates by (spills, fewer programs per SM), the table's entry marked."""
    env = document["environment"]
    capability = document["capability"]
    lines = [f"# Static pass over the sweep candidates: compiled for sm_{capability} on the CPU", "",
             f"- triton {env['triton']}, torch {env['torch']}; commit {env['commit']}"
             f"{' (uncommitted changes)' if env['dirty'] else ''}, {env['date']}",
             "- registers per thread, spills (stack-frame bytes) per thread and shared memory per program from the "
             "cubin (cuobjdump); programs per SM from those and the warps (SM limits in bench/sweep_compile.py)",
             ""]
    groups: Dict[Tuple[str, str, str], List[Dict[str, object]]] = {}
    for row in document["rows"]:
        groups.setdefault((row["kind"], row["step"], row["variant"]), []).append(row)
    for (kind, step, variant), rows in groups.items():
        ok = sorted((r for r in rows if "error" not in r), key=lambda r: (_spills(r) > 0, -r["programs_per_sm"]))
        spilling = sum(_spills(r) > 0 for r in ok)
        lines += [f"## {kind} {step} {variant}: {len(rows)} candidates, {spilling} spill, "
                  f"{len(rows) - len(ok)} do not compile", "",
                  "| config | registers | spill (stack) bytes | shared KB | tensor cores | programs/SM |",
                  "|---|---|---|---|---|---|"]
        for r in ok:
            cores = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "none"
            lines.append(f"| {_describe(r)}{' (table)' if r['table'] else ''} | {r['registers']} | {_spills(r)} | "
                         f"{r['shared'] / 1024:.1f} | {cores} | {r['programs_per_sm']} |")
        for r in rows:
            if "error" in r:
                lines.append(f"| {_describe(r)}{' (table)' if r['table'] else ''} | {r['error'][:120]} | | | | |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder (created)")
    parser.add_argument("--capability", type=int, default=90, choices=sorted(SM_LIMITS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    document = run(args.out, args.capability, args.workers)
    with open(os.path.join(args.out, "sweep-compile.md"), "w") as f:
        f.write(markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
