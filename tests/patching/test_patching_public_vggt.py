"""patch_model on VGGT's and π3's public code (never in this repository: VGGT has its own licence, π3's
code is CC BY-NC-SA, and neither is on PyPI).

``FASTPATCH_VGGT_DIR``: a checkout holding facebookresearch/vggt's ``vggt/`` package;
``FASTPATCH_PI3_DIR``: a checkout of yyfz/Pi3 (its ``pi3/`` package). Each test is skipped without its
variable. The code runs in a subprocess (its packages and import-time settings stay out of the test
session), builds small models from the upstream classes with random weights, and checks:

* every qk-norm RoPE attention and its block is replaced, the blocks run the fused forward;
* the DINOv2 encoder (and π3's RoPE-only heads) stay the same objects, with no warning;
* the patched outputs match the unpatched ones within the float32 tolerance, on the torch backend.
"""
import os
import textwrap
from pathlib import Path

import pytest
import torch

from fastpatch.testing import TOLERANCES
from upstream import run_checkout_script

VGGT_DIR = os.environ.get("FASTPATCH_VGGT_DIR", "")
PI3_DIR = os.environ.get("FASTPATCH_PI3_DIR", "")

_COMMON = textwrap.dedent("""
    import json, sys, types, warnings
    sys.path.insert(0, sys.argv[1])
    try:
        import huggingface_hub  # noqa: F401  (pi3's package imports it; only a base class is needed)
    except ImportError:
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub
    import torch
    import fastpatch
    from fastpatch.testing import relative_error

    def randomise(model):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "q_norm" in name or "k_norm" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
                elif name.endswith("gamma"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        return model.eval()

    def patch(model, untouched):
        before = {name: m for name, m in model.named_modules() if name.startswith(untouched)}
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            patched = fastpatch.patch_model(model, backend="torch")
        after = {name: m for name, m in patched.named_modules() if name.startswith(untouched)}
        report = patched.fastpatch_report
        with fastpatch.use_backend("torch"):  # as the blocks' forward sees it, under their backend pin
            fusable = [m.fusable() for m in patched.modules()
                       if type(m).__module__.startswith("fastpatch") and hasattr(m, "fusable") and hasattr(m, "ls1")]
        return patched, dict(
            replaced={role: len(paths) for role, paths in report.replaced.items()},
            left_alone=[path for path, _ in report.left_alone],
            untouched=len(before) > 0 and all(after[name] is m for name, m in before.items()),
            fusable=fusable)
""")

_VGGT = _COMMON + textwrap.dedent("""
    from vggt.models.aggregator import Aggregator
    torch.manual_seed(0)
    model = randomise(Aggregator(img_size=518, patch_size=14, embed_dim=384, depth=2, num_heads=6,
                                 patch_embed="dinov2_vits14_reg"))
    images = torch.rand(1, 2, 3, 56, 70, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = model(images)
        patched, result = patch(model, "patch_embed")
        got, _ = patched(images)
    result["error"] = max(relative_error(a, b) for a, b in zip(got, expected))
    print(json.dumps(result))
""")

_PI3 = _COMMON + textwrap.dedent("""
    from functools import partial
    from pi3.models.dinov2.layers import Mlp
    from pi3.models.dinov2.models.vision_transformer import vit_small
    from pi3.models.layers.attention import FlashAttentionRope
    from pi3.models.layers.block import BlockRope
    from pi3.models.layers.pos_embed import PositionGetter, RoPE2D

    class MiniPi3(torch.nn.Module):
        # pi3.models.pi3.Pi3's layout at small width: DINOv2 encoder, 5 register tokens at (0, 0), patches
        # at (row+1, col+1), decoder blocks alternating frame / global attention, a RoPE-only head block.
        def __init__(self, dim=384, heads=6, depth=2):
            super().__init__()
            self.encoder = vit_small(patch_size=14, num_register_tokens=4, img_size=518, block_chunks=0,
                                     init_values=1.0)
            rope = RoPE2D(freq=100.0)
            block = partial(BlockRope, dim=dim, num_heads=heads, mlp_ratio=4, qkv_bias=True, proj_bias=True,
                            ffn_bias=True, drop_path=0.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                            act_layer=torch.nn.GELU, ffn_layer=Mlp, init_values=0.01,
                            attn_class=FlashAttentionRope, rope=rope)
            self.decoder = torch.nn.ModuleList([block(qk_norm=True) for _ in range(depth)])
            self.head = block(qk_norm=False)
            self.register_token = torch.nn.Parameter(torch.randn(1, 1, 5, dim) * 0.1)
            self.position_getter = PositionGetter()

        def forward(self, imgs):
            b, n, _, h, w = imgs.shape
            hidden = self.encoder(imgs.reshape(b * n, 3, h, w), is_training=True)["x_norm_patchtokens"]
            hidden = torch.cat([self.register_token.repeat(b, n, 1, 1).reshape(b * n, 5, -1), hidden], dim=1)
            tokens = hidden.shape[1]
            pos = self.position_getter(b * n, h // 14, w // 14, hidden.device) + 1
            pos = torch.cat([torch.zeros(b * n, 5, 2, dtype=pos.dtype), pos], dim=1)
            for i, blk in enumerate(self.decoder):
                shape = (b * n, tokens, -1) if i % 2 == 0 else (b, n * tokens, -1)
                hidden = blk(hidden.reshape(shape), xpos=pos.reshape(shape))
            hidden = hidden.reshape(b * n, tokens, -1)
            return self.head(hidden, xpos=pos.reshape(b * n, tokens, -1))

    torch.manual_seed(0)
    model = randomise(MiniPi3())
    images = torch.rand(1, 2, 3, 56, 70, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
        head = model.head
        patched, result = patch(model, "encoder")
        got = patched(images)
    result["head_untouched"] = patched.head is head and patched.head.attn is head.attn
    result["error"] = relative_error(got, expected)
    print(json.dumps(result))
""")


@pytest.mark.skipif(not (VGGT_DIR and Path(VGGT_DIR, "vggt", "models", "aggregator.py").exists()),
                    reason="FASTPATCH_VGGT_DIR (a checkout holding facebookresearch/vggt's vggt/ package) not set")
def test_vggt_aggregator_blocks_replaced_and_fused():
    result = run_checkout_script(_VGGT, VGGT_DIR)
    assert result["replaced"] == {"VGGTAttention": 4, "VGGTBlock": 4}
    assert result["left_alone"] == [] and result["untouched"]  # the DINOv2 encoder
    assert result["fusable"] == [True] * 4
    assert result["error"] <= TOLERANCES[torch.float32].forward


@pytest.mark.skipif(not (PI3_DIR and Path(PI3_DIR, "pi3", "models", "layers", "block.py").exists()),
                    reason="FASTPATCH_PI3_DIR (a yyfz/Pi3 checkout) not set")
def test_pi3_decoder_blocks_replaced_and_fused():
    result = run_checkout_script(_PI3, PI3_DIR)
    assert result["replaced"] == {"FlashAttentionRope": 2, "BlockRope": 2, "RoPE2D": 1}
    assert result["left_alone"] == [] and result["untouched"] and result["head_untouched"]
    assert result["fusable"] == [True] * 2
    assert result["error"] <= TOLERANCES[torch.float32].forward
