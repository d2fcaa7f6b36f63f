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

from dataclasses import dataclass
from typing import Dict, FrozenSet, Tuple

__all__ = ["Role", "ROLES", "MODULE_ROLES", "POSITION_GETTER", "FASTPATCH_CLASS_NAMES"]


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
