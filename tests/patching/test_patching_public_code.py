"""patch_model on today's public upstream code: naver/dust3r main with its croco submodule (d7de070).

The code is not in this repository (CC BY-NC-SA) and not on PyPI: these tests run when
``FASTPATCH_DUST3R_DIR`` points at a dust3r checkout whose ``croco/`` submodule is checked out
(``git clone --recursive https://github.com/naver/dust3r``), and are skipped otherwise. They run in a
subprocess, so croco's top-level ``models`` package and its global TF32 switch stay out of the
test session.
"""
import os
import textwrap
from pathlib import Path

import pytest

from fastpatch.patching import source_fingerprints
from fastpatch.patching.known_code import KNOWN_METHODS
from upstream import run_checkout_script

DUST3R_DIR = os.environ.get("FASTPATCH_DUST3R_DIR", "")
pytestmark = pytest.mark.skipif(not (DUST3R_DIR and Path(DUST3R_DIR, "croco", "models", "blocks.py").exists()),
                                reason="FASTPATCH_DUST3R_DIR (a dust3r checkout with its croco submodule) not set")

# The classes and methods patch_model replaces, per file of the checkout.
_FILES = {
    "croco/models/blocks.py": {"Attention", "CrossAttention", "Block", "DecoderBlock", "PositionGetter"},
    "croco/models/pos_embed.py": {"RoPE2D"},
    "croco/models/curope/curope2d.py": {"cuRoPE2D"},
    "dust3r/patch_embed.py": {"PatchEmbedDust3R", "ManyAR_PatchEmbed"},
}

_SCRIPT = textwrap.dedent("""
    import json, sys, types, warnings
    sys.path.insert(0, sys.argv[1])
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    sys.modules.setdefault("torchvision.transforms", types.ModuleType("torchvision.transforms"))
    import torch
    from dust3r.model import AsymmetricCroCo3DStereo
    import fastpatch
    from fastpatch.testing import relative_error
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    result = {}
    for cls_name in ("PatchEmbedDust3R", "ManyAR_PatchEmbed"):
        model = AsymmetricCroCo3DStereo(output_mode="pts3d", head_type="linear", img_size=(64, 64),
                                        patch_embed_cls=cls_name, enc_embed_dim=64, enc_depth=2, enc_num_heads=2,
                                        dec_embed_dim=64, dec_depth=2, dec_num_heads=2, pos_embed="RoPE100").eval()
        views = [dict(img=torch.randn(2, 3, 48, 64), true_shape=torch.tensor([[48, 64]] * 2),
                      instance=[str(i), str(i + 2)], idx=[i, i + 2]) for i in range(2)]
        with torch.no_grad():
            expected = model(*views)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                patched = fastpatch.patch_model(model, backend="torch")
            actual = patched(*views)
        report = patched.fastpatch_report
        errors = [relative_error(a[k], e[k]) for a, e in zip(actual, expected) for k in e]
        # The backbone fastpatch replaces (dust3r's heads read true_shape.min() on the host: their own breaks).
        img, true_shape = views[0]["img"], views[0]["true_shape"]
        with torch.no_grad():
            f1, pos1, _ = patched._encode_image(img, true_shape)
            breaks = [torch._dynamo.explain(patched._encode_image)(img, true_shape).graph_break_count,
                      torch._dynamo.explain(patched._decoder)(f1, pos1, f1, pos1).graph_break_count]
        fastpatch.unpatch_model(patched)
        with torch.no_grad():
            unpatched_breaks = torch._dynamo.explain(model._encode_image)(img, true_shape).graph_break_count
        result[cls_name] = dict(replaced={k: len(v) for k, v in report.replaced.items()},
                                hows=sorted(set(report.accepted_by.values())), left_alone=report.left_alone,
                                error=max(errors), graph_breaks=breaks, unpatched_breaks=unpatched_breaks)
    print(json.dumps(result))
""")


def test_every_method_patch_model_reads_is_a_known_version():
    for relative, classes in _FILES.items():
        prints = source_fingerprints(Path(DUST3R_DIR, relative).read_text(encoding="utf-8"))
        for qualname, code in prints.items():
            cls, method = qualname.split(".")
            if cls in classes and (cls, method) in KNOWN_METHODS:
                assert code in KNOWN_METHODS[(cls, method)], f"{relative} {qualname} {code} is not known"
        for (role, method), known in KNOWN_METHODS.items():
            if role in classes:  # every method fastpatch knows of these classes is this checkout's version
                assert prints.get(f"{role}.{method}") in known or role in ("Attention", "CrossAttention") \
                    or f"{role}.{method}" not in prints, f"{relative} {role}.{method}"


def test_today_upstream_model_is_fully_replaced_and_unchanged():
    result = run_checkout_script(_SCRIPT, DUST3R_DIR)
    for cls_name, row in result.items():
        assert row["left_alone"] == [], row
        assert row["hows"] == ["known code"], row
        assert row["replaced"] == {cls_name: 1, "RoPE2D": 2, "Attention": 6, "CrossAttention": 4, "Block": 2,
                                   "DecoderBlock": 4}, row
        assert row["error"] <= 1e-5, row
        assert row["graph_breaks"] == [0, 0], row  # encoder, decoder
        assert row["unpatched_breaks"] > 0, row  # upstream's RoPE reads positions.max() on the host
