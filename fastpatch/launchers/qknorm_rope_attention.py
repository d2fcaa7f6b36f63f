"""Host launchers of the qk-norm + RoPE2D flash attention (VGGT / π3): allocate, pick the config, launch.

Layouts (B batch, H heads, N tokens, Dh head dim; self-attention):

* ``q``, ``k``, ``v`` (B, H, N, Dh): any strides (views of the (B, N, 3, H, Dh) qkv projection), read in place.
* LayerNorm parameters ``q_weight``, ``q_bias``, ``k_weight``, ``k_bias``: (Dh,), any float dtype.
* ``positions`` (B or 1, N, 2) int64 (y, x), or None with ``grid = (height, width, special)``: the
  kernels derive positions from the token index (:mod:`fastpatch.kernels.qknorm_rope`).
* ``out`` (B, N, H, Dh) contiguous; ``lse`` (B, H, N) fp32 contiguous.
* gradients of q, k, v: token-major memory ((B, N, H, Dh) contiguous, viewed (B, H, N, Dh)); of the
  LayerNorm parameters: (Dh,) in their dtype.

Forward: the pre-pass writes K' = RoPE(LN_k(k)) (storage dtype, contiguous), then the flash kernel
normalises and rotates each query tile in its prologue (the kernel docstring says why K is done once
up front). Backward: the pre-pass writes Q' and K'; the RoPE attention backward kernels of
:mod:`fastpatch.kernels.rope_attention_bwd` (RoPE off) give dQ', dK' (fp32 buffers) and dV; the LN +
RoPE backward kernel turns dQ', dK' into dq, dk and per-program partial parameter gradients, summed here.

Inputs are assumed validated by :func:`fastpatch.qknorm_rope_attention`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..kernels.qknorm_rope import qknorm_rope_bwd_kernel, qknorm_rope_kernel
from ..kernels.qknorm_rope_attention_configs import (
    QKNormRopeAttentionConfig,
    dot_precisions,
    qknorm_rope_attention_config,
)
from ..kernels.qknorm_rope_attention_fwd import qknorm_rope_attention_fwd_kernel
from ..kernels.rope_attention_bwd import rope_attention_bwd_dkdv_kernel, rope_attention_bwd_dq_kernel
from ..reference_vggt import rope_inverse_frequencies
from .device import launch_device
from .grid import cdiv
from .interpreter import INTERPRETED
from .precision import matmul_dot_precision

__all__ = ["qknorm_rope_attention_forward", "qknorm_rope_attention_backward", "kernel_specializations"]

_FREQUENCIES: Dict[Tuple[float, int, torch.device], torch.Tensor] = {}
_PLACEHOLDERS: Dict[torch.device, torch.Tensor] = {}
_CONFIGS: Dict[Tuple[torch.device, torch.dtype, int, str], QKNormRopeAttentionConfig] = {}


def _frequencies(rope_base: float, head_dim: int, device: torch.device) -> torch.Tensor:
    key = (rope_base, head_dim, device)
    if key not in _FREQUENCIES:
        with torch.inference_mode(False):
            _FREQUENCIES[key] = rope_inverse_frequencies(head_dim, rope_base).to(device)
    return _FREQUENCIES[key]


def _placeholder(device: torch.device) -> torch.Tensor:
    if device not in _PLACEHOLDERS:
        with torch.inference_mode(False):
            _PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _PLACEHOLDERS[device]


def _config(device: torch.device, dtype: torch.dtype, head_dim: int, precision: str) -> QKNormRopeAttentionConfig:
    key = (device, dtype, head_dim, precision)
    if key not in _CONFIGS:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        _CONFIGS[key] = qknorm_rope_attention_config(head_dim, dtype, capability, precision)
    return _CONFIGS[key]


def _position_args(positions: Optional[torch.Tensor], grid: Optional[Tuple[int, int, int]], device: torch.device):
    """(pointer, stride_b, stride_n, stride_c, tokens_per_frame, special, grid_width, GRID)."""
    if grid is not None:
        height, width, special = grid
        return (_placeholder(device), 0, 0, 0, special + height * width, special, width, True)
    stride_b = 0 if positions.shape[0] == 1 else positions.stride(0)
    return (positions, stride_b, positions.stride(1), positions.stride(2), 1, 0, 1, False)


def _head_major_strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    stride_b, stride_n, stride_h, stride_d = t.stride()
    return stride_b, stride_h, stride_n, stride_d


def _token_major(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    b, h, n, d = like.shape
    return torch.empty((b, n, h, d), dtype=dtype or like.dtype, device=like.device).transpose(1, 2)


def _prepass(x, weight, bias, pos, frequencies, eps, storage_rope, upcast, config) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    out = torch.empty((batch, heads, tokens, head_dim), dtype=x.dtype, device=x.device)
    block = config.prepass_block
    qknorm_rope_kernel[(cdiv(tokens, block), batch * heads)](
        x, weight, bias, pos[0], frequencies, out, *x.stride(), *pos[1:4], *out.stride(), heads, tokens, eps,
        *pos[4:7], HEAD_DIM=head_dim, BLOCK_N=block, GRID=pos[7], STORAGE_ROPE=storage_rope, UPCAST_BF16=upcast)
    return out


def qknorm_rope_attention_forward(q, k, v, q_weight, q_bias, k_weight, k_bias, positions, grid, rope_base: float,
                                  eps: float, scale: float, numerics: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, N, H, Dh) contiguous, lse (B, H, N) fp32)`` of ``softmax(scale q' k'^T) v``.

    Args: as :func:`fastpatch.qknorm_rope_attention` (module docstring for layouts); ``numerics`` is
    ``"float32"`` or ``"storage"``. Empty inputs launch nothing.
    """
    batch, heads, tokens, head_dim = q.shape
    device = q.device
    precision = matmul_dot_precision(q.dtype)
    config = _config(device, q.dtype, head_dim, precision)
    out = torch.empty((batch, tokens, heads, head_dim), dtype=q.dtype, device=device)
    lse = torch.empty((batch, heads, tokens), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, lse
    upcast = q.dtype == torch.bfloat16 and INTERPRETED
    storage_rope = numerics == "storage"
    frequencies = _frequencies(rope_base, head_dim, device)
    pos = _position_args(positions, grid, device)
    fwd = config.forward
    with launch_device(device):
        k_rot = _prepass(k, k_weight, k_bias, pos, frequencies, eps, storage_rope, upcast, config)
        qknorm_rope_attention_fwd_kernel[(cdiv(tokens, fwd.block_m), batch * heads)](
            q, k_rot, v, q_weight, q_bias, pos[0], frequencies, out, lse,
            *q.stride(), *k_rot.stride(), *v.stride(), *_head_major_strides(out), *pos[1:4],
            heads, tokens, scale, eps, *pos[4:7],
            HEAD_DIM=head_dim, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, GRID=pos[7], STORAGE_ROPE=storage_rope,
            UPCAST_BF16=upcast, DOT_PRECISION=precision, num_warps=fwd.num_warps, num_stages=fwd.num_stages)
    return out, lse


def _norm_backward(x, grad_rot, weight, pos, frequencies, eps, upcast, config):
    """(dx token-major in x's dtype, dW, dB in weight's dtype) from dL/d(RoPE(LN(x))) ``grad_rot``."""
    batch, heads, tokens, head_dim = x.shape
    block = config.prepass_block
    programs = cdiv(tokens, block) * batch * heads
    grad_x = _token_major(x)
    partial_w = torch.empty((programs, head_dim), dtype=torch.float32, device=x.device)
    partial_b = torch.empty((programs, head_dim), dtype=torch.float32, device=x.device)
    qknorm_rope_bwd_kernel[(cdiv(tokens, block), batch * heads)](
        x, grad_rot, weight, pos[0], frequencies, grad_x, partial_w, partial_b,
        *x.stride(), *grad_rot.stride(), *pos[1:4], *grad_x.stride(), heads, tokens, eps, *pos[4:7],
        HEAD_DIM=head_dim, BLOCK_N=block, GRID=pos[7], UPCAST_BF16=upcast)
    return grad_x, partial_w.sum(0).to(weight.dtype), partial_b.sum(0).to(weight.dtype)


def qknorm_rope_attention_backward(grad_out, q, k, v, q_weight, q_bias, k_weight, k_bias, out, lse, positions, grid,
                                   rope_base: float, eps: float, scale: float, numerics: str):
    """Gradients ``(dq, dk, dv, dq_weight, dq_bias, dk_weight, dk_bias)`` of :func:`qknorm_rope_attention_forward`.

    ``grad_out`` (B, N, H, Dh), any strides. dq, dk, dv: (B, H, N, Dh) token-major memory in the tokens'
    dtype; parameter gradients (Dh,) in the parameters' dtypes. Deterministic (no atomics). The
    gradient is that of the fp32 function in both numerics modes.
    """
    batch, heads, tokens, head_dim = q.shape
    device = q.device
    precision = matmul_dot_precision(q.dtype)
    config = _config(device, q.dtype, head_dim, precision)
    if q.numel() == 0:
        zeros = [torch.zeros_like(w) for w in (q_weight, q_bias, k_weight, k_bias)]
        return (_token_major(q).zero_(), _token_major(k).zero_(), _token_major(v).zero_(), *zeros)
    upcast = q.dtype == torch.bfloat16 and INTERPRETED
    storage_rope = numerics == "storage"
    frequencies = _frequencies(rope_base, head_dim, device)
    pos = _position_args(positions, grid, device)
    grad_out = grad_out.to(out.dtype)
    delta = torch.empty((batch, heads, tokens), dtype=torch.float32, device=device)
    grad_q_rot = _token_major(q, torch.float32)
    grad_k_rot = _token_major(k, torch.float32)
    grad_v = _token_major(v)
    placeholder = _placeholder(device)
    common = dict(HEAD_DIM=head_dim, ROPE=False, UPCAST_BF16=upcast, DOT_PRECISION=precision)
    dq_cfg, dkdv_cfg = config.backward_dq, config.backward_dkdv
    grad_out_strides, out_strides = _head_major_strides(grad_out), _head_major_strides(out)
    with launch_device(device):
        q_rot = _prepass(q, q_weight, q_bias, pos, frequencies, eps, storage_rope, upcast, config)
        k_rot = _prepass(k, k_weight, k_bias, pos, frequencies, eps, storage_rope, upcast, config)
        rope_attention_bwd_dq_kernel[(cdiv(tokens, dq_cfg.block_m), batch * heads)](
            q_rot, k_rot, v, out, grad_out, lse, delta, placeholder, placeholder, frequencies, grad_q_rot,
            *q_rot.stride(), *k_rot.stride(), *v.stride(), *out_strides, *grad_out_strides, *grad_q_rot.stride(),
            0, 0, 0, 0, 0, 0, heads, tokens, tokens, scale, BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
            ROTATE_K_IN_LOOP=False, num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages, **common)
        rope_attention_bwd_dkdv_kernel[(cdiv(tokens, dkdv_cfg.block_n), batch * heads)](
            q_rot, k_rot, v, grad_out, lse, delta, placeholder, placeholder, frequencies, grad_k_rot, grad_v,
            *q_rot.stride(), *k_rot.stride(), *v.stride(), *grad_out_strides, *grad_k_rot.stride(), *grad_v.stride(),
            0, 0, 0, 0, 0, 0, heads, tokens, tokens, scale, BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n,
            ROTATE_Q_IN_LOOP=False, num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages, **common)
        grad_q, grad_q_weight, grad_q_bias = _norm_backward(q, grad_q_rot, q_weight, pos, frequencies, eps, upcast,
                                                            config)
        grad_k, grad_k_weight, grad_k_bias = _norm_backward(k, grad_k_rot, k_weight, pos, frequencies, eps, upcast,
                                                            config)
    return (grad_q, grad_k, grad_v, grad_q_weight, grad_q_bias.to(q_bias.dtype), grad_k_weight,
            grad_k_bias.to(k_bias.dtype))


def kernel_specializations(head_dim: int, dtype: torch.dtype, capability_class: int):
    """Every (kernel, constexpr + launch keywords) these launchers can run on a GPU of ``capability_class``:
    pre-pass and LN backward (grid and tensor positions, both numerics), forward, and the two RoPE-off
    backward kernels, per dot precision of ``dtype``. Used by the AOT compile tests."""
    capability = (capability_class // 10, capability_class % 10)
    out = []
    for precision in dot_precisions(dtype):
        config = qknorm_rope_attention_config(head_dim, dtype, capability, precision)
        for grid in (True, False):
            for storage in (False, True):
                out.append((qknorm_rope_kernel, dict(HEAD_DIM=head_dim, BLOCK_N=config.prepass_block, GRID=grid,
                                                     STORAGE_ROPE=storage, UPCAST_BF16=False)))
                fwd = config.forward
                out.append((qknorm_rope_attention_fwd_kernel, dict(
                    HEAD_DIM=head_dim, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, GRID=grid, STORAGE_ROPE=storage,
                    UPCAST_BF16=False, DOT_PRECISION=precision, num_warps=fwd.num_warps, num_stages=fwd.num_stages)))
            out.append((qknorm_rope_bwd_kernel, dict(HEAD_DIM=head_dim, BLOCK_N=config.prepass_block, GRID=grid,
                                                     UPCAST_BF16=False)))
    unique = []
    for item in out:
        if item not in unique:
            unique.append(item)
    return unique
