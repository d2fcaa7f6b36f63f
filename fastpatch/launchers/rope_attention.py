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
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton

from ..backend import interpreter_active
from ..kernels.rope import rope_rotate_kernel
from ..kernels.rope_attention_bwd import rope_attention_bwd_dkdv_kernel, rope_attention_bwd_dq_kernel
from ..kernels.rope_attention_configs import K_ROTATIONS, KernelConfig, RopeAttentionConfig, rope_attention_config
from ..kernels.rope_attention_fwd import rope_attention_fwd_kernel

__all__ = ["rope_frequencies", "launch_config", "rope_rotate", "rope_attention_forward", "rope_attention_backward",
           "kernel_specializations"]

_FREQUENCY_CACHE: Dict[Tuple[float, float, int, torch.device], torch.Tensor] = {}
_PLACEHOLDER_CACHE: Dict[Tuple[torch.dtype, torch.device], torch.Tensor] = {}


def rope_frequencies(rope_base: float, rope_f0: float, head_dim: int, device: torch.device) -> torch.Tensor:
    """fp32 (Dh/4,) table ``F0 * base**(-j / (Dh/4))``, computed in float64 and rounded once (cached)."""
    key = (float(rope_base), float(rope_f0), head_dim, torch.device(device))
    table = _FREQUENCY_CACHE.get(key)
    if table is None:
        quarter = head_dim // 4
        exponents = torch.arange(quarter, dtype=torch.float64) / quarter
        table = (rope_f0 * float(rope_base) ** -exponents).to(torch.float32).to(device)
        _FREQUENCY_CACHE[key] = table
    return table


def _placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor passed for pointer arguments a kernel variant never reads."""
    key = (dtype, torch.device(device))
    if key not in _PLACEHOLDER_CACHE:
        _PLACEHOLDER_CACHE[key] = torch.zeros(1, dtype=dtype, device=device)
    return _PLACEHOLDER_CACHE[key]


def launch_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> RopeAttentionConfig:
    """The config table entry for these inputs (CUDA: the device's capability; interpreter: the sm_80 entry).

    Raises:
        ValueError: unsupported head dim or dtype.
    """
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return rope_attention_config(head_dim, dtype, capability)


def _meta(kernel_config: KernelConfig, head_dim: int, **flags) -> dict:
    """Launch keywords (constexprs + num_warps/num_stages) of an attention kernel."""
    return dict(HEAD_DIM=head_dim, BLOCK_M=kernel_config.block_m, BLOCK_N=kernel_config.block_n,
                num_warps=kernel_config.num_warps, num_stages=kernel_config.num_stages, **flags)


def kernel_specializations(head_dim: int, dtype: torch.dtype, capability_class: int) -> List[Tuple[object, dict]]:
    """Every (kernel, launch keywords) the launchers can run on a GPU of ``capability_class`` (80 or 90).

    Covers RoPE off, RoPE with in-loop rotation and RoPE with pre-rotated operands, for the
    forward, both backward kernels and the standalone RoPE kernel; used by the AOT compile tests.
    """
    config = rope_attention_config(head_dim, dtype, (capability_class // 10, capability_class % 10))
    specializations = [(rope_rotate_kernel, dict(HEAD_DIM=head_dim, BLOCK_N=config.rope_block, UPCAST_BF16=False))]
    for rope, in_loop in ((False, False), (True, True), (True, False)):
        specializations += [
            (rope_attention_fwd_kernel,
             _meta(config.forward, head_dim, ROPE=rope, ROTATE_K_IN_LOOP=in_loop, UPCAST_BF16=False)),
            (rope_attention_bwd_dq_kernel,
             _meta(config.backward_dq, head_dim, ROPE=rope, ROTATE_K_IN_LOOP=in_loop, UPCAST_BF16=False)),
            (rope_attention_bwd_dkdv_kernel,
             _meta(config.backward_dkdv, head_dim, ROPE=rope, ROTATE_Q_IN_LOOP=in_loop, UPCAST_BF16=False)),
        ]
    return specializations


def _upcast_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreter_active()


def _position_args(pos: Optional[torch.Tensor], device: torch.device):
    """(tensor, stride_b, stride_n, stride_c) for a (B, N, 2) position tensor, or a placeholder."""
    if pos is None:
        return (_placeholder(torch.int64, device), 0, 0, 0)
    return (pos, *pos.stride())


def _token_major_like(x: torch.Tensor) -> torch.Tensor:
    """Empty (B, H, N, Dh) tensor of ``x``'s shape/dtype stored as contiguous (B, N, H, Dh)."""
    b, h, n, d = x.shape
    return torch.empty((b, n, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)


def _resolve_k_rotation(k_rotation: Optional[str], config: RopeAttentionConfig) -> str:
    k_rotation = config.k_rotation if k_rotation is None else k_rotation
    if k_rotation not in K_ROTATIONS:
        raise ValueError(f"k_rotation must be one of {K_ROTATIONS}, got {k_rotation!r}")
    return k_rotation


def rope_rotate(x: torch.Tensor, pos: torch.Tensor, frequencies: torch.Tensor, block_n: int = 64) -> torch.Tensor:
    """RoPE2D of ``x`` (B, H, N, Dh), any strides, by ``pos`` (B, N, 2) int64 -> new contiguous (B, H, N, Dh).

    ``frequencies`` is the fp32 (Dh/4,) table of :func:`rope_frequencies`; its negation gives the
    inverse rotation.
    """
    batch, heads, seq_len, head_dim = x.shape
    out = torch.empty((batch, heads, seq_len, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(seq_len, block_n), batch * heads)
    rope_rotate_kernel[grid](
        x, pos, frequencies, out, *x.stride(), *pos.stride(), *out.stride(), heads, seq_len,
        HEAD_DIM=head_dim, BLOCK_N=block_n, UPCAST_BF16=_upcast_bf16(x.dtype),
    )
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

    Raises:
        ValueError: unsupported head dim, dtype or ``k_rotation``.
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    config = launch_config(head_dim, q.dtype, q.device)
    k_rotation = _resolve_k_rotation(k_rotation, config)
    out = torch.empty((batch, seq_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    rope = rope_base is not None
    frequencies = rope_frequencies(rope_base, rope_f0, head_dim, q.device) if rope else _placeholder(
        torch.float32, q.device)
    rotate_k_in_loop = rope and k_rotation == "in_loop"
    if rope and not rotate_k_in_loop:
        k = rope_rotate(k, k_pos, frequencies, config.rope_block)
    q_pos_args, k_pos_args = _position_args(q_pos, q.device), _position_args(k_pos, q.device)
    fwd = config.forward
    grid = (triton.cdiv(seq_q, fwd.block_m), batch * heads)
    rope_attention_fwd_kernel[grid](
        q, k, v, q_pos_args[0], k_pos_args[0], frequencies, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.transpose(1, 2).stride(), *q_pos_args[1:], *k_pos_args[1:],
        heads, seq_q, seq_k, scale,
        **_meta(fwd, head_dim, ROPE=rope, ROTATE_K_IN_LOOP=rotate_k_in_loop, UPCAST_BF16=_upcast_bf16(q.dtype)),
    )
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
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    config = launch_config(head_dim, q.dtype, q.device)
    k_rotation = _resolve_k_rotation(k_rotation, config)
    grad_q, grad_k, grad_v = _token_major_like(q), _token_major_like(k), _token_major_like(v)
    if grad_q.numel() == 0 or grad_k.numel() == 0:
        return grad_q, grad_k.zero_(), grad_v.zero_()
    grad_out = grad_out.to(out.dtype)
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    rope = rope_base is not None
    frequencies = rope_frequencies(rope_base, rope_f0, head_dim, q.device) if rope else _placeholder(
        torch.float32, q.device)
    rotate_in_loop = rope and k_rotation == "in_loop"
    q_inner, k_inner = q, k
    if rope and not rotate_in_loop:
        q_inner = rope_rotate(q, q_pos, frequencies, config.rope_block)
        k_inner = rope_rotate(k, k_pos, frequencies, config.rope_block)
    q_pos_args, k_pos_args = _position_args(q_pos, q.device), _position_args(k_pos, q.device)
    flags = dict(ROPE=rope, UPCAST_BF16=_upcast_bf16(q.dtype))

    # dQ (and delta) over query blocks: the query tile is rotated in-kernel, keys come from k_inner
    dq_cfg = config.backward_dq
    rope_attention_bwd_dq_kernel[(triton.cdiv(seq_q, dq_cfg.block_m), batch * heads)](
        q, k_inner, v, out, grad_out, lse, delta, q_pos_args[0], k_pos_args[0], frequencies, grad_q,
        *q.stride(), *k_inner.stride(), *v.stride(), *out.transpose(1, 2).stride(),
        *grad_out.transpose(1, 2).stride(), *grad_q.stride(), *q_pos_args[1:], *k_pos_args[1:],
        heads, seq_q, seq_k, scale, **_meta(dq_cfg, head_dim, ROTATE_K_IN_LOOP=rotate_in_loop, **flags),
    )
    # dK, dV over key blocks: the key tile is rotated in-kernel, queries come from q_inner
    dkdv_cfg = config.backward_dkdv
    rope_attention_bwd_dkdv_kernel[(triton.cdiv(seq_k, dkdv_cfg.block_n), batch * heads)](
        q_inner, k, v, grad_out, lse, delta, q_pos_args[0], k_pos_args[0], frequencies, grad_k, grad_v,
        *q_inner.stride(), *k.stride(), *v.stride(), *grad_out.transpose(1, 2).stride(),
        *grad_k.stride(), *grad_v.stride(), *q_pos_args[1:], *k_pos_args[1:],
        heads, seq_q, seq_k, scale, **_meta(dkdv_cfg, head_dim, ROTATE_Q_IN_LOOP=rotate_in_loop, **flags),
    )
    return grad_q, grad_k, grad_v
