"""Forward-mode AD (dual tensors): the Triton custom ops have no forward-AD formula and would drop the
tangents silently, so calls whose inputs carry tangents run on the torch path with one warning."""
import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import fastpatch
from fastpatch.ops.forward_ad import carries_tangents
from fastpatch.testing import TOLERANCES, relative_error


def test_carries_tangents_only_inside_a_dual_level_with_a_tangent():
    plain = torch.ones(2)
    assert not carries_tangents(plain, None)
    with forward_ad.dual_level():
        assert not carries_tangents(plain, None)
        assert carries_tangents(plain, forward_ad.make_dual(plain, torch.ones(2)))


def test_patch_embed_tangent_matches_the_torch_path(device):
    """The jvp of the (linear) patch embedding: on the Triton backend it warns and gives the torch path's
    tangent (before, the custom op returned tokens without a tangent)."""
    torch.manual_seed(0)
    img, direction = torch.randn(2, 3, 32, 48, device=device), torch.randn(2, 3, 32, 48, device=device)
    weight, bias = torch.randn(64, 3, 16, 16, device=device), torch.randn(64, device=device)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(img, direction)
        with pytest.warns(RuntimeWarning, match="no forward-mode AD formula"):
            tokens, _ = fastpatch.patch_embed(dual, weight, bias, 16)
        tangent = forward_ad.unpack_dual(tokens).tangent
    assert tangent is not None
    expected, _ = fastpatch.patch_embed(direction.double(), weight.double(), torch.zeros_like(bias).double(), 16)
    assert relative_error(tangent, expected) <= TOLERANCES[torch.float32].forward


def test_attention_with_tangents_is_refused_loudly(device):
    """The torch path's RoPE function has no jvp either: the call raises instead of dropping the tangent."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 64, device=device) for _ in range(3))
    pos = torch.zeros(1, 32, 2, dtype=torch.int64, device=device)
    with forward_ad.dual_level():
        dual_q = forward_ad.make_dual(q, torch.ones_like(q))
        with pytest.warns(RuntimeWarning, match="no forward-mode AD formula"), pytest.raises(NotImplementedError):
            fastpatch.rope_attention(dual_q, k, v, pos)
