"""Triton kernels of the fused patch embedding (a stride-p, kernel-p convolution read as tokens).

Notation: B samples, C_in image channels, p patch size, E embed_dim. The image is read in place
through its strides (NCHW, channels-last or any other layout); no im2col copy is made. Token
rows are numbered over the whole batch, ``m = b * N + n``; patch pixels over one patch,
``k = c * p * p + i * p + j`` (the order of ``weight.reshape(E, C_in * p * p)``).

Geometry of one sample (see the spec, sections 1 and 2): a sample stored as (C_in, Hi, Wi) has a
grid of Ht = Hi / p rows and Wt = Wi / p columns. A ManyAR *portrait* sample is stored transposed,
so its true grid has Wt rows and Ht columns and its pixel (y, x) sits at stored (x, y): the
kernels swap the row and column strides of such a sample instead of copying it.

Every kernel tiles over two of the three GEMM axes and loops over the third:

* :func:`patch_embed_fwd_kernel`   tokens (M, E) = patches (M, K) @ weight^T (K, E) + bias, and the
  (y, x) positions, in one launch; grid (cdiv(M, BLOCK_M), cdiv(E, BLOCK_N)).
* :func:`patch_embed_grad_weight_kernel` grad_weight (E, K) = grad_tokens^T (E, M) @ patches (M, K)
  and grad_bias (E) = sum over M; grid (cdiv(E, BLOCK_N), cdiv(K, BLOCK_K)).
* :func:`patch_embed_grad_image_kernel`  grad_patches (M, K) = grad_tokens (M, E) @ weight (E, K),
  written straight into the image layout (patches do not overlap, so every pixel is written
  exactly once); grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)).

All products accumulate in fp32. ``UPCAST`` (set by the launcher when the Triton interpreter
runs, whose bf16 arithmetic is wrong) converts every loaded value to fp32 before ``tl.dot``.
Launch configurations: :mod:`fastpatch.kernels.patch_embed_configs`.
"""
# No `from __future__ import annotations`: triton 3.1's interpreter treats a parameter as constexpr only
# when its annotation is the `tl.constexpr` object itself, not the string the future import makes of it.
import triton
import triton.language as tl

__all__ = [
    "patch_embed_fwd_kernel",
    "patch_embed_grad_weight_kernel",
    "patch_embed_grad_image_kernel",
]


@triton.jit
def _token_geometry(rows, total_tokens, num_tokens, grid_h, grid_w, stride_h, stride_w, portrait_ptr,
                    PATCH: tl.constexpr, MANY_AR: tl.constexpr):
    """Per token row m: its sample, whether that sample is portrait, its grid (y, x) and the
    offset of its patch's top-left pixel inside the sample (without the batch stride)."""
    row_ok = rows < total_tokens
    sample = rows // num_tokens
    token = rows % num_tokens
    if MANY_AR:
        portrait = tl.load(portrait_ptr + sample, mask=row_ok, other=0) != 0
        grid_cols = tl.where(portrait, grid_h, grid_w)
        y = token // grid_cols
        x = token % grid_cols
        corner = tl.where(portrait, y * PATCH * stride_w + x * PATCH * stride_h,
                          y * PATCH * stride_h + x * PATCH * stride_w)
    else:
        portrait = rows < 0
        y = token // grid_w
        x = token % grid_w
        corner = y * PATCH * stride_h + x * PATCH * stride_w
    return row_ok, sample, portrait, y, x, corner


@triton.jit
def _pixel_offsets(corner, sample, portrait, ks, stride_b, stride_c, stride_h, stride_w,
                   PATCH: tl.constexpr, MANY_AR: tl.constexpr):
    """(BLOCK_M, BLOCK_K) element offsets of patch pixels ``ks`` for the token rows described by
    ``corner`` / ``sample`` / ``portrait`` (from :func:`_token_geometry`)."""
    chan = ks // (PATCH * PATCH)
    i = (ks // PATCH) % PATCH
    j = ks % PATCH
    landscape = chan * stride_c + i * stride_h + j * stride_w
    row_base = sample.to(tl.int64) * stride_b + corner
    if MANY_AR:
        transposed = chan * stride_c + i * stride_w + j * stride_h
        return row_base[:, None] + tl.where(portrait[:, None], transposed[None, :], landscape[None, :])
    else:
        return row_base[:, None] + landscape[None, :]


@triton.jit
def _computed(x):
    """``x`` as a computed rather than a loaded value (-0.0 becomes +0.0, every other value is
    unchanged), for the TF32 products whose operands are not contiguous along the reduced axis.

    Hopper's wgmma reads TF32 operands from shared memory only contiguous along the reduced axis
    (it transposes 16-bit operands only). Given such an operand straight from ``tl.load``, Triton
    copies it from global to shared memory transposed, 4 bytes per ``cp.async``; given a computed
    value, it copies 16 bytes at a time in the operand's own order and transposes through
    registers (where wgmma reads a left operand directly). A zero of either sign adds a zero, so a
    product can differ at most in the sign of an exactly-zero entry. On sm_80 (mma.sync) the
    operands pass through registers anyway: there it costs one addition per element.
    """
    return x + 0.0


@triton.jit
def patch_embed_fwd_kernel(
    img_ptr, weight_ptr, bias_ptr, portrait_ptr, tokens_ptr, pos_ptr,
    total_tokens, num_tokens, grid_h, grid_w, embed_dim, patch_pixels,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_we, stride_wk,
    PATCH: tl.constexpr, MANY_AR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """tokens[m, e] = sum_k patch[m, k] * weight[e, k] + bias[e]; pos[m] = (y, x).

    tokens: (B * N, E) contiguous, image dtype. pos: (B * N, 2) int64 contiguous, written by the
    programs of the first channel tile. portrait_ptr: (B,) bool, read only when MANY_AR.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chan_ok = chans < embed_dim
    row_ok, sample, portrait, y, x, corner = _token_geometry(
        rows, total_tokens, num_tokens, grid_h, grid_w, stride_ih, stride_iw, portrait_ptr, PATCH, MANY_AR)

    # Projection: loop over the patch pixels, gathering them from the image in place.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, patch_pixels, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < patch_pixels
        offs = _pixel_offsets(corner, sample, portrait, ks, stride_ib, stride_ic, stride_ih, stride_iw, PATCH, MANY_AR)
        patch = tl.load(img_ptr + offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + chans[None, :] * stride_we + ks[:, None] * stride_wk,
                    mask=chan_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            patch = patch.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(patch, w, acc, input_precision=DOT_PRECISION)

    # Bias, then store the tokens in the image dtype.
    bias = tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    acc += bias[None, :]
    tl.store(tokens_ptr + rows[:, None].to(tl.int64) * embed_dim + chans[None, :],
             acc.to(tokens_ptr.dtype.element_ty), mask=row_ok[:, None] & chan_ok[None, :])

    # Positions (y, x), once per token row.
    if pid_n == 0:
        pos_offs = rows.to(tl.int64) * 2
        tl.store(pos_ptr + pos_offs, y.to(tl.int64), mask=row_ok)
        tl.store(pos_ptr + pos_offs + 1, x.to(tl.int64), mask=row_ok)


@triton.jit
def patch_embed_grad_weight_kernel(
    img_ptr, grad_tokens_ptr, portrait_ptr, grad_weight_ptr, grad_bias_ptr,
    total_tokens, num_tokens, grid_h, grid_w, embed_dim, patch_pixels,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_gb, stride_gn, stride_ge,
    PATCH: tl.constexpr, MANY_AR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_weight[e, k] = sum_m grad_tokens[m, e] * patch[m, k]; grad_bias[e] = sum_m grad_tokens[m, e].

    grad_tokens: (B, N, E) with strides (stride_gb, stride_gn, stride_ge). grad_weight: (E, K)
    contiguous, grad_bias: (E,), both in the weight dtype; grad_bias is written by the programs
    of the first pixel tile.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    chans = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    chan_ok = chans < embed_dim
    k_ok = ks < patch_pixels

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, total_tokens, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok, sample, portrait, y, x, corner = _token_geometry(
            rows, total_tokens, num_tokens, grid_h, grid_w, stride_ih, stride_iw, portrait_ptr, PATCH, MANY_AR)
        g_rows = sample.to(tl.int64) * stride_gb + (rows % num_tokens) * stride_gn
        grad_t = tl.load(grad_tokens_ptr + chans[:, None] * stride_ge + g_rows[None, :],
                         mask=chan_ok[:, None] & row_ok[None, :], other=0.0)
        offs = _pixel_offsets(corner, sample, portrait, ks, stride_ib, stride_ic, stride_ih, stride_iw, PATCH, MANY_AR)
        patch = tl.load(img_ptr + offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            grad_t = grad_t.to(tl.float32)
            patch = patch.to(tl.float32)
        if DOT_PRECISION == "tf32":  # neither is contiguous along the tokens: see _computed
            acc = tl.dot(_computed(grad_t), _computed(patch), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(grad_t, patch, acc, input_precision=DOT_PRECISION)
        bias_acc += tl.sum(grad_t.to(tl.float32), axis=1)

    tl.store(grad_weight_ptr + chans[:, None] * patch_pixels + ks[None, :],
             acc.to(grad_weight_ptr.dtype.element_ty), mask=chan_ok[:, None] & k_ok[None, :])
    tl.store(grad_bias_ptr + chans, bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=chan_ok & (pid_k == 0))


@triton.jit
def patch_embed_grad_image_kernel(
    grad_tokens_ptr, weight_ptr, portrait_ptr, grad_img_ptr,
    total_tokens, num_tokens, grid_h, grid_w, embed_dim, patch_pixels,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_gb, stride_gn, stride_ge,
    stride_we, stride_wk,
    PATCH: tl.constexpr, MANY_AR: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_patch[m, k] = sum_e grad_tokens[m, e] * weight[e, k], stored at the pixel patch[m, k] reads.

    grad_img has strides (stride_ib, stride_ic, stride_ih, stride_iw) and the image dtype; since
    stride == kernel and the image is tiled exactly, this covers every pixel once.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < patch_pixels
    row_ok, sample, portrait, y, x, corner = _token_geometry(
        rows, total_tokens, num_tokens, grid_h, grid_w, stride_ih, stride_iw, portrait_ptr, PATCH, MANY_AR)
    g_rows = sample.to(tl.int64) * stride_gb + (rows % num_tokens) * stride_gn

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for e0 in range(0, embed_dim, BLOCK_N):
        chans = e0 + tl.arange(0, BLOCK_N)
        chan_ok = chans < embed_dim
        grad = tl.load(grad_tokens_ptr + g_rows[:, None] + chans[None, :] * stride_ge,
                       mask=row_ok[:, None] & chan_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + chans[:, None] * stride_we + ks[None, :] * stride_wk,
                    mask=chan_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            grad = grad.to(tl.float32)
            w = w.to(tl.float32)
        if DOT_PRECISION == "tf32":  # not contiguous along the channels: see _computed
            w = _computed(w)
        acc = tl.dot(grad, w, acc, input_precision=DOT_PRECISION)

    offs = _pixel_offsets(corner, sample, portrait, ks, stride_ib, stride_ic, stride_ih, stride_iw, PATCH, MANY_AR)
    tl.store(grad_img_ptr + offs, acc.to(grad_img_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])
