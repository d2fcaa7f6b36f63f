"""bench/pairs.py against dust3r's own code (mini-dust3r): the pair list of ``make_pairs`` and the
result of ``inference`` (same batches, so bit-identical outputs) on a tiny upstream model (its
``inference`` type-checks the model's class)."""
import numpy as np
import pytest
import torch

from bench.pairs import (PREDICTION_KEYS, complete_symmetrized_pairs, prediction_tensors, scene_images,
                         synthetic_scene, upstream_style_inference)
from upstream import perturb_

TINY = dict(img_size=(32, 48), patch_size=8, enc_embed_dim=64, enc_depth=1, enc_num_heads=2, dec_embed_dim=32,
            dec_depth=2, dec_num_heads=2, pos_embed="RoPE100")


def _assert_identical(actual, expected, what="result"):
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{what}: {list(actual)} != {list(expected)}"
        for key in expected:
            _assert_identical(actual[key], expected[key], f"{what}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_identical(a, e, f"{what}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, what
        assert actual.device == expected.device and torch.equal(actual, expected), what
    else:
        assert actual == expected, what


def test_scene_images_are_load_images_dicts():
    images = scene_images([(32, 48), (48, 32)], seed=3)
    assert [sorted(image) for image in images] == [["idx", "img", "instance", "true_shape"]] * 2
    assert images[1]["img"].shape == (1, 3, 48, 32) and images[1]["instance"] == "1" and images[1]["idx"] == 1
    assert images[1]["true_shape"].dtype == np.int32 and images[1]["true_shape"].tolist() == [[48, 32]]
    assert all(image["img"].abs().max() <= 1 for image in images)
    assert torch.equal(scene_images([(32, 48)], seed=3)[0]["img"], images[0]["img"])
    assert not torch.equal(images[0]["img"][..., :32, :32], images[1]["img"][..., :32, :32])


@pytest.mark.parametrize("n_images", [1, 2, 4, 5])
def test_complete_symmetrized_pairs_match_make_pairs(upstream, n_images):
    images = synthetic_scene(n_images, 32, 48)
    expected = upstream.image_pairs.make_pairs(images, scene_graph="complete", symmetrize=True)
    actual = complete_symmetrized_pairs(images)
    assert [(a["idx"], b["idx"]) for a, b in actual] == [(a["idx"], b["idx"]) for a, b in expected]
    assert all(a is c and b is d for (a, b), (c, d) in zip(actual, expected))
    assert len(actual) == n_images * (n_images - 1)


@pytest.mark.parametrize("sizes, batch_size", [
    ([(32, 48)] * 4, 5),  # 12 pairs: batches of 5, 5, 2
    ([(32, 48)] * 3, 1),
    ([(32, 48), (48, 32), (32, 48)], 4),  # mixed sizes: batch size forced to 1, per-pair lists
])
def test_upstream_style_inference_equals_dust3r_inference(upstream, sizes, batch_size):
    torch.manual_seed(0)
    model = upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d", **TINY)
    model = perturb_(model).eval()
    pairs = complete_symmetrized_pairs(scene_images(sizes))
    expected = upstream.inference.inference(pairs, model, "cpu", batch_size=batch_size, verbose=False)
    actual = upstream_style_inference(pairs, model, "cpu", batch_size=batch_size)
    _assert_identical(actual, expected)
    tensors = prediction_tensors(actual)
    mixed = len(set(sizes)) > 1
    assert len(tensors) == len(PREDICTION_KEYS) * (len(pairs) if mixed else 1)
    assert tensors[0].shape == ((32, 48, 3) if mixed else (len(pairs), 32, 48, 3))
