"""patch_model on VGGT / π3 stand-ins (tests/vggt_standins.py): qk-norm RoPE attention and their blocks
are verified by probe and replaced; DINOv2 / camera-head / π3-head modules (no qk-norm or no RoPE) are
left exactly as they are; a module computing something else is refused."""
import warnings

import pytest
import torch

import fastpatch
from fastpatch import reference_vggt as ref
from fastpatch.testing import TOLERANCES, relative_error

import vggt_standins as standins


def _randomise(model):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] in (64,) else 0.0))
    return model.eval()


def _run(model):
    frames, height, width = 2, 3, 4
    pos = ref.vggt_positions(frames, 1, height, width).reshape(frames, -1, 2)
    tokens = torch.randn(frames, pos.shape[1], 128, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), fastpatch.use_backend("torch"):
        return model(tokens, pos)


@pytest.mark.parametrize("block", [standins.Block, standins.BlockRope], ids=["vggt", "pi3"])
def test_qknorm_blocks_replaced_by_probe_others_untouched(block):
    rope = standins.RoPE2D(100.0) if block is standins.BlockRope else None
    model = _randomise(standins.TinyAggregator(block=block, rope=rope))
    expected = _run(model)
    untouched = [*model.patch_blocks.modules(), *model.camera_block.modules()]  # DINOv2 encoder, camera head
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left alone: no warning
        patched = fastpatch.patch_model(model)
    report = patched.fastpatch_report
    attention, block_role = ("FlashAttentionRope", "BlockRope") if block is standins.BlockRope else \
        ("VGGTAttention", "VGGTBlock")
    assert sorted(report.replaced[attention]) == ["frame_blocks.0.attn", "global_blocks.0.attn"]
    assert sorted(report.replaced[block_role]) == ["frame_blocks.0", "global_blocks.0"]
    assert all(report.accepted_by[p] == fastpatch.patching.PROBED for p in report.replaced[attention])
    assert isinstance(patched.frame_blocks[0].attn, getattr(fastpatch, attention))
    assert [*patched.patch_blocks.modules(), *patched.camera_block.modules()] == untouched  # the same objects
    assert all(type(m).__module__ == "vggt_standins" or type(m).__module__.startswith("torch.") for m in untouched)
    assert report.left_alone == []
    got = _run(patched)
    assert relative_error(got, expected) <= TOLERANCES[torch.float32].forward
    assert set(dict(patched.state_dict())) == set(dict(model.state_dict()))


def test_pi3_head_blocks_without_qk_norm_are_left_as_they_are():
    head = _randomise(standins.BlockRope(128, 2, qk_norm=False, rope=standins.RoPE2D(100.0)))
    patched = fastpatch.patch_model(head)
    assert patched is head and "BlockRope" not in patched.fastpatch_report.replaced
    assert patched.fastpatch_report.left_alone == []


def test_a_different_function_is_refused_by_probe():
    attn = standins.RopeBeforeNormAttention(128, 2, qk_norm=True, rope=standins.RotaryPositionEmbedding2D())
    with pytest.warns(UserWarning, match="left alone"):
        patched = fastpatch.patch_model(_randomise(attn))
    assert patched is attn
    (path, reason), = patched.fastpatch_report.left_alone
    assert "VGGTAttention" in reason and "probe" in reason


def test_the_warning_counts_qknorm_attention():
    """The warning's cost counts VGGT's attention: one of two refused is "1 of 2", not "little speed lost"."""
    model = torch.nn.Sequential(
        standins.Attention(128, 2, qk_norm=True, rope=standins.RotaryPositionEmbedding2D()),
        standins.RopeBeforeNormAttention(128, 2, qk_norm=True, rope=standins.RotaryPositionEmbedding2D()))
    with pytest.warns(UserWarning, match="1 of 2 attention modules not accelerated"):
        fastpatch.patch_model(_randomise(model))


def test_another_rope_base_is_read_from_the_rope_module():
    attn = _randomise(standins.Attention(128, 2, qk_norm=True, rope=standins.RotaryPositionEmbedding2D(10.0)))
    x = torch.randn(2, 17, 128)
    pos = ref.vggt_positions(2, 1, 3, 4)
    with torch.no_grad():
        expected = attn(x, pos)
        patched = fastpatch.patch_model(attn)
        assert isinstance(patched, fastpatch.VGGTAttention)
        with fastpatch.use_backend("torch"):
            assert relative_error(patched(x, pos), expected) <= TOLERANCES[torch.float32].forward


def test_stochastic_depth_switched_on_after_patching_raises():
    """Blocks read ``sample_drop_ratio`` (DINOv2's stochastic depth): fastpatch's block follows a change
    made after patching by refusing it in training, never by computing another function."""
    model = _randomise(standins.TinyAggregator())
    patched = fastpatch.patch_model(model)
    block = patched.frame_blocks[0]
    assert isinstance(block, fastpatch.VGGTBlock)
    block.sample_drop_ratio = 0.2
    _run(patched)  # eval: stochastic depth is off
    patched.train()
    with pytest.raises(NotImplementedError, match="sample_drop_ratio=0.2"):
        _run(patched)


@pytest.fixture
def known_dinov2_children(monkeypatch):
    """The stand-ins' DINOv2-layout Mlp and LayerScale forwards registered as known code for one test (the
    real ones are listed by fingerprint: the stand-ins are not their code)."""
    from fastpatch.modules import plain_children
    from fastpatch.patching import fingerprint

    monkeypatch.setitem(plain_children.KNOWN_MLP_FORWARDS, fingerprint(standins.DinoMlp.forward),
                        ("test stand-in", plain_children._DINOV2_MLP_CHILDREN))
    monkeypatch.setitem(plain_children.KNOWN_LAYER_SCALE_FORWARDS, fingerprint(standins.LayerScale.forward),
                        "test stand-in")
    monkeypatch.setattr(plain_children, "_MLP_CHILDREN", {})
    monkeypatch.setattr(plain_children, "_LAYER_SCALE_CLASSES", {})


def _dinov2_block():
    block = standins.Block(128, 2, qk_norm=True, rope=standins.RotaryPositionEmbedding2D(100.0),
                           mlp_class=standins.DinoMlp)
    _randomise(torch.nn.Sequential(block))
    frames, height, width = 2, 3, 4
    pos = ref.vggt_positions(frames, 1, height, width).reshape(frames, -1, 2)
    tokens = torch.randn(frames, pos.shape[1], 128, generator=torch.Generator().manual_seed(6))
    return block, tokens, pos


def test_dinov2_mlp_and_layer_scale_of_known_code_run_fused(known_dinov2_children):
    """A block whose Mlp has DINOv2's layout (fc1, act, fc2, drop) and whose LayerScale is known code runs the
    fused forward (oneDNN GEMMs, LayerScale in one addcmul) and matches the unpatched block."""
    block, tokens, pos = _dinov2_block()
    with torch.no_grad():
        expected = block(tokens, pos)
        patched = fastpatch.patch_model(block)
        assert isinstance(patched, fastpatch.VGGTBlock) and patched.fusable()
        got = patched(tokens, pos)
    assert relative_error(got, expected) <= TOLERANCES[torch.float32].forward
    patched.mlp.drop.p = 0.1
    patched.train()
    assert not patched.fusable()  # an active dropout: the children run as modules


def test_backend_pin_keeps_blocks_fused(known_dinov2_children):
    """patch_model(backend=...) pins each replaced module with hooks; a block's fused forward may bypass its
    children's pins when they pin the backend already in force (its own), and only then."""
    block, tokens, pos = _dinov2_block()
    with torch.no_grad():
        expected = block(tokens, pos)
    patched = fastpatch.patch_model(block, backend="torch")
    with fastpatch.use_backend("torch"):
        assert patched.fusable()
    assert not patched.fusable()  # "auto" in force: bypassing the child's pin would change its backend
    handle = patched.attn.register_forward_pre_hook(lambda module, args: None)  # any other hook
    with fastpatch.use_backend("torch"):
        assert not patched.fusable()
    handle.remove()
    with torch.no_grad():
        assert relative_error(patched(tokens, pos), expected) <= TOLERANCES[torch.float32].forward
