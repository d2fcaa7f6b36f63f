"""Flash-attention backward with 2-D RoPE applied inside the kernels; deterministic (no atomics).

Two kernels, launched in this order on one stream:

1. :func:`rope_attention_bwd_dq_kernel`, one program per query block, looping over key blocks:
   writes ``delta = rowsum(dO * O)`` for its rows, then dQ.
2. :func:`rope_attention_bwd_dkdv_kernel`, one program per key block, looping over query blocks:
   dK and dV (reads the delta written by kernel 1).

With S = scale q' k'^T, P = softmax(S) (recomputed from the saved log-sum-exp), O = P v:
dV = P^T dO, dP = dO v^T, dS = P * (dP - delta), dq' = scale dS k', dk' = scale dS^T q'.
Gradients wrt the *unrotated* q and k are the inverse rotation of dq', dk' (rotation by -angle),
applied before the store. Rotated operands use the pair-half split of :mod:`fastpatch.kernels.rope`.
"""
import triton
import triton.language as tl

from .rope import (
    load_pair_halves,
    load_rows,
    pair_scores,
    rope_cos_sin,
    rotate_pairs,
    round_to,
    store_pair_halves,
)
from .rope_attention_fwd import LOG2E


@triton.jit
def unrotate_and_store(ptr, stride_n, stride_d, offs_n, mask_n, grad_a, grad_b, pos_ptr, stride_pos_n, stride_pos_c,
                       freq_ptr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """Store a gradient given as pair halves wrt the rotated tensor, inverse-rotated when ``ROPE``."""
    if ROPE:
        cos, sin = rope_cos_sin(pos_ptr, stride_pos_n, stride_pos_c, offs_n, mask_n, freq_ptr, HEAD_DIM)
        grad_a, grad_b = rotate_pairs(grad_a, grad_b, cos, -sin)
    store_pair_halves(ptr, stride_n, stride_d, offs_n, mask_n, grad_a, grad_b, HEAD_DIM, UPCAST_BF16)


@triton.jit
def rope_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_out_ptr, lse_ptr, delta_ptr, q_pos_ptr, k_pos_ptr, freq_ptr, grad_q_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gob, stride_goh, stride_gon, stride_god,
    stride_gqb, stride_gqh, stride_gqn, stride_gqd,
    stride_qpos_b, stride_qpos_n, stride_qpos_c,
    stride_kpos_b, stride_kpos_n, stride_kpos_c,
    num_heads, seq_q, seq_k, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, ROTATE_K_IN_LOOP: tl.constexpr, UPCAST_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """delta and dQ for one (BLOCK_M queries, head) tile; grid (cdiv(Nq, BLOCK_M), B * H).

    ``ROPE`` rotates the query tile and inverse-rotates dQ; ``ROTATE_K_IN_LOOP`` rotates each
    key tile (otherwise ``k_ptr`` holds rotated keys, or ``ROPE`` is off). lse and delta are fp32
    contiguous (B, H, Nq). ``DOT_PRECISION``: the fp32 products' ``input_precision`` ("ieee" or "tf32").
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
    q_pos_base = q_pos_ptr + batch * stride_qpos_b
    row_stats = batch_head.to(tl.int64) * seq_q + offs_m
    qk_scale_log2 = scale * LOG2E

    # load dO and O; delta = rowsum(dO * O), stored for the dK/dV kernel
    grad_out = load_rows(grad_out_ptr + batch * stride_gob + head * stride_goh, stride_gon, stride_god, offs_m, mask_m,
                         HEAD_DIM, UPCAST_BF16)
    out = load_rows(out_ptr + batch * stride_ob + head * stride_oh, stride_on, stride_od, offs_m, mask_m, HEAD_DIM,
                    UPCAST_BF16)
    delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(delta_ptr + row_stats, delta, mask=mask_m)
    lse_log2 = tl.load(lse_ptr + row_stats, mask=mask_m, other=0.0) * LOG2E

    # load + rotate the query tile once
    q_a, q_b = load_pair_halves(q_ptr + batch * stride_qb + head * stride_qh, stride_qn, stride_qd, offs_m, mask_m,
                                q_pos_base, stride_qpos_n, stride_qpos_c, freq_ptr, HEAD_DIM, ROPE, UPCAST_BF16)

    grad_q_a = tl.zeros((BLOCK_M, HEAD_DIM // 2), dtype=tl.float32)
    grad_q_b = tl.zeros((BLOCK_M, HEAD_DIM // 2), dtype=tl.float32)
    for start_n in range(0, seq_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_k
        # load + rotate a key tile, load its value tile
        k_a, k_b = load_pair_halves(k_base, stride_kn, stride_kd, offs_n, mask_n, k_pos_base, stride_kpos_n,
                                    stride_kpos_c, freq_ptr, HEAD_DIM, ROTATE_K_IN_LOOP, UPCAST_BF16)
        v = load_rows(v_base, stride_vn, stride_vd, offs_n, mask_n, HEAD_DIM, UPCAST_BF16)
        # recompute the probabilities from the log-sum-exp; keys past the end get 0
        scores = pair_scores(q_a, q_b, k_a, k_b, DOT_PRECISION)
        probs = tl.exp2(scores * qk_scale_log2 - lse_log2[:, None])
        probs = tl.where(mask_n[None, :], probs, 0.0)
        # dS = P * (dO v^T - delta); dq' += dS k'
        grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        grad_scores = round_to(probs * (grad_probs - delta[:, None]), k_ptr.dtype.element_ty, UPCAST_BF16)
        grad_q_a = tl.dot(grad_scores, k_a, grad_q_a, input_precision=DOT_PRECISION)
        grad_q_b = tl.dot(grad_scores, k_b, grad_q_b, input_precision=DOT_PRECISION)

    # scale, inverse-rotate, store dQ
    unrotate_and_store(grad_q_ptr + batch * stride_gqb + head * stride_gqh, stride_gqn, stride_gqd, offs_m, mask_m,
                       grad_q_a * scale, grad_q_b * scale, q_pos_base, stride_qpos_n, stride_qpos_c, freq_ptr,
                       HEAD_DIM, ROPE, UPCAST_BF16)


@triton.jit
def rope_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, q_pos_ptr, k_pos_ptr, freq_ptr, grad_k_ptr, grad_v_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gob, stride_goh, stride_gon, stride_god,
    stride_gkb, stride_gkh, stride_gkn, stride_gkd,
    stride_gvb, stride_gvh, stride_gvn, stride_gvd,
    stride_qpos_b, stride_qpos_n, stride_qpos_c,
    stride_kpos_b, stride_kpos_n, stride_kpos_c,
    num_heads, seq_q, seq_k, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, ROTATE_Q_IN_LOOP: tl.constexpr, UPCAST_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK and dV for one (BLOCK_N keys, head) tile; grid (cdiv(Nk, BLOCK_N), B * H).

    ``ROPE`` rotates the key tile and inverse-rotates dK; ``ROTATE_Q_IN_LOOP`` rotates each
    query tile (otherwise ``q_ptr`` holds rotated queries, or ``ROPE`` is off). Works on
    transposed score tiles (keys x queries) so the accumulators stay key-major. ``DOT_PRECISION``:
    the fp32 products' ``input_precision`` ("ieee" or "tf32").
    """
    block_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seq_k
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    grad_out_base = grad_out_ptr + batch * stride_gob + head * stride_goh
    q_pos_base = q_pos_ptr + batch * stride_qpos_b
    k_pos_base = k_pos_ptr + batch * stride_kpos_b
    stats_base = batch_head.to(tl.int64) * seq_q
    qk_scale_log2 = scale * LOG2E

    # load + rotate the key tile once, load its value tile
    k_a, k_b = load_pair_halves(k_ptr + batch * stride_kb + head * stride_kh, stride_kn, stride_kd, offs_n, mask_n,
                                k_pos_base, stride_kpos_n, stride_kpos_c, freq_ptr, HEAD_DIM, ROPE, UPCAST_BF16)
    v = load_rows(v_ptr + batch * stride_vb + head * stride_vh, stride_vn, stride_vd, offs_n, mask_n, HEAD_DIM,
                  UPCAST_BF16)

    grad_k_a = tl.zeros((BLOCK_N, HEAD_DIM // 2), dtype=tl.float32)
    grad_k_b = tl.zeros((BLOCK_N, HEAD_DIM // 2), dtype=tl.float32)
    grad_v = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for start_m in range(0, seq_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seq_q
        # load + rotate a query tile; load its dO, log-sum-exp and delta
        q_a, q_b = load_pair_halves(q_base, stride_qn, stride_qd, offs_m, mask_m, q_pos_base, stride_qpos_n,
                                    stride_qpos_c, freq_ptr, HEAD_DIM, ROTATE_Q_IN_LOOP, UPCAST_BF16)
        grad_out = load_rows(grad_out_base, stride_gon, stride_god, offs_m, mask_m, HEAD_DIM, UPCAST_BF16)
        lse_log2 = tl.load(lse_ptr + stats_base + offs_m, mask=mask_m, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + stats_base + offs_m, mask=mask_m, other=0.0)
        # recompute P^T from the log-sum-exp; queries past the end get 0
        scores_t = pair_scores(k_a, k_b, q_a, q_b, DOT_PRECISION)
        probs_t = tl.exp2(scores_t * qk_scale_log2 - lse_log2[None, :])
        probs_t = tl.where(mask_m[None, :], probs_t, 0.0)
        # dV += P^T dO
        probs_t_operand = round_to(probs_t, grad_out_ptr.dtype.element_ty, UPCAST_BF16)
        grad_v = tl.dot(probs_t_operand, grad_out, grad_v, input_precision=DOT_PRECISION)
        # dS^T = P^T * (v dO^T - delta); dk' += dS^T q'
        grad_probs_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
        grad_scores_t = round_to(probs_t * (grad_probs_t - delta[None, :]), q_ptr.dtype.element_ty, UPCAST_BF16)
        grad_k_a = tl.dot(grad_scores_t, q_a, grad_k_a, input_precision=DOT_PRECISION)
        grad_k_b = tl.dot(grad_scores_t, q_b, grad_k_b, input_precision=DOT_PRECISION)

    # scale, inverse-rotate, store dK; store dV
    unrotate_and_store(grad_k_ptr + batch * stride_gkb + head * stride_gkh, stride_gkn, stride_gkd, offs_n, mask_n,
                       grad_k_a * scale, grad_k_b * scale, k_pos_base, stride_kpos_n, stride_kpos_c, freq_ptr,
                       HEAD_DIM, ROPE, UPCAST_BF16)
    grad_v = round_to(grad_v, grad_v_ptr.dtype.element_ty, UPCAST_BF16).to(grad_v_ptr.dtype.element_ty)
    tl.store(grad_v_ptr + batch * stride_gvb + head * stride_gvh + offs_n[:, None] * stride_gvn
             + offs_d[None, :] * stride_gvd, grad_v, mask=mask_n[:, None])
