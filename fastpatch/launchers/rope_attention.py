"""Host launchers of the RoPE flash-attention kernels: allocate outputs, pick the config, launch.

Layouts (B batch, H heads, Nq / Nk query / key tokens, Dh head dim):

* ``q`` (B, H, Nq, Dh), ``k`` and ``v`` (B, H, Nk, Dh): any strides (e.g. views of a fused qkv
  projection (B, N, 3, H, Dh) permuted to (B, H, N, Dh)); read in place, never copied.
* ``q_pos`` (B, Nq, 2), ``k_pos`` (B, Nk, 2): int64 (y, x) token positions, any strides; ignored
  (may be None) when ``rope_base`` is None.
* ``out`` (B, Nq, H, Dh) contiguous, so ``out.view(B, Nq, H * Dh)`` feeds the output projection.
* ``lse`` (B, H, Nq) fp32 contiguous: natural-log log-sum-exp of the scaled scores of each query.
* gradients ``dq`` (B, H, Nq, Dh), ``dk``/``dv`` (B, H, Nk, Dh) in the inputs' dtype, always
  token-major memory ((B, N, H, Dh) contiguous, viewed as (B, H, N, Dh)) whatever the input strides.

Inputs are assumed validated by :func:`fastpatch.rope_attention` (same device, dtypes, shapes).

Every launch runs under :func:`~fastpatch.launchers.device.launch_device` of the inputs' device
(Triton launches on the *current* CUDA device otherwise). float32 inputs use TF32 tensor cores
exactly when torch's own fp32 matmuls would
(:func:`~fastpatch.launchers.precision.matmul_dot_precision`), IEEE fp32 otherwise.

Host overhead: what depends only on (device, dtype, head dim, dot precision) -- the config (and
with it the device capability), the launch keywords of every kernel variant, placeholder tensors
-- is built once into a :class:`LaunchPlan` and cached; RoPE frequency tables are cached per
(base, F0, head dim, device). A call reads no environment variable and imports nothing: one dict
lookup, torch's TF32 switch (float32 only), the allocations and the launches.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..kernels.gpu_classes import GPU_CLASSES
from ..kernels.rope import rope_rotate_kernel
from ..kernels.rope_attention_bwd import rope_attention_bwd_dkdv_kernel, rope_attention_bwd_dq_kernel
from ..kernels.rope_attention_configs import (
    K_ROTATIONS,
    KernelConfig,
    RopeAttentionConfig,
    dot_precisions,
    rope_attention_config,
)
from ..kernels.rope_attention_fwd import rope_attention_fwd_kernel
from .config_override import ConfigOverrides, check_tile_config
from .device import launch_device, refuse_first_use_in_capture
from .grid import cdiv
from .interpreter import INTERPRETED
from .precision import matmul_dot_precision

__all__ = ["LaunchPlan", "rope_frequencies", "launch_plan", "override_config", "rope_attention_forward",
           "rope_attention_backward", "kernel_specializations"]

#: (ROPE, rotate the inner loop's operand in the loop): RoPE off, in-loop rotation, pre-rotated operands.
ROPE_VARIANTS = ((False, False), (True, True), (True, False))

_FREQUENCY_CACHE: Dict[Tuple[float, float, int, torch.device], torch.Tensor] = {}


def rope_frequencies(rope_base: float, rope_f0: float, head_dim: int, device: torch.device) -> torch.Tensor:
    """fp32 (Dh/4,) table ``F0 * base**(-j / (Dh/4))``, computed in float64 and rounded once (cached)."""
    key = (rope_base, rope_f0, head_dim, device)
    table = _FREQUENCY_CACHE.get(key)
    if table is None:
        refuse_first_use_in_capture(device, "RoPE frequency table")
        quarter = head_dim // 4
        with torch.inference_mode(False):
            exponents = torch.arange(quarter, dtype=torch.float64) / quarter
            table = (rope_f0 * float(rope_base) ** -exponents).to(torch.float32).to(device)
        _FREQUENCY_CACHE[key] = table
    return table


def _kernel_keywords(config: KernelConfig, head_dim: int, rotate_flag: str, rope: bool, in_loop: bool,
                     upcast_bf16: bool, precision: str) -> dict:
    """Launch keywords (constexprs + num_warps/num_stages) of one attention kernel variant."""
    return {"HEAD_DIM": head_dim, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "ROPE": rope,
            rotate_flag: in_loop, "UPCAST_BF16": upcast_bf16, "DOT_PRECISION": precision,
            "num_warps": config.num_warps, "num_stages": config.num_stages}


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch needs that depends only on (device, dtype, head dim, dot precision).

    ``forward`` / ``backward_dq`` / ``backward_dkdv`` map a :data:`ROPE_VARIANTS` entry to the
    kernel's launch keywords; ``rotation`` holds the RoPE kernel's. ``positions`` (int64) and
    ``frequencies`` (fp32) are one-element placeholders for pointers a variant never reads.
    """

    config: RopeAttentionConfig
    rotation: dict
    forward: Dict[Tuple[bool, bool], dict]
    backward_dq: Dict[Tuple[bool, bool], dict]
    backward_dkdv: Dict[Tuple[bool, bool], dict]
    positions: torch.Tensor
    frequencies: torch.Tensor


def _plan_keywords(config: RopeAttentionConfig, head_dim: int, precision: str, upcast_bf16: bool):
    """(rotation keywords, forward, dQ, dK/dV keywords by RoPE variant) of one config."""
    rotation = {"HEAD_DIM": head_dim, "BLOCK_N": config.rope_block, "UPCAST_BF16": upcast_bf16}
    per_kernel = [{variant: _kernel_keywords(kernel_config, head_dim, flag, *variant, upcast_bf16, precision)
                   for variant in ROPE_VARIANTS}
                  for kernel_config, flag in ((config.forward, "ROTATE_K_IN_LOOP"),
                                              (config.backward_dq, "ROTATE_K_IN_LOOP"),
                                              (config.backward_dkdv, "ROTATE_Q_IN_LOOP"))]
    return (rotation, *per_kernel)


_PLANS: Dict[Tuple[torch.device, torch.dtype, int, str], LaunchPlan] = {}
#: Configs given by :func:`override_config`, by the plans' key; entering or leaving one empties ``_PLANS``.
_OVERRIDES = ConfigOverrides(_PLANS)


def _build_plan(device: torch.device, dtype: torch.dtype, head_dim: int, precision: str,
                config: RopeAttentionConfig) -> LaunchPlan:
    upcast_bf16 = dtype == torch.bfloat16 and INTERPRETED
    with torch.inference_mode(False):
        placeholders = (torch.zeros(1, dtype=torch.int64, device=device),
                        torch.zeros(1, dtype=torch.float32, device=device))
    return LaunchPlan(config, *_plan_keywords(config, head_dim, precision, upcast_bf16), *placeholders)


def launch_plan(device: torch.device, dtype: torch.dtype, head_dim: int, precision: str) -> LaunchPlan:
    """The cached :class:`LaunchPlan`: the :func:`override_config` config for these, else the table's
    (CUDA: the device's capability class; interpreter: the sm_80 row).

    Raises:
        ValueError: unsupported head dim, dtype or precision.
    """
    key = (device, dtype, head_dim, precision)
    plan = _PLANS.get(key)
    if plan is None:
        refuse_first_use_in_capture(device, "attention launch plan")
        config = _OVERRIDES.get(key)
        if config is None:
            capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
            config = rope_attention_config(head_dim, dtype, capability, precision)
        plan = _PLANS[key] = _build_plan(device, dtype, head_dim, precision, config)
    return plan


@contextmanager
def override_config(config: RopeAttentionConfig, device: torch.device, dtype: torch.dtype, head_dim: int,
                    precision: str) -> Iterator[None]:
    """Inside the block, calls on (``device``, ``dtype``, ``head_dim``, dot ``precision``) launch with ``config``
    instead of the table's entry (tuning sweeps: ``bench/sweep_attention.py``); the table's plan is back after.

    ``device`` must be the tensors' own device (``q.device``: ``cuda:0``, not ``cuda``). Not thread-safe.

    Raises:
        ValueError: a block size that is not a power of two >= 16, a warp count that is not a power of
            two <= 16, ``num_stages < 1``, or an unknown ``k_rotation``.
    """
    for name in ("forward", "backward_dq", "backward_dkdv"):
        kernel = getattr(config, name)
        check_tile_config(name, {"block_m": kernel.block_m, "block_n": kernel.block_n}, kernel.num_warps,
                          kernel.num_stages)
    _resolve_k_rotation(config.k_rotation, config)
    with _OVERRIDES.override((device, dtype, head_dim, precision), config):
        yield


def kernel_specializations(head_dim: int, dtype: torch.dtype, gpu_class: int) -> List[Tuple[object, dict]]:
    """Every (kernel, launch keywords) the launchers can run on a GPU of class ``gpu_class`` (a key of
    :data:`~fastpatch.kernels.gpu_classes.GPU_CLASSES`: 80, 86, 90, 100, 120).

    Covers each dot precision of ``dtype`` (float32: IEEE and TF32), and RoPE off, RoPE with
    in-loop rotation and RoPE with pre-rotated operands, for the forward, both backward kernels
    and the standalone RoPE kernel (listed once when its keywords do not depend on the precision);
    used by the AOT compile tests.
    """
    specializations: List[Tuple[object, dict]] = []
    capability = GPU_CLASSES[gpu_class].capability
    for precision in dot_precisions(dtype):
        config = rope_attention_config(head_dim, dtype, capability, precision)
        rotation, forward, backward_dq, backward_dkdv = _plan_keywords(config, head_dim, precision, False)
        candidates = [(rope_rotate_kernel, rotation)]
        for variant in ROPE_VARIANTS:
            candidates += [(rope_attention_fwd_kernel, forward[variant]),
                           (rope_attention_bwd_dq_kernel, backward_dq[variant]),
                           (rope_attention_bwd_dkdv_kernel, backward_dkdv[variant])]
        specializations += [c for c in candidates if c not in specializations]
    return specializations


def _position_args(pos: Optional[torch.Tensor], plan: LaunchPlan):
    """(tensor, stride_b, stride_n, stride_c) for a (B, N, 2) position tensor, or the placeholder."""
    if pos is None:
        return (plan.positions, 0, 0, 0)
    return (pos, *pos.stride())


def _head_major_strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(b, h, n, d) strides of a (B, N, H, Dh) tensor (those of ``t.transpose(1, 2)``, without the view)."""
    stride_b, stride_n, stride_h, stride_d = t.stride()
    return stride_b, stride_h, stride_n, stride_d


def _token_major_like(x: torch.Tensor) -> torch.Tensor:
    """Empty (B, H, N, Dh) tensor of ``x``'s shape/dtype stored as contiguous (B, N, H, Dh)."""
    b, h, n, d = x.shape
    return torch.empty((b, n, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)


def _resolve_k_rotation(k_rotation: Optional[str], config: RopeAttentionConfig) -> str:
    if k_rotation is None:
        return config.k_rotation
    if k_rotation not in K_ROTATIONS:
        raise ValueError(f"k_rotation must be one of {K_ROTATIONS}, got {k_rotation!r}")
    return k_rotation


def _rotate(x: torch.Tensor, pos: torch.Tensor, frequencies: torch.Tensor, keywords: dict) -> torch.Tensor:
    """RoPE kernel launch (the caller holds the device guard): new contiguous rotated copy of ``x``."""
    batch, heads, seq_len, head_dim = x.shape
    out = torch.empty((batch, heads, seq_len, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rope_rotate_kernel[(cdiv(seq_len, keywords["BLOCK_N"]), batch * heads)](
        x, pos, frequencies, out, *x.stride(), *pos.stride(), *out.stride(), heads, seq_len, **keywords)
    return out


def rope_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: Optional[torch.Tensor],
                           k_pos: Optional[torch.Tensor], rope_base: Optional[float], rope_f0: float, scale: float,
                           k_rotation: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flash attention with RoPE2D on q and k: returns ``(out (B, Nq, H, Dh) contiguous, lse (B, H, Nq) fp32)``.

    Args:
        q: (B, H, Nq, Dh); k, v: (B, H, Nk, Dh); fp16/bf16/fp32, any strides; Dh in {32, 64, 128}.
        q_pos, k_pos: (B, Nq, 2) / (B, Nk, 2) int64 (y, x); unused when ``rope_base`` is None.
        rope_base: RoPE frequency base (e.g. 100.0), or None for plain attention.
        rope_f0: RoPE frequency scale F0.
        scale: softmax scale applied to q.k (usually Dh ** -0.5).
        k_rotation: "in_loop" or "pre_rotated" (see :data:`~fastpatch.kernels.rope_attention_configs.K_ROTATIONS`);
            None takes the config table's choice.

    Empty inputs launch nothing: B, H or Nq = 0 gives empty outputs; Nk = 0 (no keys) gives a zero
    ``out``, as the torch path (``scaled_dot_product_attention``) does, and ``lse = -inf``.

    Raises:
        ValueError: unsupported head dim, dtype or ``k_rotation``.
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    device = q.device
    plan = launch_plan(device, q.dtype, head_dim, matmul_dot_precision(q.dtype))
    k_rotation = _resolve_k_rotation(k_rotation, plan.config)
    out = torch.empty((batch, seq_q, heads, head_dim), dtype=q.dtype, device=device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, lse
    if seq_k == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    rope = rope_base is not None
    in_loop = rope and k_rotation == "in_loop"
    frequencies = rope_frequencies(rope_base, rope_f0, head_dim, device) if rope else plan.frequencies
    q_pos_args, k_pos_args = _position_args(q_pos, plan), _position_args(k_pos, plan)
    keywords = plan.forward[(rope, in_loop)]
    with launch_device(device):
        if rope and not in_loop:
            k = _rotate(k, k_pos, frequencies, plan.rotation)
        rope_attention_fwd_kernel[(cdiv(seq_q, keywords["BLOCK_M"]), batch * heads)](
            q, k, v, q_pos_args[0], k_pos_args[0], frequencies, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *_head_major_strides(out), *q_pos_args[1:], *k_pos_args[1:],
            heads, seq_q, seq_k, scale, **keywords)
    return out, lse


def rope_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, q_pos: Optional[torch.Tensor],
                            k_pos: Optional[torch.Tensor], rope_base: Optional[float], rope_f0: float, scale: float,
                            k_rotation: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`rope_attention_forward` wrt the unrotated q, k and v.

    Args:
        grad_out: (B, Nq, H, Dh) upstream gradient of ``out``, any strides (cast to ``out``'s dtype).
        q, k, v, q_pos, k_pos, rope_base, rope_f0, scale: as given to the forward.
        out, lse: the forward's outputs.
        k_rotation: "in_loop" rotates the inner-loop operand of each kernel tile by tile;
            "pre_rotated" writes rotated copies of q and k once first. None: the config's choice.

    Returns:
        dq (B, H, Nq, Dh), dk and dv (B, H, Nk, Dh) in the inputs' dtype, token-major memory.
        Deterministic: no atomics (a dQ kernel over query blocks, a dK/dV kernel over key blocks).
        With no queries or no keys (or B = 0) nothing launches and the gradients are zeros.
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    device = q.device
    plan = launch_plan(device, q.dtype, head_dim, matmul_dot_precision(q.dtype))
    k_rotation = _resolve_k_rotation(k_rotation, plan.config)
    grad_q, grad_k, grad_v = _token_major_like(q), _token_major_like(k), _token_major_like(v)
    if grad_q.numel() == 0 or grad_k.numel() == 0:
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    grad_out = grad_out.to(out.dtype)
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=device)
    rope = rope_base is not None
    in_loop = rope and k_rotation == "in_loop"
    frequencies = rope_frequencies(rope_base, rope_f0, head_dim, device) if rope else plan.frequencies
    q_pos_args, k_pos_args = _position_args(q_pos, plan), _position_args(k_pos, plan)
    grad_out_strides, out_strides = _head_major_strides(grad_out), _head_major_strides(out)
    dq_keywords, dkdv_keywords = plan.backward_dq[(rope, in_loop)], plan.backward_dkdv[(rope, in_loop)]
    with launch_device(device):
        q_inner, k_inner = q, k
        if rope and not in_loop:
            q_inner = _rotate(q, q_pos, frequencies, plan.rotation)
            k_inner = _rotate(k, k_pos, frequencies, plan.rotation)
        # dQ (and delta) over query blocks: the query tile is rotated in-kernel, keys come from k_inner
        rope_attention_bwd_dq_kernel[(cdiv(seq_q, dq_keywords["BLOCK_M"]), batch * heads)](
            q, k_inner, v, out, grad_out, lse, delta, q_pos_args[0], k_pos_args[0], frequencies, grad_q,
            *q.stride(), *k_inner.stride(), *v.stride(), *out_strides, *grad_out_strides, *grad_q.stride(),
            *q_pos_args[1:], *k_pos_args[1:], heads, seq_q, seq_k, scale, **dq_keywords)
        # dK, dV over key blocks: the key tile is rotated in-kernel, queries come from q_inner
        rope_attention_bwd_dkdv_kernel[(cdiv(seq_k, dkdv_keywords["BLOCK_N"]), batch * heads)](
            q_inner, k, v, grad_out, lse, delta, q_pos_args[0], k_pos_args[0], frequencies, grad_k, grad_v,
            *q_inner.stride(), *k.stride(), *v.stride(), *grad_out_strides, *grad_k.stride(), *grad_v.stride(),
            *q_pos_args[1:], *k_pos_args[1:], heads, seq_q, seq_k, scale, **dkdv_keywords)
    return grad_q, grad_k, grad_v
