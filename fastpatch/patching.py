"""Swap fastpatch's modules into DUSt3R / MASt3R / CroCo models, and back.

Two ways in, after Liger-Kernel's ``apply_*`` functions:

* :func:`patch_model` walks an already-built model and replaces every upstream
  ``PatchEmbedDust3R``, ``ManyAR_PatchEmbed``, ``Attention``, ``CrossAttention``, ``Block``,
  ``DecoderBlock`` and ``RoPE2D`` / ``cuRoPE2D`` with fastpatch's class. The replacement *adopts*
  the original's state: the very same ``Parameter`` objects, buffers, child modules, device, dtype
  and train/eval mode (no copy, so optimizer state stays valid and the ``state_dict`` is
  unchanged). :func:`unpatch_model` puts the original objects back.
* :func:`patch_dust3r` rebinds those class names (but ``Block`` / ``DecoderBlock``, see there)
  inside the upstream Python modules that are already imported, so models built or loaded
  afterwards get fastpatch modules; :func:`unpatch_dust3r` restores them.

What is replaced (never silently a different function)
-------------------------------------------------------
A module is replaced only when fastpatch's forward is known to compute the function its own
forward computes. Tools built on dust3r subclass or copy these classes under the same names
(LayerScale blocks, qk-norm attention, attention-map readers, other temperatures), so a class name
proves nothing. A module is replaced when all of these hold:

1. **Its class is upstream's code.** The class is named like an upstream class (that name is its
   *role*) and every method it resolves below ``nn.Module`` (``forward`` and the helpers it calls,
   e.g. ``RoPE2D.get_cos_sin``; ``__init__`` only for :func:`patch_dust3r`) is a known upstream
   version of that method. Methods are recognised by :func:`fingerprint`, a hash of the method's
   syntax tree read from its source file: independent of the Python version (bytecode is not), of
   formatting, comments and docstrings, and of where the code is imported from (naver/dust3r's
   ``models.blocks``, mini-dust3r, mast3r's submodules, a vendored copy), while any change to the
   code itself, or a subclass overriding a method, or a method upstream's class does not have, is
   seen. The known fingerprints (:data:`_UPSTREAM_CODE`) come from naver/croco (CroCo v2, the code
   DUSt3R and MASt3R run through their croco submodule), naver/dust3r's ``patch_embed.py`` and
   croco's ``cuRoPE2D``; each entry says where it comes from and how to recompute it.
   fastpatch's own eager classes in :mod:`fastpatch.reference` (exactly those classes) are accepted
   as they are: they are written from the same spec as fastpatch's modules.
2. **Its structure is upstream's.** Exactly upstream's child modules (names; the optional ``rope``
   may be ``None``), no parameters or buffers of its own, and the types and attributes fastpatch's
   forward relies on instead of calling the child: ``attn_drop`` a plain ``nn.Dropout`` (fastpatch
   reads its ``p``), ``rope`` ``None`` or an accepted RoPE (fastpatch reads its ``base``/``F0``), the
   patch projection a plain ``nn.Conv2d`` with kernel = stride = ``patch_size``, no padding or
   dilation, one group and a bias, and an upstream ``PositionGetter``. Upstream's pure-torch
   ``RoPE2D`` ignores ``F0``, so it is accepted with ``F0 == 1`` only. Children fastpatch's forward
   calls as modules (``qkv``, ``proj``, ``norm*``, ``mlp``, ``drop_path``...) may be of any class.
3. ``forward`` is not overridden on the instance.

Anything else that has one of the names is left alone and listed, with the reason, in
:attr:`PatchReport.left_alone`; its children are still visited, so the upstream ``Attention``
inside a LayerScale block fork is replaced while the block is not. ``trust=`` opts classes in that
the user knows compute upstream's function: it waives checks 1 and the "nothing extra" half of 2,
never the attributes fastpatch's forward reads.

Trade-off: a correct fork whose code differs from upstream's only in form (renamed locals, a
reordered expression) is left alone until trusted; a new upstream release is left alone until its
fingerprints are added. Both cost speed, never correctness. The fingerprint reads the source file
(``inspect.getsource``): a class whose source cannot be read (compiled only, defined in a REPL) is
left alone, and a source file edited after import is judged by its new text.

dust3r itself is never imported here.
"""
from __future__ import annotations

import ast
import copy
import functools
import hashlib
import inspect
import logging
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from . import reference
from .backend import BACKENDS, reset_backend_override, set_backend_override

__all__ = ["PatchReport", "patch_model", "unpatch_model", "patch_dust3r", "unpatch_dust3r", "is_patched",
           "fingerprint"]

logger = logging.getLogger("fastpatch")

# The attribute under which a fastpatch module keeps the upstream module it replaced. Stored in
# ``__dict__`` directly so it is neither a child module nor part of the state_dict.
_ORIGINAL = "_fastpatch_original"


# ----------------------------------------------------------------------------------------------
# Recognising upstream's code
# ----------------------------------------------------------------------------------------------
# Syntax-tree fields that do not change what code computes (``ctx`` follows from the syntax,
# ``kind`` is the u"" prefix) or that only some Python versions have when empty.
_IGNORED_FIELDS = frozenset({"ctx", "kind", "type_comment"})


def _canonical(node) -> str:
    """A fixed text dump of a syntax tree: node types and non-empty fields, no positions."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_canonical(value)}" for name, value in ast.iter_fields(node)
                  if name not in _IGNORED_FIELDS and value is not None and value != []]
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    return f"{type(node).__name__}:{node!r}"


def fingerprint(function: Callable) -> Optional[str]:
    """Fingerprint of a function's code, as 16 hex digits (sha256), or None if its source cannot be read.

    Hashes the function's syntax tree, parsed from its source file: signature (argument names and
    defaults), decorators and body. Ignores the function's name, its docstring, comments, blank
    lines, spacing and line numbers. The tree is dumped by a fixed walker that drops empty fields,
    so the same source gives the same fingerprint on Python 3.9 to 3.13, unlike bytecode. Accepts
    plain functions, methods, ``staticmethod`` / ``classmethod`` objects and properties (their getter);
    anything else (a builtin, a ``functools.partial``, a class) gets None.
    """
    function = getattr(function, "__func__", None) or getattr(function, "fget", None) or function
    return _function_fingerprint(function) if inspect.isfunction(function) else None


@functools.lru_cache(maxsize=None)
def _function_fingerprint(function: Callable) -> Optional[str]:
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None  # a lambda or an assignment: no def to hash
    node = tree.body[0]
    node.name = ""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:]
    return hashlib.sha256(_canonical(node).encode()).hexdigest()[:16]


# Role (upstream class name) -> method name -> fingerprints of upstream's versions of that method,
# for the methods an instance of that class resolves below nn.Module. Sources:
#   croco:  naver/croco models/blocks.py and models/pos_embed.py, CroCo v2 (RoPE), as in naver/croco
#           @403dc35 and in the croco submodule dust3r and mast3r run; identical in mini-dust3r
#           0.1.2 (mini_dust3r/croco/blocks.py, mini_dust3r/croco/pos_embed.py).
#   dust3r: naver/dust3r dust3r/patch_embed.py @c4f675b; identical in mini-dust3r 0.1.2
#           (mini_dust3r/patch_embed.py). Its classes inherit __init__ / _init_weights from croco's PatchEmbed.
#   curope: naver/croco models/curope/curope2d.py (cuRoPE2D, the compiled RoPE2D croco's pos_embed
#           binds to the name RoPE2D when the extension is built).
# Recompute any entry with fingerprint() on the installed class, e.g.
#   python -c "from mini_dust3r.croco.blocks import Attention as A
#              from fastpatch.patching import fingerprint; print(fingerprint(A.forward))"
# naver/croco models/pos_embed.py @2f3d5d5 ("update RoPE/cuRoPE", in d7de070, the croco dust3r 3cc8c88
# and mast3r pin): RoPE2D.get_cos_sin multiplies the inverse frequencies by F0. The earlier version ignores F0.
_F0_GET_COS_SIN = "1dd822e634ce2645"
_UPSTREAM_CODE: Dict[str, Dict[str, FrozenSet[str]]] = {
    "Attention": {  # croco
        "__init__": frozenset({"b230fe21ba580052"}),
        "forward": frozenset({"ad99cd5220604bf2"}),
    },
    "CrossAttention": {  # croco
        "__init__": frozenset({"e06e4571854ff3db"}),
        "forward": frozenset({"3aecfdd7d43c49f1"}),
    },
    "Block": {  # croco
        "__init__": frozenset({"6cdf73d87c3df98c"}),
        "forward": frozenset({"fa6fb08ddd8e9cbd"}),
    },
    "DecoderBlock": {  # croco
        "__init__": frozenset({"6f0266d443c99722"}),
        "forward": frozenset({"2d9f91950f7c71b2"}),
    },
    "PatchEmbedDust3R": {  # dust3r; __init__ and _init_weights: croco's PatchEmbed
        "__init__": frozenset({"0266312fe22fa9c1"}),
        "_init_weights": frozenset({"f6c37b32d6f7df08"}),
        "forward": frozenset({"b9dfc1f100c81f76"}),
    },
    "ManyAR_PatchEmbed": {  # dust3r; _init_weights: croco's PatchEmbed
        "__init__": frozenset({"8d4cc78784a2f6d3"}),
        "_init_weights": frozenset({"f6c37b32d6f7df08"}),
        "forward": frozenset({"39805fd868a20da4"}),
    },
    "RoPE2D": {  # croco's pure-torch RoPE2D
        "__init__": frozenset({"220f7cec826d37cf"}),
        "get_cos_sin": frozenset({"2ab20a402436b5b2", _F0_GET_COS_SIN}),
        "rotate_half": frozenset({"468f920013d298ca"}),
        "apply_rope1d": frozenset({"d207c194e8edf4a9"}),
        "forward": frozenset({"6d245edcc520a781"}),
    },
    "cuRoPE2D": {  # curope
        "__init__": frozenset({"e226379cf0383392"}),
        "forward": frozenset({"083930d961a2a2ce"}),
    },
    "PositionGetter": {  # croco; not a module: the patch embeddings' position_getter attribute
        "__init__": frozenset({"f713f470ea18a08a"}),
        "__call__": frozenset({"c6728b06840e1955"}),
    },
}

# The nn.Module roles: what patch_model replaces, and the fastpatch class that replaces each.
_MODULE_ROLES = ("PatchEmbedDust3R", "ManyAR_PatchEmbed", "RoPE2D", "cuRoPE2D", "Attention", "CrossAttention",
                 "Block", "DecoderBlock")


def _fastpatch_classes() -> Dict[str, type]:
    import fastpatch

    names = {role: role for role in _MODULE_ROLES}
    names["cuRoPE2D"] = "RoPE2D"  # upstream's CUDA RoPE extension class
    return {role: getattr(fastpatch, ours) for role, ours in names.items()}


# fastpatch's eager classes, written from the spec: accepted as they are (exactly these classes).
_REFERENCE_CLASSES: Dict[str, type] = {
    "PatchEmbedDust3R": reference.PatchEmbedDust3R,
    "ManyAR_PatchEmbed": reference.ManyAR_PatchEmbed,
    "RoPE2D": reference.RoPE2D,
    "Attention": reference.Attention,
    "CrossAttention": reference.CrossAttention,
    "Block": reference.Block,
    "DecoderBlock": reference.DecoderBlock,
}


# Methods that only change how a module is shown, never what it computes: not judged. (beartype,
# which mini-dust3r turns on for its package, stores its caches in a __sizeof__ it adds to classes.)
_PRESENTATION_METHODS = frozenset({"__repr__", "__str__", "__format__", "__dir__", "__sizeof__", "extra_repr"})


def _methods(cls: type) -> Dict[str, Callable]:
    """Every method a ``cls`` instance resolves from classes other than ``nn.Module`` and ``object``
    (but those in :data:`_PRESENTATION_METHODS`)."""
    methods: Dict[str, Callable] = {}
    seen = set()
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            continue
        for name, value in vars(klass).items():
            if name in seen:
                continue  # shadowed by a class earlier in the MRO
            seen.add(name)
            if name not in _PRESENTATION_METHODS and (
                    callable(value) or isinstance(value, (staticmethod, classmethod, property))):
                methods[name] = value
    return methods


def _where(cls: type, name: str, method: Callable) -> str:
    function = getattr(method, "__func__", None) or getattr(method, "fget", None) or method
    return f"{getattr(function, '__module__', cls.__module__)}.{getattr(function, '__qualname__', name)}"


def _code_reason(cls: type, role: str, with_init: bool) -> Optional[str]:
    """Why ``cls`` is not upstream's code for ``role`` (None if it is).

    ``with_init``: judge ``__init__`` too (class-level rebinding replaces construction; a built
    instance is judged by its structure instead).
    """
    known = _UPSTREAM_CODE[role]
    methods = _methods(cls)
    if not with_init:
        methods.pop("__init__", None)
    entry = "__call__" if role == "PositionGetter" else "forward"
    if entry not in methods:
        return f"{cls.__qualname__} defines no {entry} of its own"
    extra = sorted(set(methods) - set(known))
    if extra:
        return f"{cls.__qualname__} defines {', '.join(extra)}, which upstream's {role} does not"
    if with_init and "__init__" not in methods:
        return f"{cls.__qualname__} has no __init__ of upstream's {role}"
    for name in sorted(methods, key=lambda n: (n != entry, n)):
        code = fingerprint(methods[name])
        if code is None:
            return f"the source of {_where(cls, name, methods[name])} cannot be read to check it is upstream's"
        if code not in known[name]:
            return (f"{name} is not upstream's: {_where(cls, name, methods[name])} (pass trust=[its class] if it "
                    f"computes upstream's function)")
    return None


# ----------------------------------------------------------------------------------------------
# Recognising upstream's structure
# ----------------------------------------------------------------------------------------------
def _children_reason(module: nn.Module, required: Sequence[str], optional: Sequence[str] = (),
                     allow_extra: bool = False) -> Optional[str]:
    names = {name for name, child in module._modules.items() if child is not None}
    missing = sorted(set(required) - names)
    extra = [] if allow_extra else sorted(names - set(required) - set(optional))
    parts = [f"missing {', '.join(missing)}"] if missing else []
    parts += [f"unexpected {', '.join(extra)}"] if extra else []
    return f"child modules differ from upstream's ({'; '.join(parts)})" if parts else None


def _own_state_reason(module: nn.Module) -> Optional[str]:
    own = [name for name, p in module._parameters.items() if p is not None]
    own += [name for name, b in module._buffers.items() if b is not None]
    return f"has parameters or buffers upstream's has not: {', '.join(own)}" if own else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _qualname(value) -> str:
    return type(value).__qualname__


def _trusted_roles(trust: Iterable[type]) -> Dict[type, str]:
    """``trust`` classes -> their role: their own name, or the nearest base class's that is a role."""
    roles: Dict[type, str] = {}
    for cls in trust:
        if not isinstance(cls, type):
            raise TypeError(f"trust expects classes, got {cls!r}")
        role = next((klass.__name__ for klass in cls.__mro__ if klass.__name__ in _MODULE_ROLES), None)
        if role is None:
            raise ValueError(f"trust: {cls.__qualname__} is neither named like nor derived from a class fastpatch "
                             f"replaces ({', '.join(_MODULE_ROLES)})")
        roles[cls] = role
    return roles


class _Recogniser:
    """Decides, for one patch, whether fastpatch's class computes what a module computes (module docstring)."""

    def __init__(self, trust: Iterable[type] = ()):
        self.trusted = _trusted_roles(trust)
        self.fastpatch_classes = frozenset(_fastpatch_classes().values())

    def role(self, module: nn.Module) -> Optional[str]:
        """The upstream class ``module`` stands for (its class name, or its trusted role), or None."""
        cls = type(module)
        if cls in self.trusted:
            return self.trusted[cls]
        return cls.__name__ if cls.__name__ in _MODULE_ROLES else None

    def reason(self, module: nn.Module) -> Optional[str]:
        """Why fastpatch's class for ``module``'s role may compute something else (None: it computes the same)."""
        cls = type(module)
        if cls in self.fastpatch_classes:
            return None
        role = self.role(module)
        if role is None:
            return f"{cls.__qualname__} is not a class fastpatch replaces"
        if "forward" in module.__dict__:
            return "forward is overridden on the instance"
        trusted = cls in self.trusted
        if not trusted and cls is not _REFERENCE_CLASSES.get(role):
            reason = _code_reason(cls, role, with_init=False)
            if reason is not None:
                return reason
        return _STRUCTURE_CHECKS[role](self, module, trusted)

    # Structure checks, one per role: (module, trusted) -> reason or None.
    def _block(self, module: nn.Module, trusted: bool) -> Optional[str]:
        return (_children_reason(module, ("norm1", "attn", "norm2", "mlp", "drop_path"), allow_extra=trusted)
                or (None if trusted else _own_state_reason(module)))

    def _decoder_block(self, module: nn.Module, trusted: bool) -> Optional[str]:
        children = ("norm1", "attn", "cross_attn", "norm2", "norm3", "mlp", "norm_y", "drop_path")
        return (_children_reason(module, children, allow_extra=trusted)
                or (None if trusted else _own_state_reason(module)))

    def _attention_with(self, projections: Tuple[str, ...], module: nn.Module, trusted: bool) -> Optional[str]:
        reason = (_children_reason(module, projections + ("attn_drop", "proj", "proj_drop"), ("rope",), trusted)
                  or (None if trusted else _own_state_reason(module)))
        if reason is not None:
            return reason
        if type(module.attn_drop) is not nn.Dropout:
            return f"attn_drop is {_qualname(module.attn_drop)}, not torch.nn.Dropout (fastpatch reads its p)"
        num_heads, scale = getattr(module, "num_heads", None), getattr(module, "scale", None)
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
            return f"num_heads is {num_heads!r}, not a positive int"
        if not _is_number(scale):
            return f"scale is {scale!r}, not a number"
        rope = module._modules.get("rope")
        if rope is None:
            if "rope" not in module.__dict__:
                return "has no rope attribute"
            if module.__dict__["rope"] is not None:
                return f"rope is {_qualname(module.__dict__['rope'])}, neither None nor a RoPE2D module"
            return None
        reason = self.reason(rope)
        return None if reason is None else f"rope is not a RoPE2D fastpatch can apply ({reason})"

    def _attention(self, module: nn.Module, trusted: bool) -> Optional[str]:
        return self._attention_with(("qkv",), module, trusted)

    def _cross_attention(self, module: nn.Module, trusted: bool) -> Optional[str]:
        return self._attention_with(("projq", "projk", "projv"), module, trusted)

    def _rope(self, module: nn.Module, trusted: bool) -> Optional[str]:
        reason = _children_reason(module, (), allow_extra=trusted) or (None if trusted else _own_state_reason(module))
        if reason is not None:
            return reason
        base, f0 = getattr(module, "base", None), getattr(module, "F0", None)
        if not _is_number(base) or not _is_number(f0):
            return f"base={base!r}, F0={f0!r}: expected numbers"
        if (type(module).__name__ == "RoPE2D" and type(module) is not reference.RoPE2D and f0 != 1
                and fingerprint(type(module).get_cos_sin) != _F0_GET_COS_SIN):
            return f"F0={f0!r}: upstream's torch RoPE2D ignores F0, fastpatch applies it"
        return None

    def _position_getter_reason(self, getter, trusted: bool) -> Optional[str]:
        cls = type(getter)
        if trusted or cls is reference.PositionGetter:
            return None
        if cls.__name__ != "PositionGetter":
            return f"position_getter is {cls.__qualname__}, not upstream's PositionGetter"
        reason = _code_reason(cls, "PositionGetter", with_init=False)
        return None if reason is None else f"position_getter: {reason}"

    def _patch_embed_with(self, many_ar: bool, module: nn.Module, trusted: bool) -> Optional[str]:
        reason = (_children_reason(module, ("proj", "norm"), allow_extra=trusted)
                  or (None if trusted else _own_state_reason(module)))
        if reason is not None:
            return reason
        proj = module.proj
        if type(proj) is not nn.Conv2d:
            return f"proj is {_qualname(proj)}, not torch.nn.Conv2d (fastpatch reads its weight and bias)"
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
        if many_ar and (getattr(module, "embed_dim", None) != proj.out_channels or patch[0] != patch[1]):
            return f"embed_dim {getattr(module, 'embed_dim', None)!r} != proj.out_channels, or patches not square"
        return self._position_getter_reason(getattr(module, "position_getter", None), trusted)

    def _patch_embed(self, module: nn.Module, trusted: bool) -> Optional[str]:
        return self._patch_embed_with(False, module, trusted)

    def _many_ar_patch_embed(self, module: nn.Module, trusted: bool) -> Optional[str]:
        return self._patch_embed_with(True, module, trusted)


_STRUCTURE_CHECKS: Dict[str, Callable[[_Recogniser, nn.Module, bool], Optional[str]]] = {
    "PatchEmbedDust3R": _Recogniser._patch_embed,
    "ManyAR_PatchEmbed": _Recogniser._many_ar_patch_embed,
    "RoPE2D": _Recogniser._rope,
    "cuRoPE2D": _Recogniser._rope,
    "Attention": _Recogniser._attention,
    "CrossAttention": _Recogniser._cross_attention,
    "Block": _Recogniser._block,
    "DecoderBlock": _Recogniser._decoder_block,
}
@dataclass
class PatchReport:
    """What :func:`patch_model` did: module paths replaced, per class, and those left alone."""

    replaced: Dict[str, List[str]] = field(default_factory=dict)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def num_replaced(self) -> int:
        return sum(len(paths) for paths in self.replaced.values())

    def __str__(self) -> str:
        counts = ", ".join(f"{len(p)} {name}" for name, p in sorted(self.replaced.items())) or "nothing"
        text = f"fastpatch replaced {counts}"
        if self.left_alone:
            text += f"; left alone {len(self.left_alone)}: " + ", ".join(f"{p} ({r})" for p, r in self.left_alone)
        return text


class _BackendScope:
    """Forward pre/post hooks that run a module's forward under ``use_backend(backend)``.

    A per-thread stack of override tokens makes nested and re-entrant calls safe; the post hook is
    registered with ``always_call=True`` so an exception in forward still restores the choice (and
    does nothing when an earlier pre hook raised before ``enter`` ran). Only a plain
    ``threading.local`` read and list mutation: ``torch.compile`` traces both hooks without graph breaks.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self.local = threading.local()

    def _tokens(self) -> List[int]:
        tokens = getattr(self.local, "tokens", None)
        if tokens is None:
            tokens = self.local.tokens = []
        return tokens

    def enter(self, module, args) -> None:
        self._tokens().append(set_backend_override(self.backend))

    def exit(self, module, args, output) -> None:
        tokens = self._tokens()
        if tokens:
            reset_backend_override(tokens.pop())

    def __getstate__(self) -> dict:
        return {"backend": self.backend}  # the per-thread tokens are transient (and threading.local does not pickle)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["backend"])


def _adopt(original: nn.Module, cls: type, backend: str) -> nn.Module:
    """A ``cls`` instance sharing ``original``'s parameters, buffers, children and attributes.

    The module-level dicts (``_parameters``, ``_modules``, hooks...) are copied shallowly so the
    new module can later hold replaced children while the original keeps its own; the tensors
    and child objects inside them are shared, not copied.
    """
    new = cls.__new__(cls)
    for key, value in original.__dict__.items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, dict) else value
    new.__dict__[_ORIGINAL] = original
    if backend != "auto":
        scope = _BackendScope(backend)
        new.register_forward_pre_hook(scope.enter)
        new.register_forward_hook(scope.exit, always_call=True)
    return new


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` or any submodule is a fastpatch replacement made by :func:`patch_model`."""
    return any(_ORIGINAL in m.__dict__ for m in model.modules())


def patch_model(model: nn.Module, *, backend: str = "auto", trust: Iterable[type] = ()) -> nn.Module:
    """Replace the upstream DUSt3R-family modules inside ``model`` with fastpatch's, in place.

    A module is replaced only when fastpatch's forward is known to compute what its own forward
    computes: its class is upstream's code (by :func:`fingerprint`, or one of
    :mod:`fastpatch.reference`'s classes), it has exactly upstream's children and no parameters of
    its own, and ``forward`` is not overridden on the instance (rules in the module docstring). Any
    other module named like an upstream class (a LayerScale ``Block``, a qk-norm ``Attention``, a
    subclass whose ``forward`` returns attention maps...) is left alone, with the reason in the
    report; the modules inside it are still visited and replaced where they are upstream's.

    Args:
        model: a built model (e.g. ``AsymmetricCroCo3DStereo.from_pretrained(...)``, a MASt3R model,
            :class:`fastpatch.reference.Dust3RBackbone`, or a single block).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``: the backend the replaced modules use
            (see :mod:`fastpatch.backend`); ``"auto"`` follows the global choice at each call,
            anything else pins it with forward hooks on each replaced module.
        trust: classes you know compute what upstream's class computes (e.g. a subclass whose
            ``forward`` only logs, then calls upstream's). Instances of exactly these classes are
            replaced without checking their code or looking for extra children and parameters; the
            attributes fastpatch's forward reads (``attn_drop`` a ``nn.Dropout``, ``rope``'s
            ``base``/``F0``, the patch ``proj`` convolution...) are still checked. Each class stands for
            the upstream class it is named like or derives from (``class MyAttention(Attention)``
            is replaced by :class:`fastpatch.Attention`).

    Returns:
        The patched model: ``model`` itself, unless ``model`` is itself a replaced module, in which
        case its replacement. Parameters are shared, never copied; patching twice is a no-op.
        ``model.fastpatch_report`` (a :class:`PatchReport`) says what was replaced and what was left
        alone, and why; the same summary is logged at INFO level on the ``fastpatch`` logger.

    Raises:
        ValueError: an unknown ``backend``, or a ``trust`` class that neither is named like nor
            derives from a class fastpatch replaces.
        TypeError: a ``trust`` entry that is not a class.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    recogniser = _Recogniser(trust)
    classes = _fastpatch_classes()
    report = PatchReport()
    replacements: Dict[int, nn.Module] = {}  # id(original) -> replacement: shared modules stay shared

    def replacement(module: nn.Module, path: str) -> nn.Module:
        if id(module) in replacements:
            return replacements[id(module)]
        role = recogniser.role(module)
        new = module
        if role is not None and type(module) not in recogniser.fastpatch_classes:
            reason = recogniser.reason(module)
            if reason is None:
                new = _adopt(module, classes[role], backend)
                report.replaced.setdefault(role, []).append(path or "<root>")
            else:
                report.left_alone.append((path or "<root>", f"{role}: {reason}"))
        replacements[id(module)] = new
        visit(new, path)
        return new

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):
            if child is not None:
                parent._modules[child_name] = replacement(child, f"{prefix}.{child_name}" if prefix else child_name)

    patched = replacement(model, "")
    patched.__dict__["fastpatch_report"] = report
    logger.info("%s", report)
    return patched


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: put every original module object back, with the current state.

    Parameters and buffers that were re-assigned while patched (e.g. by ``.to()`` with
    ``torch.__future__.set_overwrite_module_params_on_conversion(True)``), child modules and the
    train/eval flag are carried back to the originals. Returns the unpatched model (``model``,
    or the original object if ``model`` itself was a replacement).
    """
    restored: Dict[int, nn.Module] = {}

    def restore(module: nn.Module) -> nn.Module:
        if id(module) in restored:
            return restored[id(module)]
        for child_name, child in list(module._modules.items()):
            if child is not None:
                module._modules[child_name] = restore(child)
        original = module.__dict__.get(_ORIGINAL)
        result = module
        if original is not None:
            original._parameters.update(module._parameters)
            original._buffers.update(module._buffers)
            original._modules.update(module._modules)
            original.training = module.training
            result = original
        restored[id(module)] = result
        return result

    result = restore(model)
    model.__dict__.pop("fastpatch_report", None)
    result.__dict__.pop("fastpatch_report", None)
    return result


# ----------------------------------------------------------------------------------------------
# Class-level patching (before construction)
# ----------------------------------------------------------------------------------------------
def _constructor_takes(cls: type, *names: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


# Class name -> the constructor arguments an upstream class of that name must take. Block and
# DecoderBlock are not rebound: their forward is plain torch either way, and upstream's __init__
# builds its attention by looking up the (rebound) names Attention / CrossAttention in its own
# module, so the attention inside is fastpatch's anyway. Rebinding them would also swap whatever
# Mlp, DropPath or attention class a fork's module builds for fastpatch's.
_CLASS_SIGNATURES: Dict[str, Tuple[str, ...]] = {
    "PatchEmbedDust3R": ("img_size", "patch_size", "in_chans", "embed_dim"),
    "ManyAR_PatchEmbed": ("img_size", "patch_size", "in_chans", "embed_dim"),
    "RoPE2D": ("freq", "F0"),
    "Attention": ("dim", "rope", "num_heads", "qkv_bias"),
    "CrossAttention": ("dim", "rope", "num_heads", "qkv_bias"),
}

# (module object, attribute name, original class) for each rebinding made by patch_dust3r.
_class_patches: List[Tuple[object, str, type]] = []


def _is_fastpatch_module(name: str) -> bool:
    return name == "fastpatch" or name.startswith("fastpatch.")


def _upstream_class(module: object, name: str, trusted: Dict[type, str]) -> Tuple[Optional[type], Optional[str]]:
    """(the upstream class bound to ``name`` in ``module``, None) or (None, why it is not rebound, if worth saying)."""
    value = module.__dict__.get(name) if hasattr(module, "__dict__") else None
    if not isinstance(value, type) or not issubclass(value, nn.Module) or value.__name__ != name:
        return None, None
    if _is_fastpatch_module(value.__module__) or not _constructor_takes(value, *_CLASS_SIGNATURES[name]):
        return None, None
    reason = None if value in trusted else _code_reason(value, name, with_init=True)
    return (value, None) if reason is None else (None, reason)


def patch_dust3r(*, trust: Iterable[type] = ()) -> List[str]:
    """Rebind DUSt3R-family classes in every already-imported upstream module to fastpatch's.

    Scans ``sys.modules`` for module-level names ``PatchEmbedDust3R``, ``ManyAR_PatchEmbed``,
    ``RoPE2D``, ``Attention`` and ``CrossAttention`` bound to classes with upstream's constructor
    arguments (e.g. ``Attention`` must take ``rope``, so timm's is not touched) whose code is
    upstream's: every method, ``__init__`` included, has an upstream :func:`fingerprint` (a fork
    with its own ``forward``, ``__init__`` or helper keeps its name). Models constructed afterwards
    (``from_pretrained``, ``load_model``) build fastpatch modules; upstream's ``Block`` and
    ``DecoderBlock`` stay, holding fastpatch attention. Import the upstream model code first.
    Idempotent. Names left alone are logged at INFO level with the reason.

    Args:
        trust: classes to rebind even though their code is not upstream's (you know they build
            and compute what upstream's class does); see :func:`patch_model`.

    Returns:
        ``"module.Name"`` for each rebinding made.
    """
    trusted = _trusted_roles(trust)
    classes = _fastpatch_classes()
    done, skipped = [], []
    for module_name, module in list(sys.modules.items()):
        if module is None or _is_fastpatch_module(module_name):
            continue
        for name in _CLASS_SIGNATURES:
            original, reason = _upstream_class(module, name, trusted)
            if original is not None:
                _class_patches.append((module, name, original))
                setattr(module, name, classes[name])
                done.append(f"{module_name}.{name}")
            elif reason is not None:
                skipped.append(f"{module_name}.{name} ({reason})")
    if done:
        logger.info("fastpatch rebound %d upstream classes: %s", len(done), ", ".join(done))
    if skipped:
        logger.info("fastpatch left %d classes alone: %s", len(skipped), "; ".join(skipped))
    return done


def unpatch_dust3r() -> None:
    """Undo every :func:`patch_dust3r` rebinding (models already built keep their modules)."""
    while _class_patches:
        module, name, original = _class_patches.pop()
        setattr(module, name, original)
