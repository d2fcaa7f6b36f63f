"""patch_model / unpatch_model on fastpatch's own reference backbone (no upstream code needed)."""
import pytest
import torch

import fastpatch
from fastpatch import backend, reference
from fastpatch.testing import relative_error

SMALL = dict(img_size=(32, 48), patch_size=16, enc_embed_dim=64, enc_depth=2, enc_num_heads=2, dec_embed_dim=64,
             dec_depth=2, dec_num_heads=2)


def _backbone():
    return reference.Dust3RBackbone(**SMALL).eval()


def test_backend_argument_pins_the_backend_inside_replaced_modules():
    model = fastpatch.patch_model(_backbone(), backend="torch")
    seen = []
    model.enc_blocks[0].norm1.register_forward_hook(lambda *_: seen.append(backend.requested_backend()))
    assert backend.requested_backend() == "auto"
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 48), torch.randn(1, 3, 32, 48))
    assert seen == ["torch"]
    assert backend.requested_backend() == "auto"


def test_backend_pin_keeps_the_fused_block_forward():
    """Each replaced module carries the pin's hooks; a block's fused forward bypasses its children's pins
    only when they pin the backend in force (the block's own pin): then bypassing them changes nothing."""
    model = fastpatch.patch_model(_backbone(), backend="torch")
    block = model.enc_blocks[0]
    with fastpatch.use_backend("torch"):
        assert block.fusable()
    with fastpatch.use_backend("triton"):
        assert not block.fusable()


def test_backend_scope_is_restored_when_forward_raises():
    block = fastpatch.patch_model(reference.Block(64, 2, rope=reference.RoPE2D()), backend="torch")
    with pytest.raises(ValueError):
        block(torch.randn(1, 4, 64), torch.zeros(1, 5, 2, dtype=torch.int64))  # 5 positions for 4 tokens
    assert backend.requested_backend() == "auto"


def test_invalid_backend_raises():
    with pytest.raises(ValueError, match="backend='cuda'"):
        fastpatch.patch_model(_backbone(), backend="cuda")


def test_root_module_is_replaced_and_restored():
    block = reference.Block(64, 2, rope=reference.RoPE2D())
    patched = fastpatch.patch_model(block)
    assert type(patched) is fastpatch.Block and patched.norm1 is block.norm1
    assert fastpatch.unpatch_model(patched) is block


def test_dtype_conversion_after_patching_carries_back_on_unpatch():
    model = _backbone()
    original_block = model.enc_blocks[0]
    fastpatch.patch_model(model)
    model.to(torch.float64)
    fastpatch.unpatch_model(model)
    assert model.enc_blocks[0] is original_block
    assert original_block.attn.qkv.weight.dtype == torch.float64


def test_report_lists_replacements_and_modules_left_alone():
    model = _backbone()
    model.extra = torch.nn.Module()
    model.extra.attn = type("Attention", (torch.nn.Module,), {})()  # a foreign class with the same name
    fastpatch.patch_model(model)
    report = model.fastpatch_report
    assert report.replaced["Block"] == ["enc_blocks.0", "enc_blocks.1"]
    assert [path for path, _ in report.left_alone] == ["extra.attn"]
    assert "forward" in report.left_alone[0][1]  # the foreign class has no forward of upstream's
    assert "2 Block" in str(report) and "left alone 1" in str(report)


def test_patched_backbone_matches_reference_in_float64_oracle():
    model = _backbone().double()
    img1, img2 = torch.randn(2, 3, 32, 48, dtype=torch.float64), torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = model(img1, img2)
        fastpatch.patch_model(model, backend="torch")
        actual = model(img1, img2)
    for a, e in zip(actual[0] + actual[1], expected[0] + expected[1]):
        assert relative_error(a, e) < 1e-12
