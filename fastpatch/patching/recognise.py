"""The decision: may fastpatch's class replace this module, and on what grounds?

A module named like an upstream class (its *role*, :mod:`fastpatch.patching.roles`), or an
instance of a class passed in ``trust=``, is accepted in one of three ways, else left alone with a
reason:

* **known code**: every method its forward runs (:mod:`fastpatch.patching.forward_code`) is a
  known upstream version (:mod:`fastpatch.patching.known_code`); fastpatch's own eager classes in
  :mod:`fastpatch.reference` count as known (written from the same spec);
* **verified by probe**: otherwise, when its forward's signature and attribute reads fit the
  role, and the original and the replacement agree on the probes
  (:mod:`fastpatch.patching.probes`) — never with an active dropout, whose masks cannot be compared;
* **trusted**: the class is in ``trust=``: code, reads and extra children are not checked.

Every route also checks the instance's structure (:mod:`fastpatch.patching.structure`); a module
whose ``forward`` is overridden on the instance is left alone. Decisions that do not depend on the
instance (code, reads) are cached per class; probe results are cached per class and configuration
for one :class:`Recogniser`, so a ViT-L DUSt3R probes each distinct class once.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, Optional, Tuple

import torch
from torch import nn

from .. import reference
from .fingerprints import fingerprint
from .forward_code import forward_code
from .known_code import KNOWN_DIFFERENT, KNOWN_IGNORED_ATTRIBUTES, KNOWN_METHODS
from .probes import active_dropout, probe_reason
from .roles import FASTPATCH_CLASS_NAMES, MODULE_ROLES, POSITION_GETTER, ROLES, Role, refine_role
from .structure import structure_reason

__all__ = ["KNOWN", "PROBED", "TRUSTED", "Decision", "Recogniser", "trusted_roles", "code_reason",
           "fastpatch_classes", "known_ignored_attributes"]

KNOWN, PROBED, TRUSTED = "known code", "verified by probe", "trusted"

# Roles whose forward applies RoPE itself (their probes allow for float32 RoPE angles).
_ROPE_ROLES = frozenset({"Attention", "CrossAttention", "RoPE2D", "cuRoPE2D", "VGGTAttention",
                         "FlashAttentionRope"})

# fastpatch's eager classes, written from the spec: accepted as they are (exactly these classes).
_REFERENCE_CLASSES: Dict[str, type] = {
    "PatchEmbedDust3R": reference.PatchEmbedDust3R,
    "ManyAR_PatchEmbed": reference.ManyAR_PatchEmbed,
    "RoPE2D": reference.RoPE2D,
    "Attention": reference.Attention,
    "CrossAttention": reference.CrossAttention,
    "Block": reference.Block,
    "DecoderBlock": reference.DecoderBlock,
    "PositionGetter": reference.PositionGetter,
}


def fastpatch_classes() -> Dict[str, type]:
    """Role -> the fastpatch class replacing it."""
    import fastpatch

    return {role: getattr(fastpatch, name) for role, name in FASTPATCH_CLASS_NAMES.items()}


@dataclass(frozen=True)
class Decision:
    """The verdict on one module: ``how`` it was accepted (None: left alone, ``reason`` says why),
    and the instance attributes that tell the replacement what the original ignores."""

    role: str
    how: Optional[str]
    reason: Optional[str] = None
    semantics: Dict[str, object] = field(default_factory=dict)


def trusted_roles(trust: Iterable[type]) -> Dict[type, str]:
    """``trust`` classes -> their role: their own name, or the nearest base class's that is a role."""
    roles: Dict[type, str] = {}
    for cls in trust:
        if not isinstance(cls, type):
            raise TypeError(f"trust expects classes, got {cls!r}")
        role = next((klass.__name__ for klass in cls.__mro__ if klass.__name__ in MODULE_ROLES), None)
        if role is None:
            raise ValueError(f"trust: {cls.__qualname__} is neither named like nor derived from a class fastpatch "
                             f"replaces ({', '.join(MODULE_ROLES)})")
        roles[cls] = role
    return roles


# ----------------------------------------------------------------------------------------------
# Per-class analysis of the code (cached through forward_code)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _signature_reason(cls: type, role: Role) -> Optional[str]:
    """Why ``cls``'s forward does not take the role's arguments (None: it does)."""
    entry = getattr(cls, role.entry)
    try:
        parameters = list(inspect.signature(entry).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        return f"{role.entry}'s signature cannot be read"
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters)
    others = [p.name for p in parameters if p.kind in (p.VAR_POSITIONAL, p.KEYWORD_ONLY)]
    if len(positional) != len(role.arguments) or others or (var_keyword and not role.var_keyword):
        names = ", ".join(p.name for p in parameters)
        return f"{role.entry} takes ({names}); upstream's takes ({', '.join(role.arguments)})"
    defaults = [p for p in positional if p.default is not p.empty]
    optional = {role.arguments[i] for i, p in enumerate(positional) if p.default is None}
    if len(defaults) != len(optional) or not optional <= set(role.optional_arguments):
        return f"{role.entry} gives defaults to ({', '.join(p.name for p in defaults)}), which upstream's has not"
    return None


@functools.lru_cache(maxsize=None)
def _optional_positions(cls: type, role: Role) -> bool:
    """True when every position parameter of the forward defaults to None."""
    if not role.optional_arguments:
        return False
    parameters = list(inspect.signature(getattr(cls, role.entry)).parameters.values())[1:]
    return all(parameters[role.arguments.index(name)].default is None for name in role.optional_arguments)


def code_reason(cls: type, role_name: str, with_init: bool = False) -> Optional[str]:
    """Why ``cls``'s code is not a known upstream version for ``role_name`` (None: it is).

    Only the methods its entry (forward) runs are judged, plus ``__init__`` when ``with_init``
    (class-level patching replaces construction).
    """
    role = POSITION_GETTER if role_name == "PositionGetter" else ROLES[role_name]
    code = forward_code(cls, role.entry)
    if code.failure is not None:
        return code.failure
    methods = [(name, owner, raw) for (name, owner), raw in code.methods.items()]
    if with_init:
        owner = next((k for k in cls.__mro__ if "__init__" in vars(k)), None)
        if owner is None or owner is nn.Module or owner is object:
            return f"{cls.__qualname__} has no __init__ of upstream's {role_name}"
        methods.append(("__init__", owner, vars(owner)["__init__"]))
    for name, owner, raw in methods:  # an override and the upstream method it calls through super() both count
        known = KNOWN_METHODS.get((role_name, name))
        code_print = fingerprint(raw)
        if known is None:
            return f"its forward calls {name}, which upstream's {role_name} does not have"
        if code_print is None:
            return f"the source of {owner.__qualname__}.{name} cannot be read to check it is upstream's"
        if code_print not in known:
            return f"{name} is not a known upstream version ({owner.__module__}.{owner.__qualname__})"
    return None


def _known_difference(cls: type, role: Role) -> Optional[str]:
    """Why a method forward runs is a public version known to compute something else (None if none is)."""
    code = forward_code(cls, role.entry)
    for raw in code.methods.values():
        reason = KNOWN_DIFFERENT.get(fingerprint(raw) or "")
        if reason is not None:
            return reason
    return None


def known_ignored_attributes(cls: type, role: Role) -> FrozenSet[str]:
    """Attributes a known upstream version reads only in a branch that never runs (known_code.py)."""
    entry = fingerprint(getattr(cls, role.entry))
    return KNOWN_IGNORED_ATTRIBUTES.get(entry, frozenset())


def _reads_reason(module: object, cls: type, role: Role) -> Optional[str]:
    """Attributes the forward reads that fastpatch's ignores (memo caches excepted)."""
    code = forward_code(cls, role.entry)
    if code.failure is not None:
        return code.failure
    state = vars(module)
    extra = sorted(name for name in code.reads - role.reads
                   if not (isinstance(state.get(name), dict) and "cache" in name.lower()))
    if extra:
        return (f"its forward reads self.{', self.'.join(extra)}, which fastpatch's {role.name} ignores "
                f"(a change to it after patching would not be followed)")
    return None


# ----------------------------------------------------------------------------------------------
# Per-instance decision
# ----------------------------------------------------------------------------------------------
def _plain(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def _configuration(module: nn.Module) -> Tuple:
    """What a probe's result can depend on, besides the class: the module tree's classes, plain
    attribute values, parameter/buffer shapes (not values: probes use their own)."""
    parts = []
    for path, sub in module.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in vars(sub).items()
                             if not k.startswith("_") and _plain(v)))
        params = tuple((k, None if p is None else tuple(p.shape)) for k, p in sub._parameters.items())
        buffers = tuple((k, None if b is None else tuple(b.shape)) for k, b in sub._buffers.items())
        getter = getattr(sub, "position_getter", None)
        parts.append((path, type(sub), attrs, params, buffers, type(getter)))
    return tuple(parts)


class Recogniser:
    """Decides, for one patch, whether fastpatch's class computes what a module computes (module docstring)."""

    def __init__(self, trust: Iterable[type] = ()):
        self.trusted = trusted_roles(trust)
        self.classes = fastpatch_classes()
        self.fastpatch_types = tuple(set(self.classes.values()))
        self._probed: Dict[Tuple, Optional[str]] = {}
        self.decisions: Dict[int, Decision] = {}

    def role(self, module: object) -> Optional[str]:
        """The upstream class ``module`` stands for: its trusted role, else the name of its class or of
        the nearest base class named like an upstream class (None if there is none)."""
        cls = type(module)
        if cls in self.trusted:
            return self.trusted[cls]
        name = next((klass.__name__ for klass in cls.__mro__ if klass.__name__ in MODULE_ROLES), None)
        return None if name is None else refine_role(name, module)

    def decide(self, module: nn.Module) -> Optional[Decision]:
        """The decision for a module with a role (None for modules without one, and fastpatch's own)."""
        role_name = self.role(module)
        if role_name is None or isinstance(module, self.fastpatch_types):
            return None  # not a role, or fastpatch's own (patch_dust3r's subclasses included)
        if id(module) not in self.decisions:
            self.decisions[id(module)] = self._decide(module, role_name)
        return self.decisions[id(module)]

    def _judge(self, obj: object, what: str) -> Optional[str]:
        """Structure checks' view of a rope child or a position getter."""
        if what == "position_getter":
            return self._position_getter_reason(obj)
        if isinstance(obj, self.fastpatch_types):
            return None
        decision = self.decide(obj) if isinstance(obj, nn.Module) else None
        if decision is None:
            return f"{type(obj).__qualname__} is not a class fastpatch replaces"
        return decision.reason

    def _position_getter_reason(self, getter: object) -> Optional[str]:
        """Why a patch embedding's ``position_getter`` cannot be left to fastpatch (None: it can).

        Its code need not be known: a patch embedding with an unknown getter is probed, and the
        probe compares the positions it returns.
        """
        cls = type(getter)
        if cls is reference.PositionGetter:
            return None
        if cls.__name__ != "PositionGetter":
            return f"position_getter is {cls.__qualname__}, not upstream's PositionGetter"
        reason = _reads_reason(getter, cls, POSITION_GETTER)
        return None if reason is None else f"position_getter: {reason}"

    @staticmethod
    def _getter_known(module: nn.Module) -> bool:
        getter = getattr(module, "position_getter", None)
        return type(getter) is reference.PositionGetter or code_reason(type(getter), "PositionGetter") is None

    def _decide(self, module: nn.Module, role_name: str) -> Decision:
        cls, role = type(module), ROLES[role_name]
        if "forward" in module.__dict__:
            return Decision(role_name, None, "forward is overridden on the instance")
        if cls in self.trusted:
            reason = structure_reason(module, role_name, True, self._judge)
            return Decision(role_name, None if reason else TRUSTED, reason)
        if cls is _REFERENCE_CLASSES.get(role_name):
            reason = structure_reason(module, role_name, False, self._judge)
            return Decision(role_name, None if reason else KNOWN, reason)
        reason = (_known_difference(cls, role) or _signature_reason(cls, role) or _reads_reason(module, cls, role)
                  or structure_reason(module, role_name, False, self._judge))
        if reason is not None:
            return Decision(role_name, None, reason)
        reads = forward_code(cls, role.entry).reads
        ignored = (role.may_ignore - reads) | known_ignored_attributes(cls, role)
        semantics: Dict[str, object] = {"ignored_attributes": frozenset(ignored)} if role.may_ignore else {}
        if role.optional_arguments:
            semantics["optional_positions"] = "each" if _optional_positions(cls, role) else ""
        unknown = code_reason(cls, role_name)
        if unknown is None and role_name in ("PatchEmbedDust3R", "ManyAR_PatchEmbed") and not self._getter_known(module):
            unknown = "its position_getter is not upstream's code"
        if unknown is None:
            return Decision(role_name, KNOWN, None, semantics)
        return self._probe(module, role_name, semantics, unknown)

    def _probe(self, module: nn.Module, role_name: str, semantics: Dict[str, object], unknown: str) -> Decision:
        """Verify by probe a module whose code is not known (``unknown`` says why it is not)."""
        dropout = active_dropout(module)
        if dropout is not None:
            return Decision(role_name, None, f"{unknown}, and its dropout {dropout} cannot be verified by probe")
        rope = module if role_name in ("RoPE2D", "cuRoPE2D") else getattr(module, "rope", None)
        f0 = None if rope is None or role_name not in _ROPE_ROLES else float(getattr(rope, "F0", 1.0))
        # A forward taking None positions skips RoPE for them: for each side alone, or unless both are given.
        modes = ("each", "both") if semantics.get("optional_positions") and role_name == "CrossAttention" else (None,)
        first_reason = None
        for mode in modes:
            candidate = dict(semantics, optional_positions=mode) if mode else semantics
            key = (type(module), role_name, _configuration(module), tuple(sorted(candidate.items(), key=str)))
            if key not in self._probed:
                self._probed[key] = probe_reason(module, role_name, self.classes[role_name], candidate, f0)
            if self._probed[key] is None:
                return Decision(role_name, PROBED, None, candidate)
            first_reason = first_reason or self._probed[key]
        return Decision(role_name, None, f"{unknown}, and its {first_reason}")
