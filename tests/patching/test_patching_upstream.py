"""patch_model / patch_dust3r on the real upstream DUSt3R model (mini-dust3r, test-only).

Upstream weights get noise on every parameter. Every comparison is patched vs unpatched on the
same model object (parameters are shared), fp32, relative error <= 1e-5. The unpatched outputs
are computed on CPU; a model patched for the Triton path then moves to the ``device`` fixture
(interpreter on CPU, or CUDA in compiled mode).
"""
import io

import pytest
import torch

import fastpatch
from fastpatch import use_backend
from fastpatch.testing import relative_error
from upstream import perturb_
from modes import cpu_ci_only

FP32_PARITY = 1e-5
SMALL = dict(img_size=(64, 96), patch_size=16, enc_embed_dim=64, enc_depth=2, enc_num_heads=2, dec_embed_dim=64,
             dec_depth=4, dec_num_heads=2, pos_embed="RoPE100")
FULL_224 = dict(img_size=(224, 224), patch_size=16, enc_embed_dim=1024, enc_depth=24, enc_num_heads=16,
                dec_embed_dim=768, dec_depth=12, dec_num_heads=12, pos_embed="RoPE100")


def _model(upstream, head_type="linear", **cfg):
    torch.manual_seed(0)
    model = upstream.model.AsymmetricCroCo3DStereo(head_type=head_type, output_mode="pts3d", **(cfg or SMALL))
    return perturb_(model, scale=0.02).eval()


def _views(batch, h, w, symmetrized=False):
    img1, img2 = torch.randn(batch, 3, h, w), torch.randn(batch, 3, h, w)
    shape = torch.tensor([[h, w]] * batch)
    ids1, ids2 = [str(i) for i in range(batch)], [str(i + batch) for i in range(batch)]
    if symmetrized:  # samples 2k and 2k+1 are (a, b) and (b, a)
        img2 = torch.stack([img1[i + 1] if i % 2 == 0 else img1[i - 1] for i in range(batch)])
        ids2 = [ids1[i + 1] if i % 2 == 0 else ids1[i - 1] for i in range(batch)]
    return dict(img=img1, true_shape=shape, instance=ids1), dict(img=img2, true_shape=shape, instance=ids2)


def _all_outputs(model, view1, view2):
    """Encoder output, every decoder layer and the head outputs of both views, as a flat list."""
    with torch.no_grad():
        _, (f1, f2), (p1, p2) = model._encode_symmetrized(view1, view2)
        dec1, dec2 = model._decoder(f1, p1, f2, p2)
        res1, res2 = model(view1, view2)
    return [f1, f2, *dec1, *dec2, res1["pts3d"], res1["conf"], res2["pts3d_in_other_view"], res2["conf"]]


def _assert_same(patched_out, eager_out):
    assert len(patched_out) == len(eager_out)
    for i, (p, e) in enumerate(zip(patched_out, eager_out)):
        err = relative_error(p, e)
        assert err <= FP32_PARITY, f"output {i}: relative error {err:.2e}"


def _views_to(views, device):
    """Views with their tensors (img, true_shape) on ``device``."""
    return tuple({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in view.items()} for view in views)


def _patch_and_compare(model, views, backend, device=None):
    """Unpatched outputs on CPU, then patch (and move model and views to ``device``, if given) and compare."""
    eager = _all_outputs(model, *views)
    patched = fastpatch.patch_model(model, backend=backend)
    assert patched is model
    if device is not None:
        model.to(device)
        views = _views_to(views, device)
    with use_backend(backend):
        _assert_same(_all_outputs(model, *views), eager)
    return model


def test_patched_model_matches_unpatched_torch_backend(upstream):
    model = _model(upstream)
    ropes = [m for m in model.modules() if type(m).__name__ == "RoPE2D"]  # dec_blocks2 holds a deep copy
    _patch_and_compare(model, _views(2, 64, 96), "torch")
    report = model.fastpatch_report
    assert len(report.replaced["Block"]) == 2 and len(report.replaced["DecoderBlock"]) == 8
    assert len(report.replaced["PatchEmbedDust3R"]) == 1 and len(report.replaced["RoPE2D"]) == len(ropes)
    assert len(report.replaced["Attention"]) == 2 + 8 and len(report.replaced["CrossAttention"]) == 8
    shared = model.enc_blocks[0].attn.rope
    assert type(shared) is fastpatch.RoPE2D and shared is model.dec_blocks[3].cross_attn.rope


def test_dpt_head_model_matches(upstream):
    model = _model(upstream, "dpt", **dict(SMALL, dec_depth=12))  # the DPT head reads decoder layers 6, 9, 12
    _patch_and_compare(model, _views(1, 64, 96), "torch")


def test_patched_model_matches_unpatched_triton_path(upstream, device):
    cfg = dict(SMALL, img_size=(32, 48), enc_depth=1, dec_depth=2)
    model = _model(upstream, **cfg)
    _patch_and_compare(model, _views(1, 32, 48), "triton", device=device)


@cpu_ci_only
def test_full_depth_224_matches(upstream):
    model = _model(upstream, **FULL_224)
    _patch_and_compare(model, _views(1, 224, 224), "torch")


def test_state_dict_unchanged_and_parameters_shared(upstream):
    model = _model(upstream)
    before = model.state_dict()
    params_before = {name: p for name, p in model.named_parameters()}
    fastpatch.patch_model(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params_before[name] for name, p in model.named_parameters())


def test_save_and_load_state_dict_round_trip(upstream):
    model = fastpatch.patch_model(_model(upstream))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = _model(upstream)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())), strict=True)
    fastpatch.patch_model(fresh)
    views = _views(1, 64, 96)
    with use_backend("torch"):
        _assert_same(_all_outputs(fresh, *views), _all_outputs(model, *views))


def test_unpatch_restores_original_modules(upstream):
    model = _model(upstream)
    modules_before = dict(model.named_modules())
    fastpatch.patch_model(model)
    assert fastpatch.is_patched(model)
    assert type(model.enc_blocks[0]) is fastpatch.Block
    restored = fastpatch.unpatch_model(model)
    assert restored is model and not fastpatch.is_patched(model)
    modules_after = dict(model.named_modules())
    assert list(modules_after) == list(modules_before)
    assert all(modules_after[k] is modules_before[k] for k in modules_before)


def test_patching_twice_is_a_no_op(upstream):
    model = fastpatch.patch_model(_model(upstream))
    first = dict(model.named_modules())
    fastpatch.patch_model(model)
    assert model.fastpatch_report.num_replaced == 0
    assert all(m is first[k] for k, m in model.named_modules())


def test_training_step_gives_same_loss_and_gradients(upstream):
    # Two identical models (same seeds): upstream's heads are closures, which deepcopy does not copy.
    eager = _model(upstream).train()
    patched = fastpatch.patch_model(_model(upstream).train())
    views = _views(2, 64, 96)
    losses, grads = [], []
    for model in (eager, patched):
        with use_backend("torch"):
            res1, res2 = model(*views)
        loss = res1["pts3d"].square().mean() + res2["pts3d_in_other_view"].abs().mean() + res1["conf"].mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert relative_error(losses[1], losses[0]) <= FP32_PARITY
    assert list(grads[1]) == list(grads[0]) and len(grads[0]) > 0
    for name in grads[0]:
        err = relative_error(grads[1][name], grads[0][name])
        assert err <= FP32_PARITY, f"grad of {name}: relative error {err:.2e}"


def test_symmetrized_batch(upstream):
    model = _model(upstream)
    _patch_and_compare(model, _views(4, 64, 96, symmetrized=True), "torch")


def test_mast3r_shaped_model_with_extra_head(upstream):
    model = _model(upstream)
    model.downstream_head_desc = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.GELU())
    views = _views(1, 64, 96)
    with torch.no_grad():
        _, (f1, _), _ = model._encode_symmetrized(*views)
        desc = model.downstream_head_desc(f1)
    _patch_and_compare(model, views, "torch")
    assert type(model.downstream_head_desc[0]) is torch.nn.Linear
    with torch.no_grad(), use_backend("torch"):
        _, (f1, _), _ = model._encode_symmetrized(*views)
        assert relative_error(model.downstream_head_desc(f1), desc) <= FP32_PARITY


def test_class_level_patching_builds_fastpatch_modules(upstream):
    rebound = fastpatch.patch_dust3r()
    try:
        assert "mini_dust3r.croco.blocks.Attention" in rebound and "mini_dust3r.patch_embed.PatchEmbedDust3R" in rebound
        model = upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d", **SMALL)
        # Blocks stay upstream's (plain torch either way); the attention they build is fastpatch's.
        assert type(model.enc_blocks[0]) is upstream.blocks.Block
        assert type(model.enc_blocks[0].attn) is fastpatch.Attention
        assert type(model.dec_blocks[0].cross_attn) is fastpatch.CrossAttention
        assert type(model.patch_embed) is fastpatch.PatchEmbedDust3R
        # mini-dust3r's torch RoPE2D (croco before 2f3d5d5) ignores F0: a subclass that says so.
        assert type(model.rope).__bases__ == (fastpatch.RoPE2D,)
        assert type(model.rope).ignored_attributes == {"F0"}
        assert fastpatch.patch_dust3r() == []  # idempotent
    finally:
        fastpatch.unpatch_dust3r()
    model = upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d", **SMALL)
    assert type(model.enc_blocks[0].attn) is upstream.blocks.Attention
