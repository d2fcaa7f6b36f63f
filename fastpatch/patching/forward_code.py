"""What a class's forward runs: the methods it reaches on ``self`` and the attributes it reads.

Read from the source (syntax trees), never by running it. Starting at the entry method
(``forward``, or ``__call__`` for the position getter), every ``self.name`` that resolves to a
method of the class (below ``nn.Module``) is followed, ``super().name`` included; every other
``self.name`` is an attribute read. Only these methods decide whether a class is upstream's code
(``_init_weights`` or an unused helper does not), and the attribute reads are compared with what
fastpatch's forward reads (:mod:`fastpatch.patching.roles`).

Uses of ``self`` that cannot be followed make the analysis fail with a reason: ``self`` passed to
another function or stored, ``getattr(self, ...)``, an assignment to ``self.name`` (state the
replacement would not keep), or a method whose source cannot be read.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from torch import nn

from .fingerprints import FunctionNode, function_tree

__all__ = ["ForwardCode", "class_methods", "forward_code"]

# Methods that only change how a module is shown, never what it computes.
_PRESENTATION_METHODS = frozenset({"__repr__", "__str__", "__format__", "__dir__", "__sizeof__", "extra_repr"})


def class_methods(cls: type) -> Dict[str, Tuple[type, object]]:
    """name -> (defining class, raw attribute) for every method a ``cls`` instance resolves from
    classes other than ``nn.Module`` and ``object`` (presentation methods left out)."""
    methods: Dict[str, Tuple[type, object]] = {}
    seen = set()
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            continue
        for name, value in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            if name not in _PRESENTATION_METHODS and (
                    callable(value) or isinstance(value, (staticmethod, classmethod, property))):
                methods[name] = (klass, value)
    return methods


@dataclass(frozen=True)
class ForwardCode:
    """What ``cls.<entry>`` runs.

    Attributes:
        methods: ``(method name, defining class)`` -> the function, for every method reached
            (the entry included), in the order they were found.
        reads: names of ``self`` attributes read (not methods); child modules count as reads.
        failure: why the analysis could not be completed (None when it was).
    """

    methods: Dict[Tuple[str, type], Callable]
    reads: FrozenSet[str]
    failure: Optional[str]


def _self_name(node: FunctionNode, raw: object) -> Optional[str]:
    if isinstance(raw, staticmethod):
        return None
    args = node.args.posonlyargs + node.args.args
    return args[0].arg if args else None


def _is_super_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _resolve(cls: type, name: str, after: Optional[type]) -> Optional[Tuple[type, object]]:
    """The method ``name`` as ``cls`` instances resolve it, or (``after`` given) as ``super()`` in a
    method of ``after`` resolves it; None if it resolves to nn.Module/object or nowhere."""
    mro = cls.__mro__
    start = mro.index(after) + 1 if after is not None and after in mro else 0
    for klass in mro[start:]:
        if klass is nn.Module or klass is object:
            return None
        if name in vars(klass):
            value = vars(klass)[name]
            if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
                return klass, value
            return None
    return None


@functools.lru_cache(maxsize=None)
def forward_code(cls: type, entry: str = "forward") -> ForwardCode:
    """Follow ``cls.<entry>`` through the methods it calls on ``self`` (module docstring)."""
    methods: Dict[Tuple[str, type], Callable] = {}
    reads = set()
    start = _resolve(cls, entry, None)
    if start is None:
        return ForwardCode({}, frozenset(), f"{cls.__qualname__} has no {entry} of its own")
    queue: List[Tuple[str, type, object]] = [(entry, start[0], start[1])]
    while queue:
        name, owner, raw = queue.pop(0)
        if (name, owner) in methods:
            continue
        node = function_tree(raw)
        if node is None:
            return ForwardCode(methods, frozenset(reads),
                               f"the source of {owner.__qualname__}.{name} cannot be read")
        methods[(name, owner)] = raw
        failure = _walk(cls, owner, node, _self_name(node, raw), reads, queue)
        if failure is not None:
            return ForwardCode(methods, frozenset(reads), f"{owner.__qualname__}.{name} {failure}")
    return ForwardCode(methods, frozenset(reads), None)


def _walk(cls: type, owner: type, node: FunctionNode, self_name: Optional[str], reads: set,
          queue: List[Tuple[str, type, object]]) -> Optional[str]:
    """Collect one method's reads and the methods it reaches; a reason if ``self`` escapes."""
    followed = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and _is_super_call(child.value):
            target = _resolve(cls, child.attr, owner)
            if target is None:
                return f"calls super().{child.attr}, which is not a method below nn.Module"
            queue.append((child.attr, target[0], target[1]))
            continue
        if self_name is None:
            continue
        if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == self_name:
            followed.add(id(child.value))
            if not isinstance(child.ctx, ast.Load):
                return f"assigns self.{child.attr} (state the replacement would not keep)"
            target = _resolve(cls, child.attr, None)
            if target is not None:
                queue.append((child.attr, target[0], target[1]))
            else:
                reads.add(child.attr)
    if self_name is not None:
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and child.id == self_name and id(child) not in followed:
                return f"uses {self_name} other than through its attributes (line {child.lineno} of its source)"
    return None
