"""Fingerprints of the public upstream versions of the methods fastpatch replaces, with their origin.

Each entry is ``(role, method) -> {fingerprint: where it comes from}``; a role is the upstream class
name a module stands for (:mod:`fastpatch.patching.roles`). Only methods that run in ``forward``
(``forward`` and the helpers it calls on ``self``) decide whether a built module is known code;
``__init__`` counts too for class-level patching, which replaces construction.

The fingerprints were computed from the public files' text with
``python -m fastpatch.patching.fingerprints <file>`` (no upstream code is kept here). Repositories:

* ``naver/croco``: ``models/blocks.py``, ``models/pos_embed.py``, ``models/curope/curope2d.py``.
  DUSt3R and MASt3R run it as a submodule: dust3r main pins croco ``d7de070``, mast3r main pins
  dust3r ``3cc8c88``, which pins the same croco. ``blocks.py`` is unchanged from ``743ee71`` to
  ``d7de070``; ``pos_embed.py`` changed once, in ``2f3d5d5`` ("update RoPE/cuRoPE", merged as
  ``d7de070``): ``RoPE2D.get_cos_sin`` multiplies the inverse frequencies by ``F0``.
  mini-dust3r 0.1.2 (PyPI) carries the older croco text (identical fingerprints to ``d3d0ab2``).
* ``naver/croco`` pull-request branch (``6311881`` "torch native attention", ``ee35847`` "add many
  to one / one to many cross att"): ``Attention`` and ``CrossAttention`` on
  ``scaled_dot_product_attention`` (without ``scale=``, without attention dropout). ``6311881``'s
  ``CrossAttention`` hands SDPA (B, N, H, Dh) tensors, attending over heads: not upstream's
  function, deliberately not listed (its probe fails too). ``ee35847``'s ``DecoderBlock.forward``
  also takes lists of views: not listed (its attention modules are).
* ``naver/dust3r``: ``dust3r/patch_embed.py``, unchanged since ``c4f675b`` (the first commit) up
  to main; ``PatchEmbedDust3R`` and ``ManyAR_PatchEmbed`` inherit croco's ``PatchEmbed``.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Tuple

__all__ = ["KNOWN_METHODS", "KNOWN_IGNORED_ATTRIBUTES", "KNOWN_DIFFERENT", "known_source"]

_CROCO = "naver/croco d7de070 (and 743ee71 onwards)"
_CROCO_SDPA = "naver/croco 6311881/ee35847 (torch native attention branch)"
_DUST3R = "naver/dust3r c4f675b..main dust3r/patch_embed.py"

#: (role, method) -> {fingerprint: origin}.
KNOWN_METHODS: Dict[Tuple[str, str], Dict[str, str]] = {
    ("Attention", "__init__"): {"b230fe21ba580052": f"{_CROCO} models/blocks.py"},
    ("Attention", "forward"): {
        "ad99cd5220604bf2": f"{_CROCO} models/blocks.py",
        "a4fe67e2286a66b8": f"{_CROCO_SDPA} models/blocks.py",
    },
    ("CrossAttention", "__init__"): {"e06e4571854ff3db": f"{_CROCO} models/blocks.py"},
    ("CrossAttention", "forward"): {
        "3aecfdd7d43c49f1": f"{_CROCO} models/blocks.py",
        "af67c1269a82531a": "naver/croco ee35847 (torch native attention branch) models/blocks.py",
    },
    ("Block", "__init__"): {"6cdf73d87c3df98c": f"{_CROCO} models/blocks.py"},
    ("Block", "forward"): {"fa6fb08ddd8e9cbd": f"{_CROCO} models/blocks.py"},
    ("DecoderBlock", "__init__"): {"6f0266d443c99722": f"{_CROCO} models/blocks.py"},
    ("DecoderBlock", "forward"): {"2d9f91950f7c71b2": f"{_CROCO} models/blocks.py"},
    ("PatchEmbedDust3R", "__init__"): {"0266312fe22fa9c1": f"{_CROCO} models/blocks.py PatchEmbed"},
    ("PatchEmbedDust3R", "forward"): {"b9dfc1f100c81f76": _DUST3R},
    ("ManyAR_PatchEmbed", "__init__"): {"8d4cc78784a2f6d3": _DUST3R},
    ("ManyAR_PatchEmbed", "forward"): {"39805fd868a20da4": _DUST3R},
    ("RoPE2D", "__init__"): {"220f7cec826d37cf": "naver/croco 2e72b41..d7de070 models/pos_embed.py"},
    ("RoPE2D", "get_cos_sin"): {
        "2ab20a402436b5b2": "naver/croco 2e72b41..d3d0ab2 models/pos_embed.py (ignores F0)",
        "1dd822e634ce2645": "naver/croco 2f3d5d5/d7de070 models/pos_embed.py (applies F0)",
    },
    ("RoPE2D", "rotate_half"): {"468f920013d298ca": "naver/croco 2e72b41..d7de070 models/pos_embed.py"},
    ("RoPE2D", "apply_rope1d"): {"d207c194e8edf4a9": "naver/croco 2e72b41..d7de070 models/pos_embed.py"},
    ("RoPE2D", "forward"): {"6d245edcc520a781": "naver/croco 2e72b41..d7de070 models/pos_embed.py"},
    ("cuRoPE2D", "__init__"): {"e226379cf0383392": "naver/croco 2e72b41..d7de070 models/curope/curope2d.py"},
    ("cuRoPE2D", "forward"): {"083930d961a2a2ce": "naver/croco 2e72b41..d7de070 models/curope/curope2d.py"},
    ("PositionGetter", "__init__"): {"f713f470ea18a08a": f"{_CROCO} models/blocks.py"},
    ("PositionGetter", "__call__"): {"c6728b06840e1955": f"{_CROCO} models/blocks.py"},
}

#: Known versions whose forward reads an attribute only in a branch that never runs, so the
#: replacement must ignore it: croco's SDPA attention keeps the explicit softmax for torch builds
#: without ``scaled_dot_product_attention`` (every supported torch has it), reading ``scale`` and
#: ``attn_drop`` there only; SDPA's default scale is upstream's ``Dh ** -0.5``.
KNOWN_IGNORED_ATTRIBUTES: Dict[str, FrozenSet[str]] = {
    "a4fe67e2286a66b8": frozenset({"scale", "attn_drop"}),
    "af67c1269a82531a": frozenset({"scale", "attn_drop"}),
}


#: Public versions known to compute something else than fastpatch's replacement: refused without a
#: probe (a probe with tensors cannot see a forward that also takes lists).
KNOWN_DIFFERENT: Dict[str, str] = {
    "0e815b81ddf5b6b0": "naver/croco 6311881 CrossAttention.forward hands SDPA (B, N, H, Dh) tensors: it attends "
                        "over heads, not keys",
    "1ba18b5ab28fac46": "naver/croco ee35847 DecoderBlock.forward also takes lists of views (many-to-one / "
                        "one-to-many), which fastpatch's DecoderBlock does not",
}


def known_source(role: str, method: str, code: str) -> str:
    """Where the known ``code`` of ``role.method`` comes from ("" if it is not known)."""
    return KNOWN_METHODS.get((role, method), {}).get(code, "")
