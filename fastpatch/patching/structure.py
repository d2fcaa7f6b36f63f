"""Structure checks: does a built module hold what fastpatch's forward relies on?

One check per role, on the instance (not its code): the child modules upstream's class has (no
more, unless the class is trusted), no parameters or buffers of its own, and the types and values
fastpatch's forward reads instead of calling a child: ``attn_drop`` a plain ``nn.Dropout`` (its
``p``), ``num_heads``/``scale`` numbers, the patch projection a plain ``nn.Conv2d`` with kernel =
stride = ``patch_size``. Children fastpatch's forward calls as modules (``qkv``, ``proj``,
``norm*``, ``mlp``, ``drop_path``) may be of any class. A ``rope`` child, and a patch embedding's
``position_getter``, are judged through ``judge`` (the caller's full decision for that object).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .roles import ROLES, Role

__all__ = ["structure_reason", "is_number"]

#: ``judge(obj, role_name) -> reason or None``: the caller's decision for a rope / position getter.
Judge = Callable[[object, str], Optional[str]]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _children_reason(module: nn.Module, role: Role, trusted: bool) -> Optional[str]:
    names = {name for name, child in module._modules.items() if child is not None}
    missing = sorted(set(role.children) - names)
    extra = [] if trusted else sorted(names - set(role.children) - set(role.optional_children))
    parts = [f"missing {', '.join(missing)}"] if missing else []
    parts += [f"unexpected {', '.join(extra)}"] if extra else []
    return f"child modules differ from upstream's ({'; '.join(parts)})" if parts else None


def _own_state_reason(module: nn.Module) -> Optional[str]:
    own = [name for name, p in module._parameters.items() if p is not None]
    own += [name for name, b in module._buffers.items() if b is not None]
    return f"has parameters or buffers upstream's has not: {', '.join(own)}" if own else None


def _attention_reason(module: nn.Module, role_name: str, judge: Judge) -> Optional[str]:
    if type(module.attn_drop) is not nn.Dropout:
        return f"attn_drop is {type(module.attn_drop).__qualname__}, not torch.nn.Dropout (fastpatch reads its p)"
    num_heads, scale = getattr(module, "num_heads", None), getattr(module, "scale", None)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        return f"num_heads is {num_heads!r}, not a positive int"
    if not is_number(scale):
        return f"scale is {scale!r}, not a number"
    rope = module._modules.get("rope")
    if rope is None:
        if "rope" not in module.__dict__:
            return "has no rope attribute"
        if module.__dict__["rope"] is not None:
            return f"rope is {type(module.__dict__['rope']).__qualname__}, neither None nor a RoPE2D module"
        return None
    reason = judge(rope, "rope")
    return None if reason is None else f"rope is not a RoPE2D fastpatch can apply ({reason})"


def _rope_reason(module: nn.Module, role_name: str, judge: Judge) -> Optional[str]:
    base, f0 = getattr(module, "base", None), getattr(module, "F0", None)
    if not is_number(base) or not is_number(f0):
        return f"base={base!r}, F0={f0!r}: expected numbers"
    return None


def _patch_embed_reason(module: nn.Module, role_name: str, judge: Judge) -> Optional[str]:
    proj = module.proj
    if type(proj) is not nn.Conv2d:
        return f"proj is {type(proj).__qualname__}, not torch.nn.Conv2d (fastpatch reads its weight and bias)"
    patch = getattr(module, "patch_size", None)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else None
    if patch is None or len(patch) != 2 or tuple(proj.kernel_size) != patch or tuple(proj.stride) != patch:
        return (f"proj has kernel {tuple(proj.kernel_size)} and stride {tuple(proj.stride)}, patch_size is "
                f"{getattr(module, 'patch_size', None)!r}: expected all equal")
    if (proj.padding not in ((0, 0), "valid") or tuple(proj.dilation) != (1, 1) or proj.groups != 1
            or proj.padding_mode != "zeros" or proj.bias is None):
        return "proj has padding, dilation, groups or no bias: not a plain patch projection"
    if not isinstance(getattr(module, "flatten", None), bool):
        return f"flatten is {getattr(module, 'flatten', None)!r}, not a bool"
    if role_name == "ManyAR_PatchEmbed":
        if getattr(module, "embed_dim", None) != proj.out_channels or patch[0] != patch[1]:
            return f"embed_dim {getattr(module, 'embed_dim', None)!r} != proj.out_channels, or patches not square"
    return judge(getattr(module, "position_getter", None), "position_getter")


def _qknorm_attention_reason(module: nn.Module, role_name: str, judge: Judge) -> Optional[str]:
    """VGGT / π3 attention: fastpatch reads attn_drop's p, num_heads and the qkv Linear's shape."""
    if type(module.attn_drop) is not nn.Dropout:
        return f"attn_drop is {type(module.attn_drop).__qualname__}, not torch.nn.Dropout (fastpatch reads its p)"
    num_heads, qkv = getattr(module, "num_heads", None), module.qkv
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        return f"num_heads is {num_heads!r}, not a positive int"
    if type(qkv) is not nn.Linear or qkv.out_features != 3 * qkv.in_features or qkv.in_features % num_heads:
        return "qkv is not a Linear(C, 3C) with C divisible by num_heads"
    return None


_VALUE_CHECKS = {
    "VGGTAttention": _qknorm_attention_reason,
    "FlashAttentionRope": _qknorm_attention_reason,
    "Attention": _attention_reason,
    "CrossAttention": _attention_reason,
    "RoPE2D": _rope_reason,
    "cuRoPE2D": _rope_reason,
    "PatchEmbedDust3R": _patch_embed_reason,
    "ManyAR_PatchEmbed": _patch_embed_reason,
}


def structure_reason(module: nn.Module, role_name: str, trusted: bool, judge: Judge) -> Optional[str]:
    """Why ``module`` does not hold what fastpatch's ``role_name`` forward relies on (None: it does).

    ``trusted`` waives the "nothing extra" half (extra children, own parameters), never the values
    fastpatch's forward reads.
    """
    role = ROLES[role_name]
    reason = _children_reason(module, role, trusted) or (None if trusted else _own_state_reason(module))
    if reason is None and role_name in _VALUE_CHECKS:
        reason = _VALUE_CHECKS[role_name](module, role_name, judge)
    return reason
