"""MASt3R through the pair engine: descriptor heads in fastpatch.inference, and symmetric_inference.

There is no mast3r package here: the model is a MASt3R-shaped subclass of upstream's DUSt3R model
whose ``_downstream_head`` adds the descriptor outputs ``desc`` and ``desc_conf``, as
``AsymmetricMASt3R``'s heads do. ``symmetric_inference`` is checked against the contract of mast3r's
``sparse_ga.symmetric_inference``, computed below from the model's own methods one image and one
direction at a time: (res11, res21, res22, res12).
"""
import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastpatch
from fastpatch.engine import mast3r as engine_mast3r
from fastpatch.testing import relative_error
from test_inference import (FP32, LANDSCAPE, PORTRAIT, SMALL, _count, _images, assert_same_result,  # noqa: F401
                            one_thread)
from upstream import perturb_

DESC_DIM = 8
SQUARE = (64, 64)


def _mast3r_model(upstream, **cfg):
    class MASt3RShaped(upstream.model.AsymmetricCroCo3DStereo):
        """Upstream's model plus a pixel-shuffled descriptor head per side (desc normalised, desc_conf > 1)."""

        def __init__(self, **kw):
            super().__init__(**kw)
            patch = self.patch_embed.patch_size[0]
            self.desc_heads = torch.nn.ModuleList(
                torch.nn.Linear(self.dec_embed_dim, (DESC_DIM + 1) * patch * patch) for _ in range(2))

        def _downstream_head(self, head_num, decout, img_shape):
            res = super()._downstream_head(head_num, decout, img_shape)
            tokens = decout[-1]
            height, width = res["conf"].shape[1:3]
            patch = self.patch_embed.patch_size[0]
            feat = self.desc_heads[head_num - 1](tokens).transpose(-1, -2)
            feat = F.pixel_shuffle(feat.reshape(len(tokens), -1, height // patch, width // patch), patch)
            feat = feat.permute(0, 2, 3, 1)
            res["desc"] = F.normalize(feat[..., :DESC_DIM], dim=-1)
            res["desc_conf"] = 1 + feat[..., DESC_DIM].exp()
            return res

    torch.manual_seed(0)
    model = MASt3RShaped(head_type="linear", output_mode="pts3d", landscape_only=False, **dict(SMALL, **cfg))
    return perturb_(model, scale=0.02).eval()


def _reference_symmetric(model, view1, view2):
    """mast3r's contract, one call per image and per direction."""
    shape1, shape2 = (torch.as_tensor(v["true_shape"]) for v in (view1, view2))
    f1, p1, _ = model._encode_image(view1["img"], shape1)
    f2, p2, _ = model._encode_image(view2["img"], shape2)
    dec1, dec2 = model._decoder(f1, p1, f2, p2)
    res11 = model._downstream_head(1, [t.float() for t in dec1], shape1)
    res21 = model._downstream_head(2, [t.float() for t in dec2], shape2)
    dec2, dec1 = model._decoder(f2, p2, f1, p1)
    res22 = model._downstream_head(1, [t.float() for t in dec2], shape2)
    res12 = model._downstream_head(2, [t.float() for t in dec1], shape1)
    return res11, res21, res22, res12


def _assert_same_heads(ours, ref):
    assert len(ours) == len(ref) == 4
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert list(o) == list(r) == ["pts3d", "conf", "desc", "desc_conf"], i
        for name in r:
            err = relative_error(o[name], r[name])
            assert err <= FP32, f"res[{i}][{name!r}]: relative error {err:.2e}"


@pytest.fixture(autouse=True)
def empty_cache():
    fastpatch.engine.clear_feature_cache()
    yield
    fastpatch.engine.clear_feature_cache()


@pytest.mark.parametrize("shapes", [[LANDSCAPE] * 3, [LANDSCAPE, PORTRAIT, LANDSCAPE]], ids=["same", "mixed"])
def test_mast3r_descriptor_heads_through_inference(upstream, shapes):
    model = _mast3r_model(upstream)
    pairs = upstream.image_pairs.make_pairs(_images(shapes), scene_graph="complete", symmetrize=True)
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=4, verbose=False)
    ours = fastpatch.inference(pairs, model, "cpu", batch_size=4, verbose=False)
    assert list(ours["pred1"]) == ["pts3d", "conf", "desc", "desc_conf"]
    assert list(ours["pred2"]) == ["conf", "desc", "desc_conf", "pts3d_in_other_view"]
    assert_same_result(ours, ref)


@pytest.mark.parametrize("shapes", [(LANDSCAPE, LANDSCAPE), (LANDSCAPE, PORTRAIT), (SQUARE, LANDSCAPE)],
                         ids=["same", "rotated", "different-tokens"])
def test_symmetric_inference_matches_the_contract(upstream, shapes):
    model = _mast3r_model(upstream)
    view1, view2 = _images(shapes)
    with torch.no_grad():
        ref = _reference_symmetric(model, view1, view2)
        decoded = _count(model, "_decoder")
        ours = fastpatch.symmetric_inference(model, view1, view2, "cpu")
    _assert_same_heads(ours, ref)
    tokens = [h * w // 256 for h, w in shapes]
    assert decoded == ([2] if tokens[0] == tokens[1] else [1, 1])  # both directions in one batch when they fit


def test_symmetric_inference_encodes_each_image_once_over_a_scene(upstream):
    model = _mast3r_model(upstream)
    images = _images([LANDSCAPE, PORTRAIT, LANDSCAPE, LANDSCAPE])
    pairs = upstream.image_pairs.make_pairs(images, scene_graph="complete", symmetrize=False)
    with torch.no_grad():
        refs = [_reference_symmetric(model, a, b) for a, b in pairs]
        encoded = _count(model, "_encode_image")
        for (a, b), ref in zip(pairs, refs):
            _assert_same_heads(fastpatch.symmetric_inference(model, a, b, "cpu"), ref)
    assert sum(encoded) == 4 and len(engine_mast3r.feature_cache()) == 4


def _encoded_by_symmetric(model, a, b, encoded):
    """Check symmetric_inference(a, b) against the contract; return the image rows it encoded."""
    ref = _reference_symmetric(model, a, b)
    before = sum(encoded)
    _assert_same_heads(fastpatch.symmetric_inference(model, a, b, "cpu"), ref)
    return sum(encoded) - before


def test_symmetric_inference_cache_identity(upstream):
    """Same label, different tensors: separate; in-place write: re-encoded; freed image: entry gone;
    weights changed: re-encoded."""
    model = _mast3r_model(upstream)
    a, b, c = _images([LANDSCAPE] * 3, instances=["same"] * 3)
    cache = engine_mast3r.feature_cache()
    with torch.no_grad():
        encoded = _count(model, "_encode_image")
        assert _encoded_by_symmetric(model, a, b, encoded) == 2
        assert _encoded_by_symmetric(model, a, c, encoded) == 1
        assert _encoded_by_symmetric(model, b, a, encoded) == 0

        b["img"].mul_(-1)  # in place: version bump
        assert _encoded_by_symmetric(model, a, b, encoded) == 1

        entries = len(cache)
        del c
        gc.collect()
        assert len(cache) == entries - 1

        model.enc_norm.weight.add_(0.5)
        assert _encoded_by_symmetric(model, a, b, encoded) == 2


def test_symmetric_inference_cache_is_bounded(upstream, monkeypatch):
    model = _mast3r_model(upstream)
    images = _images([LANDSCAPE] * 4)
    cache = engine_mast3r.feature_cache()
    one_image = 24 * 64 * 4 + 24 * 2 * 8
    monkeypatch.setattr(cache, "device_budget", one_image)
    monkeypatch.setattr(cache, "host_budget", 2 * one_image)
    with torch.no_grad():
        for a, b in zip(images, images[1:]):
            _assert_same_heads(fastpatch.symmetric_inference(model, a, b, "cpu"), _reference_symmetric(model, a, b))
            assert cache.device_bytes <= one_image and cache.host_bytes <= 2 * one_image
    assert cache.stats.spilled > 0 and cache.stats.dropped > 0 and len(cache) == 3


def test_symmetric_inference_with_gradients_caches_nothing(upstream):
    model = _mast3r_model(upstream)
    a, b = _images([LANDSCAPE] * 2)
    res = fastpatch.symmetric_inference(model, a, b, "cpu")
    assert res[0]["pts3d"].requires_grad and len(engine_mast3r.feature_cache()) == 0


def test_symmetric_inference_does_not_cache_inference_mode_images(upstream):
    """Inference tensors have no version counter, so an in-place write could not be detected."""
    model = _mast3r_model(upstream)
    with torch.inference_mode():
        a, b = _images([LANDSCAPE] * 2)
        ref = _reference_symmetric(model, a, b)
        _assert_same_heads(fastpatch.symmetric_inference(model, a, b, "cpu"), ref)
    assert len(engine_mast3r.feature_cache()) == 0


def test_symmetric_inference_bad_inputs(upstream):
    model = _mast3r_model(upstream)
    a, b = _images([LANDSCAPE] * 2)
    with pytest.raises(TypeError, match="_encode_image"):
        fastpatch.symmetric_inference(torch.nn.Linear(2, 2), a, b, "cpu")
    with pytest.raises(ValueError, match="rows"):
        fastpatch.symmetric_inference(model, a, dict(b, img=torch.randn(2, 3, 64, 96),
                                                     true_shape=np.int32([[64, 96]] * 2)), "cpu")
    with pytest.raises(TypeError, match=r"img2\['img'\]"):
        fastpatch.symmetric_inference(model, a, dict(b, img=b["img"].numpy()), "cpu")
