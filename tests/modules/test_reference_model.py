"""fastpatch.reference_model.Dust3RModel against upstream's AsymmetricCroCo3DStereo (mini-dust3r).

Upstream's weights (perturbed with noise) are loaded into ours; every method of dust3r's model
interface (``_encode_image``, ``_encode_symmetrized``, ``_decoder``, ``_downstream_head``, ``forward``)
must give upstream's outputs, with upstream's layouts, within the fp32 tolerance: same-size and
mixed-size pairs, a symmetrised batch (detected by 'instance' labels, as upstream does), ManyAR
batches with portrait samples, and both ``landscape_only`` settings. Tiny config (32x48 images,
patch 8, depth 2) on the CPU torch path.
"""
import math

import numpy as np
import pytest
import torch

import fastpatch
from fastpatch.reference_model import DUST3R_MODEL_CONFIGS, Dust3RModel, dust3r_model
from fastpatch.testing import TOLERANCES, relative_error
from upstream import perturb_

FP32 = TOLERANCES[torch.float32].forward
HEIGHT, WIDTH = 32, 48
TINY = dict(img_size=(HEIGHT, WIDTH), patch_size=8, enc_embed_dim=64, enc_depth=2, enc_num_heads=2,
            dec_embed_dim=32, dec_depth=2, dec_num_heads=2, pos_embed="RoPE100")


def _models(upstream, patch_embed_cls="PatchEmbedDust3R", landscape_only=True):
    torch.manual_seed(0)
    theirs = upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d",
                                                     patch_embed_cls=patch_embed_cls, landscape_only=landscape_only,
                                                     **TINY)
    theirs = perturb_(theirs, scale=0.05).eval()
    ours = Dust3RModel(patch_embed_cls=patch_embed_cls, landscape_only=landscape_only, **TINY).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _images(batch, height=HEIGHT, width=WIDTH, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).clamp_(-1, 1)


def _view(img, instances, true_shape=None):
    view = dict(img=img, instance=list(instances))
    if true_shape is not None:
        view["true_shape"] = torch.tensor(true_shape)
    return view


def _assert_close(actual, expected, what):
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{what}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            _assert_close(actual[key], expected[key], f"{what}[{key!r}]")
        return
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} entries != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_close(a, e, f"{what}[{i}]")
        return
    if expected is None:
        assert actual is None, what
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {tuple(actual.shape)} {actual.dtype} != {tuple(expected.shape)} {expected.dtype}"
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    assert torch.isfinite(expected).all(), what
    err = relative_error(actual, expected)
    assert err <= FP32, f"{what}: relative error {err:.2e} > {FP32:.0e}"


def _forward_and_interface(theirs, ours, view1, view2):
    """Every interface method of both models on the same batch, compared one by one."""
    with torch.no_grad():
        _assert_close(ours(view1, view2), theirs(view1, view2), "forward")
        shapes, feats, pos = ours._encode_symmetrized(view1, view2)
        _assert_close((shapes, feats, pos), theirs._encode_symmetrized(view1, view2), "_encode_symmetrized")
        expected_dec = tuple(theirs._decoder(feats[0], pos[0], feats[1], pos[1]))
        actual_dec = ours._decoder(feats[0], pos[0], feats[1], pos[1])
        _assert_close(actual_dec, expected_dec, "_decoder")
        assert len(actual_dec[0]) == TINY["dec_depth"] + 1
        for num in (1, 2):
            decout = [tokens.float() for tokens in expected_dec[num - 1]]
            _assert_close(ours._downstream_head(num, decout, shapes[num - 1]),
                          theirs._downstream_head(num, decout, shapes[num - 1]), f"_downstream_head({num})")
        for view, shape in zip((view1, view2), shapes):
            _assert_close(ours._encode_image(view["img"], shape), theirs._encode_image(view["img"], shape),
                          "_encode_image")


def test_state_dict_keys_and_shapes_match_upstream(upstream):
    theirs, ours = _models(upstream)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert any(key.startswith("downstream_head2.proj.") for key in ours.state_dict())


@pytest.mark.parametrize("landscape_only", [True, False])
def test_same_size_pairs_match_upstream(upstream, landscape_only):
    theirs, ours = _models(upstream, landscape_only=landscape_only)
    view1, view2 = _view(_images(3, seed=1), "abc"), _view(_images(3, seed=2), "def")
    _forward_and_interface(theirs, ours, view1, view2)


def test_symmetrized_batch_is_detected_by_instance_labels_like_upstream(upstream):
    theirs, ours = _models(upstream)
    a, b, c, d = _images(4).unbind()
    view1 = _view(torch.stack((a, b, c, d)), ["a", "b", "c", "d"])
    view2 = _view(torch.stack((b, a, d, c)), ["b", "a", "d", "c"])
    _forward_and_interface(theirs, ours, view1, view2)
    # Labels that claim symmetry for images that are not swapped: upstream trusts the labels and encodes
    # only the even samples; ours must do the same (so its outputs differ from the unlabelled batch).
    e, f = _images(2, seed=7).unbind()
    liar1 = _view(torch.stack((a, e)), ["a", "b"])
    liar2 = _view(torch.stack((b, f)), ["b", "a"])
    _forward_and_interface(theirs, ours, liar1, liar2)
    with torch.no_grad():
        trusted = ours(liar1, liar2)[0]["pts3d"]
        honest = ours(_view(liar1["img"], ["x", "y"]), _view(liar2["img"], ["z", "w"]))[0]["pts3d"]
    assert relative_error(trusted[1], honest[1]) > 1e-3 and relative_error(trusted[0], honest[0]) <= FP32


def test_odd_batch_with_swapped_first_pair_is_not_symmetrized():
    torch.manual_seed(0)
    model = Dust3RModel(**TINY).eval()
    a, b, c = _images(3).unbind()
    view1, view2 = _view(torch.stack((a, b, c)), "abc"), _view(torch.stack((b, a, a)), "baa")
    with torch.no_grad():
        (_, _), (feat1, feat2), _ = model._encode_symmetrized(view1, view2)
        expected, _, _ = model._encode_image(torch.stack((a, b, c)), None)
    assert relative_error(feat1, expected) <= FP32


@pytest.mark.parametrize("landscape_only", [True, False])
def test_mixed_size_pair_matches_upstream(upstream, landscape_only):
    # view 2 is a real portrait tensor: encoded on its own, PatchEmbedDust3R on its own grid.
    theirs, ours = _models(upstream, landscape_only=landscape_only)
    view1 = _view(_images(2, seed=1), "ab")
    view2 = _view(_images(2, WIDTH, HEIGHT, seed=2), "cd")
    _forward_and_interface(theirs, ours, view1, view2)
    with torch.no_grad():
        pts = ours(view1, view2)[1]["pts3d_in_other_view"]
    # landscape_only=True transposes portrait predictions to landscape, as upstream's head wrapper does
    assert pts.shape == ((2, HEIGHT, WIDTH, 3) if landscape_only else (2, WIDTH, HEIGHT, 3))


def test_many_ar_batches_with_portrait_samples_match_upstream(upstream):
    theirs, ours = _models(upstream, patch_embed_cls="ManyAR_PatchEmbed", landscape_only=True)
    portrait, landscape = [WIDTH, HEIGHT], [HEIGHT, WIDTH]
    view1 = _view(_images(3, seed=1), "abc", [landscape, portrait, landscape])  # mixed batch
    view2 = _view(_images(3, seed=2), "def", [portrait, portrait, portrait])  # all portrait
    _forward_and_interface(theirs, ours, view1, view2)


def test_many_ar_true_shape_as_numpy_like_load_images(upstream):
    # dust3r's load_images gives np.int32 (1, 2) true shapes; collated, they reach the model as tensors
    theirs, ours = _models(upstream, patch_embed_cls="ManyAR_PatchEmbed")
    view1 = dict(img=_images(1, seed=1), true_shape=np.int32([[WIDTH, HEIGHT]]), instance=["0"])
    view2 = dict(img=_images(1, seed=2), true_shape=np.int32([[HEIGHT, WIDTH]]), instance=["1"])
    with torch.no_grad():
        collated = [{**v, "true_shape": torch.from_numpy(v["true_shape"])} for v in (view1, view2)]
        _assert_close(ours(view1, view2), theirs(*collated), "forward")


def test_patched_model_matches_eager():
    torch.manual_seed(0)
    model = perturb_(Dust3RModel(**TINY)).eval()
    view1, view2 = _view(_images(2, seed=1), "ab"), _view(_images(2, seed=2), "cd")
    with torch.no_grad():
        expected = model(view1, view2)
        fastpatch.patch_model(model, backend="torch")
        actual = model(view1, view2)
    assert fastpatch.is_patched(model)
    _assert_close(actual, expected, "patched forward")


def test_heads_run_in_float32_with_autocast_off():
    torch.manual_seed(0)
    model = perturb_(Dust3RModel(**TINY)).eval()
    tokens = torch.randn(2, 24, 32).bfloat16()
    shapes = torch.tensor([[HEIGHT, WIDTH]] * 2)
    with torch.no_grad():
        expected = model._downstream_head(1, [tokens.float()], shapes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model._downstream_head(1, [tokens], shapes)
            res1, res2 = model(_view(_images(1, seed=1), "a"), _view(_images(1, seed=2), "b"))
    assert res1["pts3d"].dtype == res2["conf"].dtype == torch.float32
    _assert_close(actual, expected, "head under autocast")


def test_configs_build_vit_large_base_with_linear_heads():
    assert sorted(DUST3R_MODEL_CONFIGS) == ["DUSt3R_ViTLarge_BaseDecoder_224_linear",
                                            "DUSt3R_ViTLarge_BaseDecoder_512_linear"]
    for size in (224, 512):
        name = f"DUSt3R_ViTLarge_BaseDecoder_{size}_linear"
        with torch.device("meta"):
            model = dust3r_model(name)
        assert model.patch_embed.img_size == (size, size) and type(model.patch_embed).__name__ == "PatchEmbedDust3R"
        assert not model.landscape_only
        assert model.downstream_head1.proj.weight.shape == (4 * 16 * 16, 768)
        # spec §10: 532.3 M parameters for the linear model
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 532.3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown DUSt3R model config"):
        dust3r_model("DUSt3R_ViTLarge_BaseDecoder_512_dpt")
    with pytest.raises(ValueError, match="head_type='linear'"):
        Dust3RModel(head_type="dpt", **TINY)
    with pytest.raises(ValueError, match="depth_mode"):
        Dust3RModel(depth_mode=("square", -math.inf, math.inf), **TINY)
    model = Dust3RModel(landscape_only=False, **TINY)
    decout = [torch.randn(2, 24, 32)]
    with pytest.raises(ValueError, match="one true shape per batch"):
        model._downstream_head(1, decout, torch.tensor([[HEIGHT, WIDTH], [WIDTH, HEIGHT]]))
    with pytest.raises(ValueError, match="head_num"):
        model._downstream_head(3, decout, torch.tensor([[HEIGHT, WIDTH]] * 2))
    with pytest.raises(ValueError, match="true_shape must have shape"):
        model._encode_symmetrized(_view(_images(2), "ab", [[HEIGHT, WIDTH]]), _view(_images(2), "cd"))
