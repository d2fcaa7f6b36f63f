"""Flash-attention forward with the qk-norm prologue: per-head LayerNorm then RoPE2D on the query
tile, keys pre-normalised and pre-rotated once.

Where K is normalised and rotated (spec §2.5's cost analysis): inside the key loop every query
block would redo LayerNorm + RoPE for every key tile -- about 20 CUDA-core FLOPs per key element
(mean, variance, affine, angle, cos/sin, rotation) next to 4·BLOCK_M tensor-core FLOPs for that
element in QK^T and PV, i.e. comparable work repeated cdiv(N, BLOCK_M) times (813 times at 100 frames
with 128-row tiles), and the statistics need the whole 64-lane row before the first dot. So K goes
through :func:`~fastpatch.kernels.qknorm_rope.qknorm_rope_kernel` once (one read of K, one write
of K' in the storage dtype: the same rounding SDPA's inputs get in eager, so no accuracy is lost),
and the main loop is a plain flash loop over K'. Q is normalised and rotated once per program,
when its tile is loaded (the prologue), never written back.

Scores use the pair-half split of :mod:`fastpatch.kernels.rope`: ``S = q_a k_a^T + q_b k_b^T``, with
K' read as pair halves too.
"""
import triton
import triton.language as tl

from .qknorm_rope import load_norm_rope, token_coordinates
from .rope_attention_fwd import LOG2E, attend_key_tiles, store_attention_tile


@triton.jit
def qknorm_rope_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, q_w_ptr, q_b_ptr, pos_ptr, freq_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_pos_b, stride_pos_n, stride_pos_c,
    num_heads, seq_len, scale, eps, tokens_per_frame, special, grid_width,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GRID: tl.constexpr,
    STORAGE_ROPE: tl.constexpr, UPCAST_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (BLOCK_M queries, head) tile per program; grid (cdiv(N, BLOCK_M), B * H).

    out[b, n, h] = softmax(scale q' k'^T) v with q' = RoPE(LN_q(q)) computed here and ``k_ptr``
    holding k' = RoPE(LN_k(k)) (the pre-pass). lse[b, h, n] (fp32, contiguous (B, H, N)): natural-log
    log-sum-exp of the scaled scores, for the backward.
    """
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seq_len
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    qk_scale_log2 = scale * LOG2E

    # prologue: load the query tile, LayerNorm it, rotate it (once)
    row, col = token_coordinates(pos_ptr + batch * stride_pos_b, stride_pos_n, stride_pos_c, offs_m, mask_m,
                                 tokens_per_frame, special, grid_width, GRID)
    q_a, q_b = load_norm_rope(q_ptr + batch * stride_qb + head * stride_qh, stride_qn, stride_qd, offs_m, mask_m,
                              q_w_ptr, q_b_ptr, eps, row, col, freq_ptr, HEAD_DIM, STORAGE_ROPE, UPCAST_BF16)

    # main loop over the pre-normalised, pre-rotated keys, then the epilogue
    acc, row_max, row_sum = attend_key_tiles(
        q_a, q_b, k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd, pos_ptr, 0, 0, freq_ptr, seq_len,
        qk_scale_log2, BLOCK_M, BLOCK_N, HEAD_DIM, False, UPCAST_BF16, DOT_PRECISION)
    store_attention_tile(acc, row_max, row_sum, out_ptr + batch * stride_ob + head * stride_oh, stride_on, stride_od,
                         lse_ptr + batch_head.to(tl.int64) * seq_len, offs_m, mask_m, HEAD_DIM, UPCAST_BF16)
