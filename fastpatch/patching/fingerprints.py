"""Fingerprints of Python functions: a hash of the code, not of its formatting.

A fingerprint is the sha256 (first 16 hex digits) of a fixed text dump of the function's syntax
tree: signature (argument names and defaults), decorators and body. The function's name, its
docstring, comments, blank lines, spacing and line numbers do not count, and the dump drops empty
fields, so the same source gives the same fingerprint on Python 3.9 to 3.13 (bytecode would not).

:func:`fingerprint` reads a live function's source; :func:`source_fingerprints` reads the text of
a file, so the fingerprint of a public version can be computed from a checkout without importing
(or committing) its code: ``python -m fastpatch.patching.fingerprints path/to/blocks.py``.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import sys
import textwrap
from typing import Callable, Dict, Optional, Union

__all__ = ["fingerprint", "function_tree", "source_fingerprints"]

FunctionNode = Union[ast.FunctionDef, ast.AsyncFunctionDef]

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


def _node_fingerprint(node: FunctionNode) -> str:
    """Fingerprint of a parsed ``def``: its dump with the name emptied and the docstring dropped
    (the node itself is not modified)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    fields = []
    for name, value in ast.iter_fields(node):
        value = "" if name == "name" else body if name == "body" else value
        if name not in _IGNORED_FIELDS and value is not None and value != []:
            fields.append(f"{name}={_canonical(value)}")
    return hashlib.sha256(f"{type(node).__name__}({','.join(fields)})".encode()).hexdigest()[:16]


def _unwrap(function: Callable) -> Optional[Callable]:
    function = getattr(function, "__func__", None) or getattr(function, "fget", None) or function
    return function if inspect.isfunction(function) else None


@functools.lru_cache(maxsize=None)
def _function_tree(function: Callable) -> Optional[FunctionNode]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None  # a lambda or an assignment: no def to read
    return tree.body[0]


def function_tree(function: Callable) -> Optional[FunctionNode]:
    """The parsed ``def`` of a function (method, staticmethod/classmethod, property getter), or None
    when its source cannot be read (builtins, partials, REPL code). Cached; do not modify the tree."""
    function = _unwrap(function)
    return None if function is None else _function_tree(function)


@functools.lru_cache(maxsize=None)
def _function_fingerprint(function: Callable) -> Optional[str]:
    node = _function_tree(function)
    return None if node is None else _node_fingerprint(node)


def fingerprint(function: Callable) -> Optional[str]:
    """Fingerprint of a function's code, as 16 hex digits, or None if its source cannot be read.

    Accepts plain functions, methods, ``staticmethod`` / ``classmethod`` objects and properties
    (their getter); anything else (a builtin, a ``functools.partial``, a class) gets None. The source
    is read from the file the function was defined in, so a file edited after import is judged by
    its new text.
    """
    function = _unwrap(function)
    return None if function is None else _function_fingerprint(function)


def source_fingerprints(source: str) -> Dict[str, str]:
    """``"Class.method"`` -> fingerprint for every method of every class in a file's text.

    Classes nested in ``try``/``if`` blocks count (croco defines its torch RoPE2D in an ``except``).
    """
    result: Dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    result[f"{node.name}.{item.name}"] = _node_fingerprint(item)
    return result


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as handle:
            for name, code in source_fingerprints(handle.read()).items():
                print(f"{path} {name} {code}")
