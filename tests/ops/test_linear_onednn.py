"""The oneDNN linear (fastpatch.ops.linear_onednn) and the blocks' fused forward that uses it.

The op must equal ``act(F.linear(x, w, b)) + residual`` to float32 round-off (checked against float64),
run oneDNN only for CPU float32 calls nothing records, and stay differentiable (the plain path).
The blocks must fuse only when every child is exactly what the fused forward assumes, and call
their children as modules otherwise.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpatch
from fastpatch import reference
from fastpatch import reference_vggt
from fastpatch.modules import plain_children
from fastpatch.ops import linear_onednn
from fastpatch.ops.linear_onednn import linear, onednn_usable
from fastpatch.testing import relative_error

needs_onednn = pytest.mark.skipif(not linear_onednn._ONEDNN_BUILT, reason="torch built without oneDNN (mkldnn)")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Records each oneDNN call's activation and whether a residual was passed (the real op still runs)."""
    calls = []
    real = linear_onednn._onednn_linear

    def spy(x, weight, bias, activation, residual):
        calls.append((activation, residual is not None))
        return real(x, weight, bias, activation, residual)

    monkeypatch.setattr(linear_onednn, "_onednn_linear", spy)
    return calls


def _expected(x, weight, bias, activation, residual):
    out = F.linear(x, weight, bias)
    out = F.gelu(out) if activation == "gelu" else out
    return out if residual is None else residual + out


def _operands(shape, n_in, n_out, bias=True, residual=False, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(*shape, n_in, dtype=dtype)
    weight = torch.randn(n_out, n_in, dtype=dtype) / n_in ** 0.5
    b = torch.randn(n_out, dtype=dtype) if bias else None
    r = torch.randn(*shape, n_out, dtype=dtype) if residual else None
    return x, weight, b, r


@needs_onednn
@pytest.mark.parametrize("shape,n_in,n_out", [((2, 37), 96, 160), ((75,), 64, 33), ((1, 3, 5), 17, 8)])
@pytest.mark.parametrize("activation,residual", [(None, False), ("gelu", False), (None, True), ("gelu", True)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_matches_float64_to_fp32_round_off(onednn_calls, shape, n_in, n_out, activation, residual, bias):
    x, weight, b, r = _operands(shape, n_in, n_out, bias, residual)
    with torch.no_grad():
        out = linear(x, weight, b, activation=activation, residual=r)
        plain = _expected(x, weight, b, activation, r)
    assert onednn_calls == [(activation, residual)]
    assert out.shape == plain.shape and out.dtype == torch.float32 and out.is_contiguous()
    oracle = _expected(*(t if t is None else t.double() for t in (x, weight, b)), activation,
                       None if r is None else r.double())
    # the plain float32 path's own distance to float64 sets the scale of the round-off
    assert relative_error(out.double(), oracle) <= max(4 * relative_error(plain.double(), oracle), 1e-6)


@needs_onednn
def test_onednn_reads_strided_inputs(onednn_calls):
    x, weight, b, _ = _operands((4, 9), 128, 48)
    strided = torch.randn(4, 9, 256)[..., ::2].copy_(x)
    with torch.inference_mode():
        out = linear(strided, weight, b, activation="gelu")
    assert onednn_calls == [("gelu", False)]
    torch.testing.assert_close(out, _expected(x, weight, b, "gelu", None), rtol=1e-5, atol=1e-5)


def test_other_calls_run_the_plain_torch_ops(onednn_calls):
    x, weight, b, r = _operands((3, 5), 16, 8, residual=True)
    with torch.no_grad():
        for args in ((x.double(), weight.double(), b.double()), (x[0, 0], weight, b), (x[:0], weight, b),
                     (x, weight.t().contiguous().t(), b)):
            torch.testing.assert_close(linear(*args, activation="gelu"), _expected(*args, "gelu", None),
                                       rtol=0, atol=0)
        # a residual the fused add cannot take (broadcast) is added by the plain op
        assert not onednn_usable(x, weight, b, r[:1])
        torch.testing.assert_close(linear(x, weight, b, residual=r[:1]), _expected(x, weight, b, None, r[:1]))
        enabled = torch.backends.mkldnn.enabled
        try:
            torch.backends.mkldnn.enabled = False
            assert not onednn_usable(x, weight, b)
        finally:
            torch.backends.mkldnn.enabled = enabled
    assert onednn_calls == []
    with pytest.raises(ValueError, match="activation"):
        linear(x, weight, b, activation="relu")


def test_cpu_autocast_runs_the_plain_path(onednn_calls):
    """Under CPU autocast nn.Linear computes (and returns) the autocast dtype: so does linear()."""
    x, weight, b, r = _operands((3, 5), 32, 16, residual=True)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_usable(x, weight, b)
        for activation, residual in ((None, None), ("gelu", None), (None, r)):
            out = linear(x, weight, b, activation=activation, residual=residual)
            expected = _expected(x, weight, b, activation, residual)
            assert out.dtype == expected.dtype == (torch.float32 if residual is not None else torch.bfloat16)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert onednn_calls == []


def test_autograd_runs_the_plain_path_with_upstreams_gradients(onednn_calls):
    x, weight, b, r = _operands((2, 7), 24, 40, residual=True, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, weight, b, r)]
    out = linear(x, weight, b, activation="gelu") + linear(x, weight, b, residual=r)
    expected = _expected(x, weight, b, "gelu", None) + _expected(x, weight, b, None, r)
    grad = torch.randn_like(out)
    assert onednn_calls == []
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda *t: linear(t[0], t[1], t[2], activation="gelu", residual=t[3]), leaves)


# ---------------------------------------------------------------------------------------------
# Blocks


def _blocks(dim=128, heads=2):
    torch.manual_seed(0)
    rope = reference.RoPE2D(100.0)
    ref = (reference.Block(dim, heads, qkv_bias=True, rope=rope).eval(),
           reference.DecoderBlock(dim, heads, qkv_bias=True, rope=rope).eval())
    return ref, tuple(fastpatch.patch_model(copy.deepcopy(m)) for m in ref)


def _inputs(dim=128, tokens=24, batch=2, dtype=torch.float32):
    torch.manual_seed(1)
    index = torch.arange(tokens)
    pos = torch.stack((index // 6, index % 6), dim=-1).expand(batch, tokens, 2)
    return torch.randn(batch, tokens, dim, dtype=dtype), torch.randn(batch, tokens - 4, dim, dtype=dtype), pos


def _run(block, x, y, pos):
    if isinstance(block, (reference.DecoderBlock,)):
        return block(x, y, pos, pos[:, :y.shape[1]])[0]
    return block(x, pos)


@needs_onednn
def test_fused_blocks_match_upstreams_order_of_ops(onednn_calls):
    refs, patched = _blocks()
    x, y, pos = _inputs()
    for ref, block in zip(refs, patched):
        assert block.fusable()
        onednn_calls.clear()
        with torch.inference_mode():
            out, expected = _run(block, x, y, pos), _run(ref, x, y, pos)
        fused = [call for call in onednn_calls if call != (None, False)]
        residual_projections = [(None, True)] * (1 if isinstance(block, fastpatch.Block) else 2)
        assert fused == residual_projections + [("gelu", False), (None, True)]
        oracle = _run(copy.deepcopy(ref).double(), x.double(), y.double(), pos)
        assert relative_error(out.double(), oracle) <= max(4 * relative_error(expected.double(), oracle), 1e-6)


def test_fused_blocks_train_like_upstream(onednn_calls):
    refs, patched = _blocks()
    x, y, pos = _inputs(dtype=torch.float64)
    for ref, block in zip(refs, patched):
        _assert_trains_like(block, ref, lambda module: _run(module, x, y, pos))
    assert onednn_calls == []


def _assert_trains_like(block, ref, call):
    """``call(block)`` equals ``call(ref)`` in float64 training mode, outputs and parameter gradients."""
    ref, block = ref.double().train(), block.double().train()
    with fastpatch.use_backend("torch"):  # float64: no Triton kernel
        out, expected = call(block), call(ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, list(block.parameters()), grad)
    want = torch.autograd.grad(expected, list(ref.parameters()), grad)
    torch.testing.assert_close(out, expected)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _tanh_gelu(block):
    block.mlp.act = nn.GELU(approximate="tanh")


def _hooked_fc1(block):
    block.mlp.fc1.register_forward_hook(lambda module, args, out: out * 2)


def _active_dropout(block):
    block.mlp.drop1 = nn.Dropout(0.5)
    block.train()


def _drop_path(block):
    block.drop_path = reference.DropPath(0.5)


def _mlp_subclass(block):
    class ScaledMlp(reference.Mlp):
        def forward(self, x):
            return 0.5 * super().forward(x)

    mlp = ScaledMlp(128, 512)
    mlp.load_state_dict(block.mlp.state_dict())
    block.mlp = mlp


def _linear_subclass(block):
    class Lin(nn.Linear):
        pass

    proj = Lin(128, 128)
    proj.load_state_dict(block.attn.proj.state_dict())
    block.attn.proj = proj


def _global_hook(block):
    return nn.modules.module.register_module_forward_hook(lambda module, args, out: None)


@pytest.mark.parametrize("change", [_tanh_gelu, _hooked_fc1, _active_dropout, _drop_path, _mlp_subclass,
                                    _linear_subclass, _global_hook])
def test_blocks_call_their_children_when_they_differ(onednn_calls, change):
    refs, patched = _blocks()
    x, y, pos = _inputs()
    for ref, block in zip(refs, patched):
        handles = [change(block), change(ref)]
        try:
            assert not block.fusable()
            torch.manual_seed(2)
            with torch.no_grad():
                out = _run(block, x, y, pos)
            torch.manual_seed(2)
            with torch.no_grad():
                expected = _run(ref, x, y, pos)
        finally:
            for handle in handles:
                if handle is not None:
                    handle.remove()
        if change is not _active_dropout:  # dropout masks differ between the two runs' op orders
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert all(call == (None, False) for call in onednn_calls)  # only plain projections, nothing fused


def test_upstream_mlp_is_recognised(upstream):
    torch.manual_seed(0)
    block = upstream.blocks.Block(128, 2, qkv_bias=True, rope=upstream.rope.RoPE2D(100.0)).eval()
    patched = fastpatch.patch_model(copy.deepcopy(block))
    assert type(patched.mlp) is upstream.blocks.Mlp and plain_children.plain_mlp(patched.mlp)
    assert patched.fusable()
    x, _, pos = _inputs()
    with torch.inference_mode():
        torch.testing.assert_close(patched(x, pos), block(x, pos), rtol=1e-5, atol=1e-5)


def test_fused_blocks_compile_without_graph_breaks():
    _, (block, decoder) = _blocks()
    x, y, pos = _inputs()
    for module, args in ((block, (x, pos)), (decoder, (x, y, pos, pos[:, :y.shape[1]]))):
        explanation = torch._dynamo.explain(module)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# VGGT / pi3 LayerScale blocks (fastpatch.VGGTBlock, fastpatch.BlockRope)

VGGT_BLOCKS = [(reference_vggt.VGGTBlock, fastpatch.VGGTBlock), (reference_vggt.Pi3Block, fastpatch.BlockRope)]


def _vggt_pair(eager_cls, fast_cls, init_values, dim=128, heads=2):
    torch.manual_seed(0)
    eager = eager_cls(dim, heads, qk_norm=True, init_values=init_values,
                      rope=reference_vggt.RotaryPositionEmbedding2D()).eval()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fast = fast_cls(dim, heads, qk_norm=True, init_values=init_values,
                    rope=reference_vggt.RotaryPositionEmbedding2D()).eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def _vggt_inputs(dim=128, dtype=torch.float32):
    torch.manual_seed(1)
    frames, height, width, special = 2, 3, 4, 5
    pos = reference_vggt.vggt_positions(2, frames, height, width, special, "cpu")
    return torch.randn(2, frames * (special + height * width), dim, dtype=dtype), pos


@needs_onednn
@pytest.mark.parametrize("init_values", [0.01, None])
@pytest.mark.parametrize("eager_cls, fast_cls", VGGT_BLOCKS)
def test_vggt_blocks_fuse_their_gemms(onednn_calls, eager_cls, fast_cls, init_values):
    """qkv, proj, fc1 + GELU, fc2 on oneDNN; the residual in the GEMM without LayerScale, else one addcmul."""
    eager, fast = _vggt_pair(eager_cls, fast_cls, init_values)
    x, pos = _vggt_inputs()
    assert fast.fusable()
    with torch.inference_mode():
        out, expected = fast(x, pos), eager(x, pos)
    residual = init_values is None
    assert onednn_calls == [(None, False), (None, residual), ("gelu", False), (None, residual)]
    oracle = copy.deepcopy(eager).double()(x.double(), pos)
    assert relative_error(out.double(), oracle) <= max(4 * relative_error(expected.double(), oracle), 1e-6)


@pytest.mark.parametrize("eager_cls, fast_cls", VGGT_BLOCKS)
def test_vggt_blocks_train_like_the_eager_ones(onednn_calls, eager_cls, fast_cls):
    eager, fast = _vggt_pair(eager_cls, fast_cls, 0.01)
    x, pos = _vggt_inputs(dtype=torch.float64)
    _assert_trains_like(fast, eager, lambda module: module(x, pos))
    assert onednn_calls == []


def _in_place_layer_scale(block):
    block.ls1.inplace = True


def _layer_scale_subclass(block):
    class Doubled(reference_vggt.LayerScale):
        def forward(self, x):
            return 2 * super().forward(x)

    scale = Doubled(128)
    scale.load_state_dict(block.ls2.state_dict())
    block.ls2 = scale


def _vggt_drop_path(block):
    block.drop_path1 = reference.DropPath(0.5)


@pytest.mark.parametrize("change", [_in_place_layer_scale, _layer_scale_subclass, _vggt_drop_path, _hooked_fc1,
                                    _tanh_gelu])
@pytest.mark.parametrize("eager_cls, fast_cls", VGGT_BLOCKS)
def test_vggt_blocks_call_their_children_when_they_differ(onednn_calls, eager_cls, fast_cls, change):
    eager, fast = _vggt_pair(eager_cls, fast_cls, 0.01)
    change(eager), change(fast)
    x, pos = _vggt_inputs()
    assert not fast.fusable()
    with torch.no_grad():
        out, expected = fast(x.clone(), pos), eager(x.clone(), pos)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert ("gelu", False) not in onednn_calls


@pytest.mark.parametrize("eager_cls, fast_cls", VGGT_BLOCKS)
def test_vggt_blocks_call_a_hooked_qkv(onednn_calls, eager_cls, fast_cls):
    """The fused forward still calls a qkv projection that is not a plain nn.Linear, so its hook runs."""
    eager, fast = _vggt_pair(eager_cls, fast_cls, 0.01)
    for block in (eager, fast):
        block.attn.qkv.register_forward_hook(lambda module, args, out: out * 0.5)
    x, pos = _vggt_inputs()
    with torch.no_grad():
        out, expected, unhooked = fast(x, pos), eager(x, pos), _vggt_pair(eager_cls, fast_cls, 0.01)[0](x, pos)
    assert fast.fusable() and ("gelu", False) in onednn_calls
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, unhooked, rtol=1e-3, atol=1e-3)
