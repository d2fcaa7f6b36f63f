"""Flash-attention forward with 2-D RoPE applied to q and k inside the kernel.

Every tensor is addressed through (batch, head, token, channel) strides, so q/k/v can be
arbitrary views (e.g. slices of a fused qkv projection) and the output can be written in
(B, N, H, Dh) memory. Scores use the pair-half split of :mod:`fastpatch.kernels.rope`:
``S = q_a k_a^T + q_b k_b^T``.
"""
import triton
import triton.language as tl

from .rope import load_pair_halves, load_rows, pair_scores, round_to

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def attend_key_tiles(q_a, q_b, k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd, k_pos_base,
                     stride_kpos_n, stride_kpos_c, freq_ptr, seq_k, qk_scale_log2,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROTATE_K: tl.constexpr,
                     UPCAST_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The flash main loop of one query tile (pair halves ``q_a``, ``q_b``, already rotated) over all
    ``seq_k`` keys of one (batch, head): returns fp32 ``(acc (BLOCK_M, Dh), row_max, row_sum)``, the
    unnormalised output and the base-2 running maximum and sum of the online softmax. ``ROTATE_K``
    rotates each key tile by its positions; otherwise the keys are read as they are."""
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, seq_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_k
        # load (+ rotate) a key tile, load its value tile
        k_a, k_b = load_pair_halves(k_base, stride_kn, stride_kd, offs_n, mask_n, k_pos_base, stride_kpos_n,
                                    stride_kpos_c, freq_ptr, HEAD_DIM, ROTATE_K, UPCAST_BF16)
        v = load_rows(v_base, stride_vn, stride_vd, offs_n, mask_n, HEAD_DIM, UPCAST_BF16)
        # scale: base-2 scores, keys past the end masked out
        scores = pair_scores(q_a, q_b, k_a, k_b, DOT_PRECISION)
        scores = tl.where(mask_n[None, :], scores * qk_scale_log2, float("-inf"))
        # online softmax: rescale the running sum and accumulator to the new row maximum
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        correction = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, 1)
        probs = round_to(probs, v_base.dtype.element_ty, UPCAST_BF16)
        acc = tl.dot(probs, v, acc * correction[:, None], input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def store_attention_tile(acc, row_max, row_sum, out_base, stride_on, stride_od, lse_row_ptr, offs_m, mask_m,
                         HEAD_DIM: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """Store one query tile's normalised output (rows ``offs_m`` of ``out_base``, in its dtype) and the
    natural-log log-sum-exp of its scaled scores (fp32, at ``lse_row_ptr + offs_m``)."""
    offs_d = tl.arange(0, HEAD_DIM)
    out = acc / row_sum[:, None]
    out_ptrs = out_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    out = round_to(out, out_base.dtype.element_ty, UPCAST_BF16).to(out_base.dtype.element_ty)
    tl.store(out_ptrs, out, mask=mask_m[:, None])
    lse = (row_max + tl.log2(row_sum)) * LN2
    tl.store(lse_row_ptr + offs_m, lse, mask=mask_m)


@triton.jit
def rope_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, freq_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_qpos_b, stride_qpos_n, stride_qpos_c,
    stride_kpos_b, stride_kpos_n, stride_kpos_c,
    num_heads, seq_q, seq_k, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, ROTATE_K_IN_LOOP: tl.constexpr, UPCAST_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (BLOCK_M queries, head) tile per program; grid (cdiv(Nq, BLOCK_M), B * H).

    out[b, n, h] = softmax(scale * q' k'^T) v with q' = RoPE(q, q_pos), k' = RoPE(k, k_pos).
    ``ROPE`` rotates the query tile; ``ROTATE_K_IN_LOOP`` rotates each key tile in the loop
    (otherwise ``k_ptr`` already holds rotated keys, or ``ROPE`` is off). lse[b, h, n] (fp32,
    contiguous (B, H, Nq)) receives the natural-log log-sum-exp of the scaled scores.
    ``DOT_PRECISION`` is the fp32 products' ``input_precision``: "ieee" or "tf32" (tensor cores).
    """
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seq_q
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    k_pos_base = k_pos_ptr + batch * stride_kpos_b
    qk_scale_log2 = scale * LOG2E  # scores in base 2: exp(s * scale) = exp2(s * scale * log2 e)

    # load + rotate the query tile once
    q_a, q_b = load_pair_halves(q_ptr + batch * stride_qb + head * stride_qh, stride_qn, stride_qd, offs_m, mask_m,
                                q_pos_ptr + batch * stride_qpos_b, stride_qpos_n, stride_qpos_c, freq_ptr,
                                HEAD_DIM, ROPE, UPCAST_BF16)

    acc, row_max, row_sum = attend_key_tiles(
        q_a, q_b, k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd, k_pos_base, stride_kpos_n,
        stride_kpos_c, freq_ptr, seq_k, qk_scale_log2, BLOCK_M, BLOCK_N, HEAD_DIM, ROTATE_K_IN_LOOP, UPCAST_BF16,
        DOT_PRECISION)
    store_attention_tile(acc, row_max, row_sum, out_ptr + batch * stride_ob + head * stride_oh, stride_on, stride_od,
                         lse_ptr + batch_head.to(tl.int64) * seq_q, offs_m, mask_m, HEAD_DIM, UPCAST_BF16)
