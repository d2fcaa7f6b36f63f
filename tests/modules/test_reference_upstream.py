"""fastpatch.reference (written from the spec) against the real upstream code (mini-dust3r).

Upstream modules get noise on every parameter (see ``perturb_``) and the same state_dict is loaded
into ours strictly; outputs must agree to fp32 round-off. This is what makes the reference a valid
oracle for every other test.
"""
import pytest
import torch

from fastpatch import reference as ref
from fastpatch.testing import relative_error
from upstream import perturb_

FP32_PARITY = 1e-5


def _load_same(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def _positions(b, h, w):
    return ref.PositionGetter()(b, h, w, "cpu")


def test_position_getter_raster_order_y_first():
    pos = ref.PositionGetter()(2, 3, 4, "cpu")
    assert pos.shape == (2, 12, 2) and pos.dtype == torch.int64
    assert pos[0, 5].tolist() == [1, 1] and pos[1, 11].tolist() == [2, 3]


def test_rope_from_pos_embed():
    rope = ref.rope_from_pos_embed("RoPE100")
    assert rope.base == 100.0 and rope.F0 == 1.0
    assert ref.rope_from_pos_embed("cosine") is None
    with pytest.raises(ValueError, match="RoPE<base>"):
        ref.rope_from_pos_embed("learned")


@pytest.mark.parametrize("base", [100.0, 10000.0])
def test_rope2d_matches_upstream(upstream, base):
    x = torch.randn(2, 3, 35, 16)
    pos = _positions(2, 5, 7)
    theirs = upstream.rope.RoPE2D(freq=base)(x.clone(), pos)
    ours = ref.RoPE2D(freq=base)(x, pos)
    assert relative_error(ours, theirs) < FP32_PARITY


def test_rope2d_f0_scales_every_frequency():
    # Upstream's pure-torch RoPE2D ignores F0 (its CUDA kernel applies it); the spec defines
    # omega_j = F0 * base^(-j/Q), so F0 = 0.5 at position 2p equals F0 = 1 at position p.
    x = torch.randn(1, 2, 6, 16, dtype=torch.float64)
    pos = torch.randint(0, 30, (1, 6, 2))
    halved = ref.apply_rope2d(x, 2 * pos, base=100.0, f0=0.5)
    assert relative_error(halved, ref.apply_rope2d(x, pos, base=100.0, f0=1.0)) < 1e-14


def test_rope2d_preserves_relative_dot_products():
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    def dot(pq, pk):
        rq = ref.apply_rope2d(q, torch.tensor([[pq]]))
        rk = ref.apply_rope2d(k, torch.tensor([[pk]]))
        return (rq * rk).sum().item()
    assert dot((3, 5), (1, 2)) == pytest.approx(dot((12, 9), (10, 6)), rel=1e-12)
    assert dot((3, 5), (1, 2)) != pytest.approx(dot((3, 5), (2, 1)), rel=1e-3)


def test_cosine_table_matches_upstream(upstream):
    theirs = torch.from_numpy(upstream.rope.get_2d_sincos_pos_embed(64, 6)).float()
    assert relative_error(ref.get_2d_sincos_pos_embed(64, 6), theirs) < 1e-6


@pytest.mark.parametrize("cls", ["PatchEmbedDust3R", "ManyAR_PatchEmbed"])
def test_patch_embed_matches_upstream(upstream, cls):
    theirs = perturb_(upstream.patch_embed.get_patch_embed(cls, (32, 48), 8, 24))
    ours = ref.get_patch_embed(cls, (32, 48), 8, 24)
    _load_same(ours, theirs)
    img = torch.randn(3, 3, 32, 48)
    true_shape = torch.tensor([[32, 48], [48, 32], [32, 48]])
    t_tok, t_pos = theirs(img, true_shape=true_shape)
    o_tok, o_pos = ours(img, true_shape=true_shape)
    assert relative_error(o_tok, t_tok) < FP32_PARITY
    assert torch.equal(o_pos, t_pos)


def test_get_patch_embed_rejects_unknown_name():
    with pytest.raises(ValueError, match="ManyAR_PatchEmbed"):
        ref.get_patch_embed("PatchEmbed", 224, 16, 64)


def _block_pair(upstream, name, dim=32, heads=2):
    urope = upstream.rope.RoPE2D(freq=100.0)
    orope = ref.RoPE2D(freq=100.0)
    kwargs = dict(qkv_bias=True, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6))
    theirs = perturb_(getattr(upstream.blocks, name)(dim, heads, rope=urope, **kwargs))
    ours = getattr(ref, name)(dim, heads, rope=orope, **kwargs)
    _load_same(ours, theirs)
    return ours, theirs


def test_block_matches_upstream(upstream):
    ours, theirs = _block_pair(upstream, "Block")
    x, pos = torch.randn(2, 20, 32), _positions(2, 4, 5)
    assert relative_error(ours(x, pos), theirs(x, pos)) < FP32_PARITY


def test_decoder_block_matches_upstream(upstream):
    ours, theirs = _block_pair(upstream, "DecoderBlock")
    x, y = torch.randn(2, 20, 32), torch.randn(2, 12, 32)
    xpos, ypos = _positions(2, 4, 5), _positions(2, 3, 4)
    (o, oy), (t, ty) = ours(x, y, xpos, ypos), theirs(x, y, xpos, ypos)
    assert relative_error(o, t) < FP32_PARITY and oy is y


def _small_models(upstream, **extra):
    cfg = dict(img_size=(32, 48), patch_size=8, enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=24,
               dec_depth=2, dec_num_heads=2, pos_embed="RoPE100", **extra)
    theirs = perturb_(upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d", **cfg))
    ours = ref.Dust3RBackbone(**cfg)
    return ours, theirs


def test_backbone_loads_upstream_checkpoint_keys_strictly(upstream):
    ours, theirs = _small_models(upstream)
    backbone = {k: v for k, v in theirs.state_dict().items() if not k.startswith("downstream_head")}
    ours.load_state_dict(backbone, strict=True)
    assert list(ours.state_dict()) == list(backbone)
    without_second = {k: v for k, v in backbone.items() if not k.startswith("dec_blocks2.")}
    ours.load_state_dict(without_second, strict=True)
    assert torch.equal(ours.dec_blocks2[1].mlp.fc2.weight, backbone["dec_blocks.1.mlp.fc2.weight"])


def test_backbone_matches_upstream_encoder_and_decoder(upstream):
    ours, theirs = _small_models(upstream)
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if not k.startswith("downstream_head")})
    img1, img2 = torch.randn(2, 3, 32, 48), torch.randn(2, 3, 32, 48)
    shape = torch.tensor([[32, 48]] * 2)
    with torch.no_grad():
        t_f1, t_p1 = theirs._encode_image(img1, shape)[:2]
        t_f2, t_p2 = theirs._encode_image(img2, shape)[:2]
        t_dec1, t_dec2 = theirs._decoder(t_f1, t_p1, t_f2, t_p2)
        o_dec1, o_dec2 = ours(img1, img2, shape, shape)
    assert len(o_dec1) == len(t_dec1) == 3
    for o, t in zip(o_dec1 + o_dec2, list(t_dec1) + list(t_dec2)):
        assert relative_error(o, t) < FP32_PARITY
