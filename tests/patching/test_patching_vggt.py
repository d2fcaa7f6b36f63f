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
    untouched = [model.patch_blocks[0], model.patch_blocks[0].attn, model.camera_block, model.camera_block.attn]
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
    assert [patched.patch_blocks[0], patched.patch_blocks[0].attn, patched.camera_block,
            patched.camera_block.attn] == untouched  # the same objects
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
