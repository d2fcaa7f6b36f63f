"""The upstream classes fastpatch replaces ("roles"), and what fastpatch's forward relies on for each.

A module stands for a role when its class is named like the upstream class (or, for ``trust=``,
derives from one). For each role this table says what a module must look like for fastpatch's
forward to compute what its own forward computes:

* ``children``: the child modules it must have (``optional_children`` may be absent or None);
* ``reads``: the attributes of ``self`` the original's forward (and the methods it calls on
  ``self``) may read: those fastpatch's forward reads, or whose part of the function it
  reproduces (the position getter). Memo caches (dict attributes named ``*cache*``) are allowed
  too. Any other attribute (a ``temperature``, a ``use_3d`` switch) is state fastpatch would
  ignore, so a flag flipped after patching could change the original's function unseen;
* ``may_ignore``: of ``reads``, those the replacement ignores when the original leaves them unread
  (SDPA attention without ``scale=`` uses ``Dh ** -0.5`` and no attention dropout; croco's
  RoPE2D before 2f3d5d5 ignores ``F0``). Other attributes the original leaves unread are still
  read by the replacement: the probe checks their current values;
* ``arguments``: forward's positional parameters after ``self``; the original's must be as many,
  with no extra parameters (a ``mask``), and ``var_keyword`` says whether ``**kwargs`` is allowed.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

from torch import nn

__all__ = ["Role", "ROLES", "MODULE_ROLES", "POSITION_GETTER", "FASTPATCH_CLASS_NAMES", "QKNORM_ROLES", "refine_role"]


@dataclass(frozen=True)
class Role:
    """What fastpatch's replacement for one upstream class relies on (module docstring)."""

    name: str
    entry: str
    arguments: Tuple[str, ...]
    children: Tuple[str, ...] = ()
    optional_children: Tuple[str, ...] = ()
    reads: FrozenSet[str] = frozenset()
    may_ignore: FrozenSet[str] = frozenset()
    var_keyword: bool = False
    #: forward parameters that may default to None (positions): the probe also runs with None.
    optional_arguments: Tuple[str, ...] = ()


_ATTENTION_READS = frozenset({"num_heads", "rope", "scale", "attn_drop", "proj", "proj_drop", "training"})

ROLES: Dict[str, Role] = {role.name: role for role in (
    Role("Attention", "forward", ("x", "xpos"),
         children=("qkv", "attn_drop", "proj", "proj_drop"), optional_children=("rope",),
         reads=_ATTENTION_READS | {"qkv"}, may_ignore=frozenset({"scale", "attn_drop"}),
         optional_arguments=("xpos",)),
    Role("CrossAttention", "forward", ("query", "key", "value", "qpos", "kpos"),
         children=("projq", "projk", "projv", "attn_drop", "proj", "proj_drop"), optional_children=("rope",),
         reads=_ATTENTION_READS | {"projq", "projk", "projv"},
         may_ignore=frozenset({"scale", "attn_drop"}), optional_arguments=("qpos", "kpos")),
    Role("Block", "forward", ("x", "xpos"),
         children=("norm1", "attn", "norm2", "mlp", "drop_path"),
         reads=frozenset({"norm1", "attn", "norm2", "mlp", "drop_path"})),
    Role("DecoderBlock", "forward", ("x", "y", "xpos", "ypos"),
         children=("norm1", "attn", "cross_attn", "norm2", "norm3", "mlp", "norm_y", "drop_path"),
         reads=frozenset({"norm1", "attn", "cross_attn", "norm2", "norm3", "mlp", "norm_y", "drop_path"})),
    Role("RoPE2D", "forward", ("tokens", "positions"),
         reads=frozenset({"base", "F0"}), may_ignore=frozenset({"F0"})),
    Role("cuRoPE2D", "forward", ("tokens", "positions"), reads=frozenset({"base", "F0"})),
    Role("PatchEmbedDust3R", "forward", ("x",), children=("proj", "norm"),
         reads=frozenset({"proj", "norm", "patch_size", "position_getter", "flatten"}), var_keyword=True),
    Role("ManyAR_PatchEmbed", "forward", ("img", "true_shape"), children=("proj", "norm"),
         reads=frozenset({"proj", "norm", "patch_size", "position_getter", "embed_dim"})),
)}

#: Not a module: the patch embeddings' ``position_getter``; its ``__call__(b, h, w, device)`` must
#: read nothing but its cache (fastpatch computes the positions itself).
POSITION_GETTER = Role("PositionGetter", "__call__", ("b", "h", "w", "device"))

#: The nn.Module roles, in the order the report lists them.
MODULE_ROLES: Tuple[str, ...] = ("PatchEmbedDust3R", "ManyAR_PatchEmbed", "RoPE2D", "cuRoPE2D", "Attention",
                                 "CrossAttention", "Block", "DecoderBlock")

#: Role -> the name of fastpatch's class that replaces it (``fastpatch.<name>``).
FASTPATCH_CLASS_NAMES: Dict[str, str] = {role: role for role in MODULE_ROLES}
FASTPATCH_CLASS_NAMES["cuRoPE2D"] = "RoPE2D"


# ----------------------------------------------------------------------------------------------
# VGGT / π3 qk-norm + RoPE2D attention and their LayerScale blocks (spec vggt.md §2-4, §9)
# ----------------------------------------------------------------------------------------------
_QKNORM_ATTENTION_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop", "rope")
_QKNORM_ATTENTION_READS = frozenset(_QKNORM_ATTENTION_CHILDREN) | {"num_heads", "head_dim", "scale", "fused_attn",
                                                                   "training"}
_LAYERSCALE_BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
#: DINOv2-style blocks (VGGT's and π3's) also read ``sample_drop_ratio`` and ``training`` (stochastic depth
#: in training); fastpatch's blocks read both and refuse stochastic depth in training.
_LAYERSCALE_BLOCK_READS = frozenset(_LAYERSCALE_BLOCK_CHILDREN) | {"sample_drop_ratio", "training"}

#: VGGT's ``Attention`` / ``Block`` (named like croco's: :func:`refine_role` tells them apart) and π3's
#: ``FlashAttentionRope`` / ``BlockRope``.
QKNORM_ROLES: Dict[str, Role] = {role.name: role for role in (
    Role("VGGTAttention", "forward", ("x", "pos"), children=_QKNORM_ATTENTION_CHILDREN,
         reads=_QKNORM_ATTENTION_READS, optional_arguments=("pos",)),
    Role("FlashAttentionRope", "forward", ("x", "attn_bias", "xpos"), children=_QKNORM_ATTENTION_CHILDREN,
         reads=_QKNORM_ATTENTION_READS, optional_arguments=("attn_bias", "xpos")),
    Role("VGGTBlock", "forward", ("x", "pos"), children=_LAYERSCALE_BLOCK_CHILDREN,
         reads=_LAYERSCALE_BLOCK_READS, optional_arguments=("pos",)),
    Role("BlockRope", "forward", ("x", "xpos"), children=_LAYERSCALE_BLOCK_CHILDREN,
         reads=_LAYERSCALE_BLOCK_READS, optional_arguments=("xpos",)),
)}
ROLES.update(QKNORM_ROLES)
MODULE_ROLES = MODULE_ROLES + tuple(QKNORM_ROLES)
FASTPATCH_CLASS_NAMES.update({role: role for role in QKNORM_ROLES})


def _fusable_attention(module: object) -> bool:
    """LayerNorm ``q_norm`` and ``k_norm`` and a ``rope``: what the fused qk-norm op computes."""
    children = getattr(module, "_modules", {})
    return (isinstance(children.get("q_norm"), nn.LayerNorm) and isinstance(children.get("k_norm"), nn.LayerNorm)
            and children.get("rope") is not None)


def _qknorm_family(module: object) -> bool:
    """``q_norm`` and ``k_norm`` children (LayerNorm or Identity): the attention of VGGT, π3 and the DINOv2
    encoder they carry; croco's attention has neither."""
    children = getattr(module, "_modules", {})
    return "q_norm" in children and "k_norm" in children


_POSITION_ARGUMENTS = frozenset({"xpos", "pos", "qpos", "kpos", "positions"})


def _plain_vit(module: object, attention: object) -> bool:
    """A plain ViT module that only shares croco's class name: ``attention`` has ``qkv`` and ``proj``
    Linear children and no ``rope`` attribute, and ``module``'s forward takes no positions (DINOv2's
    ``Attention(x, attn_bias=None)`` and ``NestedTensorBlock(x_or_x_list)`` in π3's encoder)."""
    children = getattr(attention, "_modules", {})
    if not (isinstance(children.get("qkv"), nn.Linear) and isinstance(children.get("proj"), nn.Linear)):
        return False
    if hasattr(attention, "rope"):
        return False
    try:
        names = set(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return False
    return not names & _POSITION_ARGUMENTS


def _positions_default_to_none(module: object) -> bool:
    """VGGT's forwards take ``(x, pos=None)`` (spec §2, §3); croco's ``(x, xpos)`` has no default."""
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(parameters) == 3 and parameters[2].default is None


def refine_role(role_name: str, module: object) -> Optional[str]:
    """The role of a module whose class is named ``role_name``, telling VGGT's classes from croco's.

    An ``Attention`` with ``q_norm`` / ``k_norm`` children and VGGT's ``forward(x, pos=None)`` is VGGT's;
    a ``Block`` with that signature and ``ls1`` or a qk-norm attention is VGGT's block (a croco-named
    class with ``forward(x, xpos)`` keeps croco's role, and its extra children get it left alone).
    Modules of that family with nothing to fuse (no LayerNorm qk-norm or no RoPE: the DINOv2 encoder's
    ``MemEffAttention`` / ``NestedTensorBlock``, the camera head, π3's head blocks), whatever their
    forward's signature, and plain ViT modules (:func:`_plain_vit`: π3's DINOv2 ``Attention``) get no
    role (None): patch_model leaves them as they are, without a warning.
    Any other module keeps ``role_name``.
    """
    children = getattr(module, "_modules", {})
    if role_name in ("Attention", "VGGTAttention", "FlashAttentionRope"):
        if (_qknorm_family(module) and not _fusable_attention(module)) or _plain_vit(module, module):
            return None
        if role_name == "Attention" and not (_qknorm_family(module) and _positions_default_to_none(module)):
            return role_name
        if not _fusable_attention(module):
            return None
        return "FlashAttentionRope" if role_name == "FlashAttentionRope" else "VGGTAttention"
    if role_name in ("Block", "VGGTBlock", "BlockRope"):
        attention = children.get("attn")
        qknorm_attention = _qknorm_family(attention)
        if (qknorm_attention and not _fusable_attention(attention)) or _plain_vit(module, attention):
            return None
        if role_name == "Block" and (("ls1" not in children and not qknorm_attention)
                                     or not _positions_default_to_none(module)):
            return role_name
        if not _fusable_attention(attention):
            return None
        return "BlockRope" if role_name == "BlockRope" else "VGGTBlock"
    return role_name
