"""Per-head LayerNorm + RoPE2D (VGGT / π3 qk-norm) as in-register Triton helpers, plus the two
row-wise kernels around the flash attention: the pre-pass writing ``RoPE(LN(x))`` and the backward
of LN + RoPE.

Tiles use the pair-half split of :mod:`fastpatch.kernels.rope` (``a = [Y_a | X_a]``,
``b = [Y_b | X_b]``, each (BLOCK, Dh/2)); the LayerNorm statistics run over both halves (all
``Dh`` channels of a head). Positions come from a (B, N, 2) int64 tensor, or with ``GRID`` from the
token index (spec §1.3): token ``t`` of a frame of ``n`` tokens is ``i = t mod n``; ``i < special``
is at (0, 0), else patch ``p = i - special`` at ``(p // width + 1, p % width + 1)``.

Numerics (``STORAGE_ROPE``): off -- LN and RoPE in fp32, one rounding to the storage dtype (VGGT
under autocast, and fp32); on -- the LN output, the angles, cos/sin and each product and sum are
rounded to the storage dtype (π3; a model run natively in bf16/fp16).
"""
import triton
import triton.language as tl

from .rope import cos_sin, pair_columns, rotate_pairs, round_to


@triton.jit
def token_coordinates(pos_ptr, stride_pos_n, stride_pos_c, offs_n, mask_n, tokens_per_frame, special, grid_width,
                      GRID: tl.constexpr):
    """fp32 (row, col) of tokens ``offs_n``: from the token index (``GRID``) or the position tensor."""
    if GRID:
        index = offs_n % tokens_per_frame - special
        patch = tl.maximum(index, 0)
        row = tl.where(index < 0, 0, patch // grid_width + 1)
        col = tl.where(index < 0, 0, patch % grid_width + 1)
    else:
        row = tl.load(pos_ptr + offs_n * stride_pos_n, mask=mask_n, other=0)
        col = tl.load(pos_ptr + offs_n * stride_pos_n + stride_pos_c, mask=mask_n, other=0)
    return row.to(tl.float32), col.to(tl.float32)


@triton.jit
def pair_cos_sin(row, col, freq_ptr, dtype: tl.constexpr, HEAD_DIM: tl.constexpr, STORAGE_ROPE: tl.constexpr,
                 UPCAST_BF16: tl.constexpr):
    """fp32 cos/sin (BLOCK, Dh/2) in pair-half column order; ``STORAGE_ROPE`` rounds angles, then cos/sin."""
    HALF: tl.constexpr = HEAD_DIM // 2
    QUARTER: tl.constexpr = HEAD_DIM // 4
    m = tl.arange(0, HALF)
    freq = tl.load(freq_ptr + m % QUARTER)
    coord = tl.where((m < QUARTER)[None, :], row[:, None], col[:, None])
    angle = coord * freq[None, :]
    if STORAGE_ROPE:
        angle = round_to(angle, dtype, UPCAST_BF16).to(tl.float32)
    cos, sin = cos_sin(angle)
    if STORAGE_ROPE:
        cos = round_to(cos, dtype, UPCAST_BF16).to(tl.float32)
        sin = round_to(sin, dtype, UPCAST_BF16).to(tl.float32)
    return cos, sin


@triton.jit
def layer_norm_pairs(x_a, x_b, w_ptr, b_ptr, eps, HEAD_DIM: tl.constexpr):
    """fp32 LayerNorm over both halves: returns (y_a, y_b, xhat_a, xhat_b, rstd (BLOCK,))."""
    cols_a, cols_b = pair_columns(HEAD_DIM)
    mean = (tl.sum(x_a, 1) + tl.sum(x_b, 1)) / HEAD_DIM
    xc_a = x_a - mean[:, None]
    xc_b = x_b - mean[:, None]
    var = (tl.sum(xc_a * xc_a, 1) + tl.sum(xc_b * xc_b, 1)) / HEAD_DIM
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat_a = xc_a * rstd[:, None]
    xhat_b = xc_b * rstd[:, None]
    w_a = tl.load(w_ptr + cols_a).to(tl.float32)
    w_b = tl.load(w_ptr + cols_b).to(tl.float32)
    b_a = tl.load(b_ptr + cols_a).to(tl.float32)
    b_b = tl.load(b_ptr + cols_b).to(tl.float32)
    return xhat_a * w_a[None, :] + b_a[None, :], xhat_b * w_b[None, :] + b_b[None, :], xhat_a, xhat_b, rstd


@triton.jit
def load_halves(ptr, stride_n, stride_d, offs_n, mask_n, HEAD_DIM: tl.constexpr):
    """fp32 pair halves (BLOCK, Dh/2) of rows ``offs_n`` (masked rows are zeros)."""
    cols_a, cols_b = pair_columns(HEAD_DIM)
    row_ptrs = ptr + offs_n[:, None] * stride_n
    a = tl.load(row_ptrs + cols_a[None, :] * stride_d, mask=mask_n[:, None], other=0.0).to(tl.float32)
    b = tl.load(row_ptrs + cols_b[None, :] * stride_d, mask=mask_n[:, None], other=0.0).to(tl.float32)
    return a, b


@triton.jit
def load_norm_rope(ptr, stride_n, stride_d, offs_n, mask_n, w_ptr, b_ptr, eps, row, col, freq_ptr,
                   HEAD_DIM: tl.constexpr, STORAGE_ROPE: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """``RoPE(LN(x))`` of rows ``offs_n`` as pair halves rounded to the storage dtype (a ``tl.dot``
    operand; fp32 values when ``UPCAST_BF16``)."""
    dtype = ptr.dtype.element_ty
    x_a, x_b = load_halves(ptr, stride_n, stride_d, offs_n, mask_n, HEAD_DIM)
    y_a, y_b, _, _, _ = layer_norm_pairs(x_a, x_b, w_ptr, b_ptr, eps, HEAD_DIM)
    cos, sin = pair_cos_sin(row, col, freq_ptr, dtype, HEAD_DIM, STORAGE_ROPE, UPCAST_BF16)
    if STORAGE_ROPE:
        y_a = round_to(y_a, dtype, UPCAST_BF16).to(tl.float32)
        y_b = round_to(y_b, dtype, UPCAST_BF16).to(tl.float32)
        a_cos = round_to(y_a * cos, dtype, UPCAST_BF16).to(tl.float32)
        b_sin = round_to(y_b * sin, dtype, UPCAST_BF16).to(tl.float32)
        b_cos = round_to(y_b * cos, dtype, UPCAST_BF16).to(tl.float32)
        a_sin = round_to(y_a * sin, dtype, UPCAST_BF16).to(tl.float32)
        r_a = a_cos - b_sin
        r_b = b_cos + a_sin
    else:
        r_a, r_b = rotate_pairs(y_a, y_b, cos, sin)
    return round_to(r_a, dtype, UPCAST_BF16), round_to(r_b, dtype, UPCAST_BF16)


@triton.jit
def qknorm_rope_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, freq_ptr, out_ptr,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_pos_b, stride_pos_n, stride_pos_c,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, seq_len, eps, tokens_per_frame, special, grid_width,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, GRID: tl.constexpr, STORAGE_ROPE: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """Pre-pass: out[b, h, n] = RoPE(LN(x[b, h, n])) in out's dtype; grid (cdiv(N, BLOCK_N), B * H)."""
    block_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seq_len
    row, col = token_coordinates(pos_ptr + batch * stride_pos_b, stride_pos_n, stride_pos_c, offs_n, mask_n,
                                 tokens_per_frame, special, grid_width, GRID)
    # load, normalise, rotate
    r_a, r_b = load_norm_rope(x_ptr + batch * stride_xb + head * stride_xh, stride_xn, stride_xd, offs_n, mask_n,
                              w_ptr, b_ptr, eps, row, col, freq_ptr, HEAD_DIM, STORAGE_ROPE, UPCAST_BF16)
    # store
    cols_a, cols_b = pair_columns(HEAD_DIM)
    out_rows = out_ptr + batch * stride_ob + head * stride_oh + offs_n[:, None] * stride_on
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_rows + cols_a[None, :] * stride_od, r_a.to(out_dtype), mask=mask_n[:, None])
    tl.store(out_rows + cols_b[None, :] * stride_od, r_b.to(out_dtype), mask=mask_n[:, None])


@triton.jit
def qknorm_rope_bwd_kernel(
    x_ptr, grad_ptr, w_ptr, pos_ptr, freq_ptr, grad_x_ptr, grad_w_ptr, grad_b_ptr,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_pos_b, stride_pos_n, stride_pos_c,
    stride_dxb, stride_dxh, stride_dxn, stride_dxd,
    num_heads, seq_len, eps, tokens_per_frame, special, grid_width,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, GRID: tl.constexpr, UPCAST_BF16: tl.constexpr,
):
    """Backward of ``RoPE(LN(x))`` given ``grad`` wrt its output: dx, and per-program partial dW, dB.

    Grid (cdiv(N, BLOCK_N), B * H); program ``p`` (row-major over the grid) writes its fp32 partial
    sums to row ``p`` of ``grad_w`` / ``grad_b`` (num_programs, Dh), summed by the launcher. The
    gradient is that of the fp32 function (the storage-mode roundings are not differentiated).
    With g = inverse-rotated grad, gx = g * w: dx = rstd (gx - mean(gx) - xhat mean(gx xhat)).
    """
    block_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seq_len
    cols_a, cols_b = pair_columns(HEAD_DIM)
    row, col = token_coordinates(pos_ptr + batch * stride_pos_b, stride_pos_n, stride_pos_c, offs_n, mask_n,
                                 tokens_per_frame, special, grid_width, GRID)
    # recompute the LN statistics; inverse-rotate the incoming gradient
    x_a, x_b = load_halves(x_ptr + batch * stride_xb + head * stride_xh, stride_xn, stride_xd, offs_n, mask_n,
                           HEAD_DIM)
    w_a = tl.load(w_ptr + cols_a).to(tl.float32)
    w_b = tl.load(w_ptr + cols_b).to(tl.float32)
    _, _, xhat_a, xhat_b, rstd = layer_norm_pairs(x_a, x_b, w_ptr, w_ptr, eps, HEAD_DIM)
    g_a, g_b = load_halves(grad_ptr + batch * stride_gb + head * stride_gh, stride_gn, stride_gd, offs_n, mask_n,
                           HEAD_DIM)
    cos, sin = pair_cos_sin(row, col, freq_ptr, tl.float32, HEAD_DIM, False, False)
    g_a, g_b = rotate_pairs(g_a, g_b, cos, -sin)
    # LayerNorm backward (masked rows have g = 0, so they add nothing to dW / dB)
    gx_a = g_a * w_a[None, :]
    gx_b = g_b * w_b[None, :]
    mean_g = (tl.sum(gx_a, 1) + tl.sum(gx_b, 1)) / HEAD_DIM
    mean_gx = (tl.sum(gx_a * xhat_a, 1) + tl.sum(gx_b * xhat_b, 1)) / HEAD_DIM
    dx_a = (gx_a - mean_g[:, None] - xhat_a * mean_gx[:, None]) * rstd[:, None]
    dx_b = (gx_b - mean_g[:, None] - xhat_b * mean_gx[:, None]) * rstd[:, None]
    dx_rows = grad_x_ptr + batch * stride_dxb + head * stride_dxh + offs_n[:, None] * stride_dxn
    dx_dtype = grad_x_ptr.dtype.element_ty
    tl.store(dx_rows + cols_a[None, :] * stride_dxd, round_to(dx_a, dx_dtype, UPCAST_BF16).to(dx_dtype),
             mask=mask_n[:, None])
    tl.store(dx_rows + cols_b[None, :] * stride_dxd, round_to(dx_b, dx_dtype, UPCAST_BF16).to(dx_dtype),
             mask=mask_n[:, None])
    # partial parameter gradients of this program
    program = (batch_head.to(tl.int64) * tl.num_programs(0) + block_n) * HEAD_DIM
    tl.store(grad_w_ptr + program + cols_a, tl.sum(g_a * xhat_a, 0))
    tl.store(grad_w_ptr + program + cols_b, tl.sum(g_b * xhat_b, 0))
    tl.store(grad_b_ptr + program + cols_a, tl.sum(g_a, 0))
    tl.store(grad_b_ptr + program + cols_b, tl.sum(g_b, 0))
