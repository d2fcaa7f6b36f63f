"""fastpatch.inference against dust3r's own inference (mini-dust3r, test-only), on small models.

Every scene is built like dust3r's ``load_images`` output and paired with upstream's ``make_pairs``;
fastpatch's result must have upstream's keys, order and layout (tensors or lists), views equal and
predictions within the fp32 tolerance. Encoder and decoder calls are counted by wrapping the model's
own methods on the instance.
"""
import sys

import numpy as np
import pytest
import torch

import fastpatch
from fastpatch.engine import model_calls
from fastpatch.engine.feature_cache import FeatureCache
from fastpatch.testing import TOLERANCES, relative_error
from upstream import perturb_

FP32 = TOLERANCES[torch.float32].forward
SMALL = dict(img_size=(64, 96), patch_size=16, enc_embed_dim=64, enc_depth=2, enc_num_heads=2, dec_embed_dim=64,
             dec_depth=2, dec_num_heads=2, pos_embed="RoPE100")
LANDSCAPE, PORTRAIT = (64, 96), (96, 64)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a loaded 2-core machine two threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(upstream, patch_embed_cls="PatchEmbedDust3R", landscape_only=True, **cfg):
    torch.manual_seed(0)
    model = upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d",
                                                   patch_embed_cls=patch_embed_cls, landscape_only=landscape_only,
                                                   **dict(SMALL, **cfg))
    return perturb_(model, scale=0.02).eval()


def _images(true_shapes, many_ar=False, seed=1, instances=None):
    """dust3r ``load_images``-style dicts; ManyAR keeps every tensor landscape and says portrait in true_shape."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i, (h, w) in enumerate(true_shapes):
        stored = (min(h, w), max(h, w)) if many_ar else (h, w)
        images.append(dict(img=torch.randn(1, 3, *stored, generator=gen), true_shape=np.int32([[h, w]]), idx=i,
                           instance=instances[i] if instances else str(i)))
    return images


def _scene(upstream, true_shapes, **kw):
    return upstream.image_pairs.make_pairs(_images(true_shapes, **kw), scene_graph="complete", symmetrize=True)


def _count(model, name):
    """Wrap ``model.<name>`` (on the instance) to record the batch size of every call."""
    calls = []
    original = getattr(model, name)

    def counted(*args):
        first = args[0]
        calls.append((first["img"] if isinstance(first, dict) else first).shape[0])
        return original(*args)

    setattr(model, name, counted)
    return calls


def _assert_same_value(ours, ref, what, numeric):
    assert type(ours) is type(ref), f"{what}: {type(ours).__name__} vs upstream {type(ref).__name__}"
    if isinstance(ref, torch.Tensor):
        assert ours.device.type == "cpu" and ours.dtype == ref.dtype and ours.shape == ref.shape, what
        if numeric:
            err = relative_error(ours, ref)
            assert err <= FP32, f"{what}: relative error {err:.2e}"
        else:
            assert torch.equal(ours, ref), what
    elif isinstance(ref, list):
        assert len(ours) == len(ref), what
        for i, (o, r) in enumerate(zip(ours, ref)):
            _assert_same_value(o, r, f"{what}[{i}]", numeric)
    else:
        assert ours == ref, what


def assert_same_result(ours, ref):
    """Same keys in the same order, equal views, predictions within the fp32 tolerance, loss None."""
    assert list(ours) == list(ref) == ["view1", "view2", "pred1", "pred2", "loss"]
    assert ours["loss"] is None and ref["loss"] is None
    for part in ("view1", "view2", "pred1", "pred2"):
        assert list(ours[part]) == list(ref[part]), part
        for name in ref[part]:
            _assert_same_value(ours[part][name], ref[part][name], f"{part}[{name!r}]", numeric=part.startswith("pred"))


def test_same_size_scene_matches_upstream_and_encodes_each_image_once(upstream):
    model = _model(upstream)
    pairs = _scene(upstream, [LANDSCAPE] * 4)
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=2, verbose=False)
    encoded, decoded = _count(model, "_encode_image"), _count(model, "_decoder")
    ours = fastpatch.inference(pairs, model, "cpu", batch_size=2, verbose=False)
    assert_same_result(ours, ref)
    assert isinstance(ours["pred1"]["pts3d"], torch.Tensor) and ours["pred1"]["pts3d"].shape == (12, 64, 96, 3)
    assert encoded == [4]  # 4 images once each, in one batch of 2 * batch_size
    assert decoded == [2] * 6


@pytest.mark.parametrize("landscape_only", [False, True])
def test_mixed_orientation_scene_stays_batched(upstream, landscape_only):
    """Portrait and landscape photos: upstream falls back to batch size 1 and returns lists."""
    model = _model(upstream, landscape_only=landscape_only)
    pairs = _scene(upstream, [LANDSCAPE, PORTRAIT, PORTRAIT, LANDSCAPE])
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    encoded, decoded = _count(model, "_encode_image"), _count(model, "_decoder")
    ours = fastpatch.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    assert_same_result(ours, ref)
    assert isinstance(ours["pred1"]["pts3d"], list) and len(ours["pred1"]["pts3d"]) == 12
    assert sorted(encoded) == [2, 2]  # one batch per image shape
    assert decoded == [8, 4]  # same token count in both orientations: decoded together


def test_many_ar_mixed_true_shapes_match_upstream(upstream):
    """ManyAR: landscape tensors, portrait rows told by true_shape; upstream batches them together."""
    model = _model(upstream, patch_embed_cls="ManyAR_PatchEmbed")
    pairs = _scene(upstream, [LANDSCAPE, PORTRAIT, LANDSCAPE, PORTRAIT], many_ar=True)
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=4, verbose=False)
    encoded = _count(model, "_encode_image")
    ours = fastpatch.inference(pairs, model, "cpu", batch_size=4, verbose=False)
    assert_same_result(ours, ref)
    assert encoded == [4]  # one tensor shape: portrait and landscape rows in one encoder batch


def test_patched_many_ar_model_matches_unpatched_upstream(upstream):
    model = _model(upstream, patch_embed_cls="ManyAR_PatchEmbed")
    pairs = _scene(upstream, [PORTRAIT, LANDSCAPE, PORTRAIT], many_ar=True)
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    fastpatch.patch_model(model, backend="torch")
    with fastpatch.use_backend("torch"):
        ours = fastpatch.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    assert_same_result(ours, ref)


def test_dpt_head_model_matches_upstream(upstream):
    """The DPT head reads decoder layers 6, 9 and 12: every layer must reach the head."""
    model = upstream.model.AsymmetricCroCo3DStereo(head_type="dpt", output_mode="pts3d", **dict(SMALL, dec_depth=12))
    model = perturb_(model, scale=0.02).eval()
    pairs = _scene(upstream, [LANDSCAPE, PORTRAIT])
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    assert_same_result(fastpatch.inference(pairs, model, "cpu", batch_size=8, verbose=False), ref)


def test_images_are_identified_by_tensor_not_by_instance_label(upstream):
    model = _model(upstream)
    images = _images([LANDSCAPE] * 3, instances=["same"] * 3)
    pairs = upstream.image_pairs.make_pairs(images, scene_graph="complete", symmetrize=True)
    # batch size 1: upstream's own symmetrisation shortcut (which trusts the labels) stays off
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=1, verbose=False)
    encoded = _count(model, "_encode_image")
    ours = fastpatch.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    assert_same_result(ours, ref)
    assert sum(encoded) == 3

    # one tensor behind two dicts with different labels is one image
    alias = dict(images[0], instance="another label")
    encoded.clear()
    fastpatch.inference([(images[0], images[1]), (images[1], alias)], model, "cpu", verbose=False)
    assert sum(encoded) == 2


def test_over_budget_features_spill_to_cpu_and_results_match(upstream, capsys):
    model = _model(upstream)
    pairs = _scene(upstream, [LANDSCAPE, PORTRAIT, LANDSCAPE])
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    one_image = 24 * 64 * 4 + 24 * 2 * 8  # tokens (24 x 64 fp32) + positions (24 x 2 int64)
    for budget_bytes, spilled in ((0, 3), (one_image, 2)):
        ours = fastpatch.inference(pairs, model, "cpu", batch_size=2, verbose=True,
                                   feature_budget_mb=budget_bytes / 2**20)
        assert_same_result(ours, ref)
        assert f"{spilled} spilled to the CPU" in capsys.readouterr().out


def test_feature_cache_keeps_the_device_within_budget(device):
    feats = [torch.full((1, 4, 8), float(i), device=device) for i in range(5)]
    pos = torch.zeros(1, 4, 2, dtype=torch.int64, device=device)
    entry = 4 * 8 * 4 + 4 * 2 * 8
    cache = FeatureCache(device_budget=2 * entry)
    batch = torch.cat(feats)  # entries are slices of one batch tensor, as the encoder gives them
    for i in range(5):
        cache.put(i, batch[i:i + 1], pos)
        assert cache.device_bytes <= 2 * entry
    assert cache.stats.peak_device_bytes == 2 * entry and cache.stats.spilled == 3
    assert [cache.is_resident(i) for i in range(5)] == [False, False, False, True, True]  # least recently used spilled
    assert cache.host_bytes == 3 * entry
    for i in range(5):
        feat, _ = cache.get(i)
        assert feat.device.type == device.type and torch.equal(feat, feats[i])
    assert cache.stats.reloaded == 3
    assert cache.signature(0) == (1, (4, 8), torch.float32, (4, 2), torch.int64)

    too_big = FeatureCache(device_budget=entry - 1)
    too_big.put("a", feats[0], pos)
    assert not too_big.is_resident("a") and too_big.device_bytes == 0 and torch.equal(too_big.get("a")[0], feats[0])


def test_feature_cache_host_budget_and_owners():
    cache = FeatureCache(device_budget=0, host_budget=2 * (4 * 8 * 4 + 4 * 2 * 8))
    pos = torch.zeros(1, 4, 2, dtype=torch.int64)
    for i in range(3):
        cache.put(i, torch.randn(1, 4, 8), pos)
    assert 0 not in cache and 1 in cache and 2 in cache and cache.stats.dropped == 1
    owner = torch.randn(2)
    cache.put("owned", torch.randn(1, 4, 8), pos, owners=(owner,))
    assert "owned" in cache
    del owner
    assert "owned" not in cache


def test_model_without_engine_methods_runs_through_forward(upstream):
    class Wrapper(torch.nn.Module):  # hides _encode_image / _decoder / _downstream_head
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, view1, view2):
            return self.inner(view1, view2)

    model = _model(upstream)
    pairs = _scene(upstream, [LANDSCAPE, PORTRAIT, LANDSCAPE])
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    forwards = _count(model, "forward")
    with pytest.warns(RuntimeWarning, match="Wrapper has no _encode_image, _decoder, _downstream_head"):
        ours = fastpatch.inference(pairs, Wrapper(model), "cpu", batch_size=8, verbose=False)
    assert_same_result(ours, ref)
    assert forwards == [2, 2, 2]  # pairs with equal image and true shapes share a forward


def test_encoder_gets_true_shape_on_the_image_device():
    """dust3r leaves true_shape on the CPU; a patch embedding may index the image with it."""
    seen = []

    class Recorder:
        def _encode_image(self, img, true_shape):
            seen.append(true_shape.device)
            return img.flatten(2).transpose(1, 2), torch.zeros(1, 1, 2, dtype=torch.int64, device=img.device), None

    img = torch.empty(1, 3, 16, 16, device="meta")
    model_calls.encode(Recorder(), img, torch.tensor([[16, 16]]))
    assert seen == [img.device]


def test_true_shape_on_cpu_with_model_on_device(upstream, device):
    """dust3r leaves true_shape on the CPU (numpy); the model and images may live elsewhere."""
    model = _model(upstream, patch_embed_cls="ManyAR_PatchEmbed")
    pairs = _scene(upstream, [PORTRAIT, LANDSCAPE], many_ar=True)
    ref = upstream.inference.inference(pairs, model, "cpu", batch_size=8, verbose=False)
    ours = fastpatch.inference(pairs, model.to(device), device, batch_size=8, verbose=False)
    assert_same_result(ours, ref)


def test_progress_with_tqdm_and_pairs_per_second(upstream, capsys):
    pytest.importorskip("tqdm")
    pairs = _scene(upstream, [LANDSCAPE] * 3)
    fastpatch.inference(pairs, _model(upstream), "cpu", verbose=True)
    captured = capsys.readouterr()
    assert "decode pairs" in captured.err and "6/6" in captured.err  # the tqdm bar
    assert "6 pairs in" in captured.out and "pairs/s" in captured.out


def test_progress_plain_line_without_tqdm(upstream, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # "import tqdm" raises ImportError
    pairs = _scene(upstream, [LANDSCAPE] * 3)
    fastpatch.inference(pairs, _model(upstream), "cpu", verbose=True)
    captured = capsys.readouterr()
    assert "\rdecode pairs: 6/6\n" in captured.out and "pairs/s" in captured.out and captured.err == ""


def test_quiet_when_not_verbose(upstream, capsys):
    fastpatch.inference(_scene(upstream, [LANDSCAPE] * 2), _model(upstream), "cpu", verbose=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_bad_inputs_raise_clear_errors(upstream):
    model = _model(upstream)
    pairs = _scene(upstream, [LANDSCAPE] * 2)
    with pytest.raises(ValueError, match="empty"):
        fastpatch.inference([], model, "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        fastpatch.inference(pairs, model, "cpu", batch_size=0)
    with pytest.raises(TypeError, match=r"pairs\[1\]\[0\]\['img'\]"):
        fastpatch.inference([pairs[0], (dict(pairs[0][0], img=None), pairs[0][1])], model, "cpu")
    with pytest.raises(ValueError, match=r"true_shape'\] must have shape \(1, 2\)"):
        fastpatch.inference([(dict(pairs[0][0], true_shape=np.int32([64, 96])), pairs[0][1])], model, "cpu")
    with pytest.raises(ValueError, match="rows"):
        fastpatch.inference([(dict(img=torch.randn(2, 3, 64, 96)), pairs[0][1])], model, "cpu")
    with pytest.raises(ValueError, match="feature_budget_mb"):
        fastpatch.inference(pairs, model, "cpu", feature_budget_mb=-1)
    with pytest.raises(RuntimeError, match="not initialised"):
        fastpatch.inference(pairs, model, "cpu", distributed=True)
