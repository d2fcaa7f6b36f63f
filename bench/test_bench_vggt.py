"""VGGT's aggregator attention: qk-norm + RoPE2D attention layers and blocks, eager vs fastpatch.

Components at VGGT's width (C 1024, 16 heads, Dh 64; 518x392 images: a 28x37 patch grid + 5 special
tokens = 1041 tokens per frame):

* ``frame_op``: :func:`fastpatch.qknorm_rope_attention` on (8 frames, 16 heads, 1041 tokens) vs eager
  (LayerNorm, gather-based RoPE of :mod:`fastpatch.reference_vggt`, SDPA);
* ``global_op``: the same over all frames' tokens at once (batch 1, S x 1041 tokens);
* ``frame_block`` / ``global_block``: :class:`fastpatch.VGGTBlock` vs :class:`~fastpatch.reference_vggt.VGGTBlock`
  with the same weights (LayerScale, LN eps 1e-5, GELU MLP);
* ``sdpa_floor`` (op rows only): SDPA alone on q and k normalised and rotated beforehand (untimed), the
  same function's time floor for any implementation built on torch's SDPA; paired with eager and
  fastpatch, its ``vs_eager`` is the most such an implementation can gain in that run;
* ``global_op_memory``: the peak memory of one global attention layer (eager vs fastpatch), by
  :func:`bench.memory.peak_tensor_bytes` on CPU (``torch.cuda.max_memory_allocated`` on CUDA); recorded
  in ``extra_info["peak_memory_bytes"]`` and as ``vs_eager_memory`` (fastpatch / eager: goal <= 0.5).

CPU (float32, sized for 2 cores): frame_op at 8 frames, global_op and the blocks at 2 frames (2082
tokens), memory at 8 frames (8328 tokens). CUDA (bfloat16: the op on bf16 qkv with fp32 norms, the
blocks under bf16 autocast as VGGT's demo runs): frame_op at 32 frames, global_op at 32 and 100 frames,
blocks at 32 frames, memory at 32 frames; these rows skip on CPU. Ratios are interleaved per round
(:func:`bench.cases.measure`).
"""
from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn.functional as F

import fastpatch
from fastpatch import reference_vggt as ref

from .cases import DEVICE, EAGER, FASTPATCH, Case, Side, make_step, measure
from .memory import peak_tensor_bytes

HEIGHT, WIDTH, SPECIAL = 28, 37, 5  # 518x392
PER_FRAME = SPECIAL + HEIGHT * WIDTH  # 1041
DIM, HEADS = 1024, 16
ROUNDS = 10 if DEVICE == "cuda" else 7  # CPU: one round of a row is 0.3-1.2 s; 3 rounds moved a ratio by 0.1
# CPU: an op round is 0.15-0.4 s; at 15 rounds the global op's ratio spanned 0.98-1.13 over runs
OP_ROUNDS = 10 if DEVICE == "cuda" else 31
GPU_DTYPE = torch.bfloat16
SDPA_FLOOR = "sdpa_floor"


def _cases():
    if DEVICE == "cuda":
        sizes = [("frame_op", 32), ("global_op", 32), ("global_op", 100), ("frame_block", 32), ("global_block", 32)]
        dtype = GPU_DTYPE
    else:
        sizes = [("frame_op", 8), ("global_op", 2), ("frame_block", 2), ("global_block", 2)]
        dtype = torch.float32
    return [Case(component, "forward", f"s{frames}", 1, dtype, DEVICE) for component, frames in sizes]


CASES = _cases()
GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="GPU rows (bf16, 32/100 frames) need a CUDA device")


def _frames(case: Case) -> int:
    return int(case.size[1:])


def _attention_inputs(case: Case, frames: int, global_attention: bool):
    """qkv-projection views q, k, v (B, H, N, Dh) and the LN parameters of one VGGT attention."""
    gen = torch.Generator().manual_seed(0)
    batch, tokens = (1, frames * PER_FRAME) if global_attention else (frames, PER_FRAME)
    qkv = torch.randn(batch, tokens, 3, HEADS, DIM // HEADS, generator=gen).to(case.device, case.dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    attn = ref.VGGTAttention(DIM, HEADS, qk_norm=True, rope=ref.RotaryPositionEmbedding2D()).to(case.device)
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.normal_(1.0, 0.3, generator=gen.manual_seed(1))
            norm.bias.normal_(0.0, 0.1)
    positions = ref.vggt_positions(batch, tokens // PER_FRAME, HEIGHT, WIDTH, SPECIAL, case.device)
    return attn, (q, k, v, positions)


def _eager_op(attn):
    def call(q, k, v, positions):
        qn, kn = attn.q_norm(q), attn.k_norm(k)
        qr, kr = attn.rope(qn, positions), attn.rope(kn, positions)
        return F.scaled_dot_product_attention(qr.to(v.dtype), kr.to(v.dtype), v)
    return call


def _fastpatch_op(attn):
    def call(q, k, v, positions):
        return fastpatch.qknorm_rope_attention(q, k, v, q_norm_weight=attn.q_norm.weight,
                                               q_norm_bias=attn.q_norm.bias, k_norm_weight=attn.k_norm.weight,
                                               k_norm_bias=attn.k_norm.bias, grid=(HEIGHT, WIDTH, SPECIAL))
    return call


def _block_sides(case: Case, global_attention: bool) -> Dict[str, Side]:
    gen = torch.Generator().manual_seed(0)
    frames = _frames(case)
    eager = ref.VGGTBlock(DIM, HEADS, qk_norm=True, init_values=0.01, rope=ref.RotaryPositionEmbedding2D()).eval()
    with torch.no_grad():
        for name, p in eager.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if "gamma" in name or "norm" in name else 0.02) + centre)
    fast = fastpatch.VGGTBlock(DIM, HEADS, qk_norm=True, init_values=0.01, rope=ref.RotaryPositionEmbedding2D()).eval()
    fast.load_state_dict(eager.state_dict())
    eager, fast = eager.to(case.device), fast.to(case.device)
    batch, tokens = (1, frames * PER_FRAME) if global_attention else (frames, PER_FRAME)
    x = torch.randn(batch, tokens, DIM, generator=gen).to(case.device)
    pos = ref.vggt_positions(batch, tokens // PER_FRAME, HEIGHT, WIDTH, SPECIAL, case.device)
    autocast = GPU_DTYPE if case.device == "cuda" else None
    return {EAGER: Side(make_step(eager, (x, pos), "forward", case.device, None, autocast=autocast)),
            FASTPATCH: Side(make_step(fast, (x, pos), "forward", case.device, "auto", autocast=autocast))}


def _sdpa_floor(attn, inputs):
    """``SDPA(q', k', v)`` with ``q', k'`` (B, H, N, Dh) contiguous: q and k normalised and rotated once here."""
    q, k, v, positions = inputs
    with torch.no_grad():
        qr, kr = (attn.rope(norm(x), positions).to(v.dtype).contiguous() for norm, x in ((attn.q_norm, q),
                                                                                          (attn.k_norm, k)))
    return lambda: F.scaled_dot_product_attention(qr, kr, v)


def build_sides(case: Case) -> Dict[str, Side]:
    global_attention = case.component.startswith("global")
    if case.component.endswith("block"):
        return _block_sides(case, global_attention)
    attn, inputs = _attention_inputs(case, _frames(case), global_attention)
    return {EAGER: Side(make_step(_eager_op(attn), inputs, "forward", case.device, None)),
            FASTPATCH: Side(make_step(_fastpatch_op(attn), inputs, "forward", case.device, "auto")),
            SDPA_FLOOR: Side(make_step(_sdpa_floor(attn, inputs), (), "forward", case.device, None))}


CASE_PROVIDERS = [(case, provider) for case in CASES for provider in (EAGER, FASTPATCH, SDPA_FLOOR)
                  if provider != SDPA_FLOOR or case.component.endswith("_op")]


@pytest.mark.parametrize("case,provider", CASE_PROVIDERS, ids=[f"{c.name}-{p}" for c, p in CASE_PROVIDERS])
def test_bench_vggt(benchmark, case, provider):
    benchmark.group = case.name
    rounds = OP_ROUNDS if case.component.endswith("_op") else ROUNDS
    partners = [EAGER, FASTPATCH] if provider == SDPA_FLOOR else None
    measure(benchmark, case, provider, build_sides(case), None, rounds=rounds, partners=partners)


def _peak(call, device: str) -> int:
    if device != "cuda":
        with torch.inference_mode():
            return peak_tensor_bytes(call)
    torch.cuda.synchronize()
    with torch.inference_mode():
        call()  # warm-up (compilation, allocator)
        torch.cuda.synchronize()
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resting


def test_bench_vggt_global_layer_memory(benchmark):
    """Peak memory of one global attention layer: 8 frames (CPU, fp32) / 32 frames (CUDA, bf16)."""
    frames = 32 if DEVICE == "cuda" else 8
    case = Case("global_op_memory", "forward", f"s{frames}", 1, GPU_DTYPE if DEVICE == "cuda" else torch.float32,
                DEVICE)
    attn, inputs = _attention_inputs(case, frames, global_attention=True)
    eager_call, fast_call = _eager_op(attn), _fastpatch_op(attn)
    eager_bytes = _peak(lambda: eager_call(*inputs), DEVICE)
    fast_bytes = benchmark.pedantic(lambda: _peak(lambda: fast_call(*inputs), DEVICE), rounds=1, iterations=1)
    benchmark.group = case.name
    benchmark.extra_info.update(case=case.name, component=case.component, provider=FASTPATCH, device=DEVICE,
                                peak_memory_bytes=fast_bytes, eager_peak_memory_bytes=eager_bytes,
                                vs_eager_memory=round(fast_bytes / eager_bytes, 4))
    print(f"\n{case.name}: fastpatch {fast_bytes / 2**20:.1f} MiB, eager {eager_bytes / 2**20:.1f} MiB "
          f"(x{fast_bytes / eager_bytes:.2f})")


@GPU_ONLY
def test_gpu_rows_are_defined():
    """On CUDA the bf16 rows at 32 and 100 frames are in the matrix."""
    assert {("global_op", "s100"), ("global_op", "s32")} <= {(c.component, c.size) for c in CASES}
