"""Host (Python) overhead per call: the ``rope_attention`` op and a ViT-L ``Block`` forward, no device work.

At batch 1 on a GPU the host side of a call (validation, backend choice, config lookup, allocation,
argument packing, the launch) can cost as much as the kernel. This file isolates it on any machine:

* every tensor is on the ``meta`` device (shapes and dtypes only: each torch op costs its dispatch,
  no compute, no copy);
* on the Triton path, the jitted kernels' ``run`` is replaced by a no-op (``kernel[grid](...)`` still
  goes through Triton's ``__getitem__``; what is left out is Triton's own argument binding and the
  driver launch), the backend routes ``meta`` tensors to Triton, and the attention custom ops get a
  ``meta`` kernel that calls the real launchers (by default ``meta`` runs their fake implementation).
  On CUDA the launchers would additionally enter the device guard and, before caching, query the
  device capability.

Cases: the op (B=1, H=16, N=768, Dh=64; fp32 and bf16 forward, fp32 forward + backward) and the
encoder ``Block`` forward (dim 1024, 16 heads, N=768), on ``meta`` and, as a closer stand-in for a
GPU's per-op host cost, on CPU tensors with batch 0 (``block-...-b0-...-cpu``: every torch op
dispatches to its real C++ kernel and computes nothing; the attention launchers return before
their launches, as they do for any empty input, so that row leaves out argument packing). Providers, interleaved round by round as in
:mod:`bench.cases`: ``eager`` (:mod:`fastpatch.reference`), ``torch_path`` (fastpatch under
``use_backend("torch")``) and ``fastpatch`` (the Triton path, launches stubbed). A round is
``calls_per_round`` calls (fastpatch: :data:`CALLS`; eager and torch_path: :data:`PARTNER_CALLS`, as
their ``meta`` kernels for LayerNorm, GELU, SDPA... are Python decompositions costing milliseconds
per call, far more than these ops' host cost on CUDA), so the report's "median ms" is microseconds per
call x calls / 1000; ``extra_info["us_per_call"]`` (median) and ``us_per_call_min`` have it per call,
and the partners' ``*_ms_per_round`` are scaled to the same number of calls (so ``vs_*`` and the
report's ratios compare per call). On a shared machine prefer the minimum. The fastpatch ``block`` row inherits the meta cost of its LayerNorm/Linear/GELU, so its
own figure is not a GPU host time; the ``rope_attention`` rows are (minus Triton's own launch).

    pytest bench/test_bench_host_overhead.py --benchmark-only -q -s -p no:cacheprovider
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, Iterator, List

import pytest
import torch

import fastpatch
from fastpatch import backend, reference

from .cases import BACKENDS, EAGER, FASTPATCH, TORCH_PATH, Case, make_step
from .test_bench_attention import ROPE_BASE, eager_rope_attention, fastpatch_rope_attention

CALLS = {"forward": 100, "forward_backward": 20}  # calls per timed round of fastpatch, by mode
PARTNER_CALLS = 5  # calls per round of eager / torch_path: their meta kernels cost milliseconds per call
ROUNDS = 10
DEVICE = "meta"
PROVIDERS = [EAGER, TORCH_PATH, FASTPATCH]


class _NoLaunch:
    """Stands in for ``JITFunction.run``: accepts any launch, does nothing."""

    def __call__(self, *args, **kwargs):
        return None


_stub_active: List[bool] = []


def _register_meta_launchers() -> None:
    """Give the attention custom ops a ``meta`` kernel: the real launcher while stubbed, else the fake."""
    from fastpatch.launchers import rope_attention as launchers
    from fastpatch.ops import rope_attention_triton as ops

    fakes = {"fwd": ops._rope_attention_fwd_fake, "bwd": ops._rope_attention_bwd_fake}
    real = {"fwd": launchers.rope_attention_forward, "bwd": launchers.rope_attention_backward}

    def kernel(which: str) -> Callable:
        def meta_kernel(*args):
            return (real[which] if _stub_active else fakes[which])(*args)
        return meta_kernel

    ops.rope_attention_fwd.register_kernel("meta", kernel("fwd"))
    ops.rope_attention_bwd.register_kernel("meta", kernel("bwd"))


@contextlib.contextmanager
def host_only() -> Iterator[None]:
    """Inside: Triton launches are no-ops and ``meta`` tensors take the Triton path (see the module doc)."""
    from fastpatch.kernels import rope, rope_attention_bwd, rope_attention_fwd

    kernels = [rope.rope_rotate_kernel, rope_attention_fwd.rope_attention_fwd_kernel,
               rope_attention_bwd.rope_attention_bwd_dq_kernel, rope_attention_bwd.rope_attention_bwd_dkdv_kernel]
    can_run = backend._triton_can_run
    for kernel in kernels:
        kernel.run = _NoLaunch()
    backend._triton_can_run = lambda device: True
    _stub_active.append(True)
    try:
        yield
    finally:
        _stub_active.pop()
        backend._triton_can_run = can_run
        for kernel in kernels:
            del kernel.run


def _build_steps(case: Case) -> Dict[str, Callable[[], object]]:
    """provider -> one call (``bench.cases.make_step``; its device argument only picks the autocast and the
    synchronisation, so "cpu": no autocast, no sync) on meta inputs."""
    tokens, grad = int(case.size[1:]), case.mode == "forward_backward"
    pos = torch.empty((case.batch, tokens, 2), dtype=torch.int64, device=case.device)
    if case.component == "rope_attention":
        q, k, v = (torch.empty((case.batch, 16, tokens, 64), dtype=case.dtype, device=case.device, requires_grad=grad)
                   for _ in range(3))
        calls = {EAGER: eager_rope_attention, TORCH_PATH: fastpatch_rope_attention,
                 FASTPATCH: fastpatch_rope_attention}
        return {name: make_step(calls[name], (q, k, v, pos), case.mode, "cpu", BACKENDS[name]) for name in PROVIDERS}
    x = torch.empty((case.batch, tokens, 1024), dtype=case.dtype, device=case.device)
    modules = {name: namespace.Block(1024, 16, qkv_bias=True, rope=namespace.RoPE2D(freq=ROPE_BASE))
               for name, namespace in ((EAGER, reference), (FASTPATCH, fastpatch))}
    modules = {name: module.to(case.device, case.dtype).eval() for name, module in modules.items()}
    modules[TORCH_PATH] = modules[FASTPATCH]
    return {name: make_step(modules[name], (x, pos), case.mode, "cpu", BACKENDS[name]) for name in PROVIDERS}


def _timed_loop(step: Callable[[], object], calls: int, stubbed: bool) -> Callable[[], None]:
    """``calls`` calls of ``step`` (inside :func:`host_only` for the Triton path)."""
    def run():
        with host_only() if stubbed else contextlib.nullcontext():
            for _ in range(calls):
                step()
    return run


CASES = [Case("rope_attention", "forward", "n768", 1, torch.float32, DEVICE),
         Case("rope_attention", "forward", "n768", 1, torch.bfloat16, DEVICE),
         Case("rope_attention", "forward_backward", "n768", 1, torch.float32, DEVICE),
         Case("block", "forward", "n768", 1, torch.float32, DEVICE),
         Case("block", "forward", "n768", 0, torch.float32, "cpu")]
CASE_PROVIDERS = [(case, provider) for case in CASES for provider in PROVIDERS]


@pytest.fixture(scope="module", autouse=True)
def _meta_launchers():
    _register_meta_launchers()


@pytest.mark.parametrize("case,provider", CASE_PROVIDERS,
                         ids=[f"host-{c.name}-{p}" for c, p in CASE_PROVIDERS])
def test_bench_host_overhead(benchmark, case, provider):
    benchmark.group = f"host-{case.name}"
    calls = CALLS[case.mode] if provider == FASTPATCH else PARTNER_CALLS
    loops = {name: _timed_loop(step, CALLS[case.mode] if name == FASTPATCH else PARTNER_CALLS, stubbed=name == FASTPATCH)
             for name, step in _build_steps(case).items()}
    partners = [name for name in (EAGER, TORCH_PATH) if name != provider]
    partner_s: Dict[str, List[float]] = {name: [] for name in partners}

    def run_partners():  # interleaved: each partner's round just before this provider's round
        for name in partners:
            start = time.perf_counter()
            loops[name]()
            partner_s[name].append(time.perf_counter() - start)

    benchmark.pedantic(loops[provider], setup=run_partners, rounds=ROUNDS, warmup_rounds=2)
    if benchmark.disabled:
        return
    this_ms = [t * 1e3 for t in benchmark.stats.stats.data]
    info = dict(case=f"host-{case.name}", component=case.component, mode=case.mode, size=case.size, batch=case.batch,
                provider=provider, device="meta (host only)", dtype=str(case.dtype).replace("torch.", ""),
                flops=None, cpu_threads=torch.get_num_threads(), rounds=ROUNDS, calls_per_round=calls,
                peak_memory_bytes=None, max_rel_error_vs_eager=None, ms_per_round=[round(t, 4) for t in this_ms],
                us_per_call=round(statistics.median(this_ms) * 1e3 / calls, 2),
                us_per_call_min=round(min(this_ms) * 1e3 / calls, 2))
    for name in (EAGER, TORCH_PATH):
        samples = [t * 1e3 * calls / PARTNER_CALLS for t in partner_s.get(name, [])[-ROUNDS:]]  # per `calls` calls
        info[f"{name}_ms_per_round"] = [round(t, 4) for t in samples] or None
        info[f"{name}_median_ms"] = round(statistics.median(samples), 4) if samples else None
        info[f"vs_{name}"] = round(statistics.median(p / t for p, t in zip(samples, this_ms)), 4) if samples else None
    benchmark.extra_info.update(info)
    others = "".join(f"; {name} {statistics.median(partner_s[name]) * 1e6 / PARTNER_CALLS:.1f} us" for name in partners)
    print(f"\nhost-{case.name} [{provider}]: {info['us_per_call']:.1f} us per call (min {info['us_per_call_min']:.1f})"
          f"{others}")
