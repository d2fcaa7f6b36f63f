"""2-D rotary position embedding (RoPE2D, spec section 3) as in-register Triton helpers, plus a
standalone kernel that writes a rotated copy of a (B, H, N, Dh) tensor.

Channel layout of one head (Q = Dh / 4): ``[Y_a | Y_b | X_a | X_b]``. Channel ``j`` of ``Y_a`` is
paired with channel ``j`` of ``Y_b`` and rotated by ``y * freq[j]``; likewise ``X_a``/``X_b`` with
``x * freq[j]``, where ``freq[j] = F0 * base**(-j / Q)`` comes from the host as an fp32 table.

The helpers never shuffle channels in registers: a (BLOCK, Dh) tile is loaded as its two *pair
halves* ``a = [Y_a | X_a]`` and ``b = [Y_b | X_b]``, each (BLOCK, Dh/2). Rotation is then purely
element-wise (``a' = a cos - b sin``, ``b' = b cos + a sin``), and an attention score splits as
``q . k = q_a . k_a + q_b . k_b``. Passing ``-sin`` (or a negated frequency table) gives the
inverse rotation used by the backward pass.
"""
import triton
import triton.language as tl


@triton.jit
def pair_columns(HEAD_DIM: tl.constexpr):
    """Channel indices (Dh/2,) of the ``a`` members ``[Y_a | X_a]`` and ``b`` members ``[Y_b | X_b]``."""
    HALF: tl.constexpr = HEAD_DIM // 2
    QUARTER: tl.constexpr = HEAD_DIM // 4
    m = tl.arange(0, HALF)
    cols_a = (m // QUARTER) * HALF + m % QUARTER
    return cols_a, cols_a + QUARTER


@triton.jit
def cos_sin(angle):
    """fp32 (cos, sin) of ``angle`` to ~1 ulp for |angle| < 8192, in a few dozen flops.

    Avoids libdevice's cosf/sinf (general range reduction: several times the instructions and
    compile time). Cody-Waite reduction by pi/2 in three parts (the first exact for quadrants
    < 2**16), then minimax polynomials on [-pi/4, pi/4] and a quadrant select.
    """
    quadrant = tl.floor(angle * 0.6366197723675814 + 0.5)
    r = angle - quadrant * 1.5703125
    r = r - quadrant * 4.837512969970703125e-4
    r = r - quadrant * 7.54978995489188216e-8
    r2 = r * r
    sin_r = ((-1.9515295891e-4 * r2 + 8.3321608736e-3) * r2 - 1.6666654611e-1) * r2 * r + r
    cos_r = ((2.443315711809948e-5 * r2 - 1.388731625493765e-3) * r2 + 4.166664568298827e-2) * r2 * r2 \
        - 0.5 * r2 + 1.0
    q = quadrant.to(tl.int32)
    odd = (q & 1) != 0
    cos = tl.where(odd, sin_r, cos_r)
    sin = tl.where(odd, cos_r, sin_r)
    cos = tl.where(((q + 1) & 2) != 0, -cos, cos)
    sin = tl.where((q & 2) != 0, -sin, sin)
    return cos, sin


@triton.jit
def rope_cos_sin(pos_ptr, stride_pos_n, stride_pos_c, offs_n, mask_n, freq_ptr, HEAD_DIM: tl.constexpr):
    """fp32 cos and sin (BLOCK, Dh/2) of the angles of rows ``offs_n``, in pair-half column order.

    ``pos_ptr`` points at one batch element's int64 (N, 2) positions (y, x); column ``m`` of the
    result is rotated by ``y`` when ``m < Dh/4`` and by ``x`` otherwise, at frequency
    ``freq[m % (Dh/4)]``.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    QUARTER: tl.constexpr = HEAD_DIM // 4
    m = tl.arange(0, HALF)
    row = tl.load(pos_ptr + offs_n * stride_pos_n, mask=mask_n, other=0).to(tl.float32)
    col = tl.load(pos_ptr + offs_n * stride_pos_n + stride_pos_c, mask=mask_n, other=0).to(tl.float32)
    freq = tl.load(freq_ptr + m % QUARTER)
    coord = tl.where((m < QUARTER)[None, :], row[:, None], col[:, None])
    angle = coord * freq[None, :]
    return cos_sin(angle)


@triton.jit
def rotate_pairs(a, b, cos, sin):
    """Rotate each pair (a, b) by the angle whose cos/sin are given: returns fp32 (a', b')."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def round_to(x, dtype: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` (a tensor-core operand or a stored value), round-to-nearest-even.

    With ``UPCAST_BF16`` (interpreter, bf16) the rounded value comes back as fp32: the interpreter
    does bf16 arithmetic on raw bits and converts fp32 -> bf16 by truncation, so the rounding is
    done here on the fp32 bit pattern, reproducing the GPU's ``cvt.rn.bf16.f32``.
    """
    if UPCAST_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    else:
        x = x.to(dtype)
    return x


@triton.jit
def load_rows(ptr, stride_n, stride_d, offs_n, mask_n, HEAD_DIM: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """Load rows ``offs_n`` of one head's (N, Dh) tile (masked rows read as zeros), unrotated.

    ``UPCAST_BF16`` (interpreter only) returns fp32, as :func:`load_pair_halves` does.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    rows = tl.load(ptr + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask_n[:, None], other=0.0)
    if UPCAST_BF16:
        rows = rows.to(tl.float32)
    return rows


@triton.jit
def pair_scores(x_a, x_b, y_a, y_b, DOT_PRECISION: tl.constexpr):
    """fp32 ``x @ y^T`` for tiles given as pair halves: ``x_a y_a^T + x_b y_b^T``.

    ``DOT_PRECISION`` ("ieee" or "tf32") is ``tl.dot``'s ``input_precision`` for fp32 operands
    (ignored for fp16/bf16 ones).
    """
    scores = tl.dot(x_a, tl.trans(y_a), input_precision=DOT_PRECISION)
    return tl.dot(x_b, tl.trans(y_b), scores, input_precision=DOT_PRECISION)


@triton.jit
def load_pair_halves(ptr, stride_n, stride_d, offs_n, mask_n, pos_ptr, stride_pos_n, stride_pos_c, freq_ptr,
                     HEAD_DIM: tl.constexpr, ROTATE: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """Load rows ``offs_n`` of one head's (N, Dh) tile as pair halves ``a``, ``b`` (BLOCK, Dh/2).

    Masked rows read as zeros. With ``ROTATE`` the halves come back rotated by the rows'
    positions (computed in fp32, rounded to the storage dtype). ``UPCAST_BF16`` (interpreter only)
    returns fp32, because the Triton interpreter computes bf16 arithmetic on raw bits.
    """
    cols_a, cols_b = pair_columns(HEAD_DIM)
    row_ptrs = ptr + offs_n[:, None] * stride_n
    a = tl.load(row_ptrs + cols_a[None, :] * stride_d, mask=mask_n[:, None], other=0.0)
    b = tl.load(row_ptrs + cols_b[None, :] * stride_d, mask=mask_n[:, None], other=0.0)
    if UPCAST_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ROTATE:
        cos, sin = rope_cos_sin(pos_ptr, stride_pos_n, stride_pos_c, offs_n, mask_n, freq_ptr, HEAD_DIM)
        a, b = rotate_pairs(a, b, cos, sin)
        a = round_to(a, ptr.dtype.element_ty, UPCAST_BF16)
        b = round_to(b, ptr.dtype.element_ty, UPCAST_BF16)
    return a, b


@triton.jit
def store_pair_halves(ptr, stride_n, stride_d, offs_n, mask_n, a, b, HEAD_DIM: tl.constexpr,
                      UPCAST_BF16: tl.constexpr):
    """Store pair halves ``a``, ``b`` (BLOCK, Dh/2) into rows ``offs_n`` of an (N, Dh) tile, cast to ``ptr``'s dtype."""
    cols_a, cols_b = pair_columns(HEAD_DIM)
    row_ptrs = ptr + offs_n[:, None] * stride_n
    out_dtype = ptr.dtype.element_ty
    a = round_to(a, out_dtype, UPCAST_BF16).to(out_dtype)
    b = round_to(b, out_dtype, UPCAST_BF16).to(out_dtype)
    tl.store(row_ptrs + cols_a[None, :] * stride_d, a, mask=mask_n[:, None])
    tl.store(row_ptrs + cols_b[None, :] * stride_d, b, mask=mask_n[:, None])


@triton.jit
def rope_rotate_kernel(
    x_ptr, pos_ptr, freq_ptr, out_ptr,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_pos_b, stride_pos_n, stride_pos_c,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_BF16: tl.constexpr,
):
    """out[b, h, n] = RoPE2D(x[b, h, n], pos[b, n]) for one (BLOCK_N rows, head) tile per program.

    Grid: (cdiv(N, BLOCK_N), B * H). A negated frequency table gives the inverse rotation.
    """
    block_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seq_len
    # load + rotate
    a, b = load_pair_halves(x_ptr + batch * stride_xb + head * stride_xh, stride_xn, stride_xd, offs_n, mask_n,
                            pos_ptr + batch * stride_pos_b, stride_pos_n, stride_pos_c, freq_ptr,
                            HEAD_DIM, True, UPCAST_BF16)
    # store
    store_pair_halves(out_ptr + batch * stride_ob + head * stride_oh, stride_on, stride_od, offs_n, mask_n, a, b,
                      HEAD_DIM, UPCAST_BF16)
