"""dust3r's own ``inference()`` on the ``device`` fixture's device with a patched model.

``inference`` (upstream ``dust3r.inference``) collates the pairs from ``make_pairs``, and its
``loss_of_one_batch`` moves ``img`` to the device but leaves ``true_shape`` (int32, from the image
dicts) on the CPU, exactly as dust3r and its forks call the model. On CUDA (compiled mode) this
is the CPU ``true_shape`` / CUDA image case of the ManyAR patch embedding; under the interpreter
everything is on the CPU and the same code runs through the Triton kernels.

Reference: the same model object before patching, on the CPU, through the same ``inference()``.
Tiny model (32x48 images, 2x3 tokens, depth 1-2) so the interpreter run stays short.
"""
import numpy as np
import pytest
import torch

import fastpatch
from fastpatch.testing import TOLERANCES, relative_error
from upstream import perturb_

FP32 = TOLERANCES[torch.float32].forward
HEIGHT, WIDTH = 32, 48
TINY = dict(img_size=(HEIGHT, WIDTH), patch_size=16, enc_embed_dim=64, enc_depth=1, enc_num_heads=2,
            dec_embed_dim=64, dec_depth=2, dec_num_heads=2, pos_embed="RoPE100")
# (height, width) of each image; a portrait image is stored transposed in a landscape tensor (ManyAR).
LANDSCAPE_ONLY = [(HEIGHT, WIDTH)] * 3
WITH_PORTRAIT = [(HEIGHT, WIDTH), (WIDTH, HEIGHT), (HEIGHT, WIDTH)]


def _model(upstream, patch_embed_cls):
    torch.manual_seed(0)
    model = upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d",
                                                    patch_embed_cls=patch_embed_cls, **TINY)
    return perturb_(model, scale=0.02).eval()


def _images(true_shapes):
    """Image dicts as dust3r's ``load_images`` makes them: img (1, 3, H, W), true_shape int32 numpy (1, 2)."""
    gen = torch.Generator().manual_seed(1)
    return [dict(img=torch.randn(1, 3, HEIGHT, WIDTH, generator=gen), true_shape=np.int32([shape]), idx=i,
                 instance=str(i)) for i, shape in enumerate(true_shapes)]


def _predictions(result):
    pred1, pred2 = result["pred1"], result["pred2"]
    return {"pred1.pts3d": pred1["pts3d"], "pred1.conf": pred1["conf"],
            "pred2.pts3d_in_other_view": pred2["pts3d_in_other_view"], "pred2.conf": pred2["conf"]}


@pytest.mark.parametrize("patch_embed_cls, true_shapes", [
    ("PatchEmbedDust3R", LANDSCAPE_ONLY),
    ("ManyAR_PatchEmbed", WITH_PORTRAIT),
])
def test_upstream_inference_on_device_matches_unpatched_cpu(upstream, device, patch_embed_cls, true_shapes):
    model = _model(upstream, patch_embed_cls)
    pairs = upstream.image_pairs.make_pairs(_images(true_shapes), scene_graph="complete", symmetrize=True)
    assert len(pairs) == 6
    expected = _predictions(upstream.inference.inference(pairs, model, "cpu", batch_size=8, verbose=False))

    fastpatch.patch_model(model, backend="triton")
    assert type(model.patch_embed).__name__ == patch_embed_cls and type(model.patch_embed).__module__.startswith("fastpatch")
    model.to(device)
    seen = []  # (img device, true_shape device) of each patch-embedding call
    model.patch_embed.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].device.type, kwargs["true_shape"].device.type)),
        with_kwargs=True)
    actual = _predictions(upstream.inference.inference(pairs, model, str(device), batch_size=8, verbose=False))
    assert seen and all(shapes == (device.type, "cpu") for shapes in seen), seen

    for name, ref in expected.items():
        assert torch.isfinite(ref).all()
        err = relative_error(actual[name], ref)
        assert err <= FP32, f"{patch_embed_cls} {name}: relative error {err:.2e} > {FP32:.0e}"
