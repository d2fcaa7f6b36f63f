"""What keeps the kernels working on every supported triton (3.1 and newer), checked under the installed one.

The numerics under the oldest triton are the kernel test files themselves, run again in
``.venv-oldest`` by ``scripts/test_oldest.sh``; these tests pin what that run depends on.
"""
import importlib
import pkgutil

import pytest

import fastpatch.kernels
from fastpatch_dev import compat


def _jit_functions():
    for info in pkgutil.iter_modules(fastpatch.kernels.__path__):
        module = importlib.import_module(f"fastpatch.kernels.{info.name}")
        for name, obj in vars(module).items():
            if hasattr(obj, "arg_names") and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__:
                yield f"{info.name}.{name}", obj


JIT_FUNCTIONS = dict(_jit_functions())


def test_every_kernel_module_is_seen():
    assert {"patch_embed.patch_embed_fwd_kernel", "rope_attention_fwd.rope_attention_fwd_kernel",
            "rope.rope_rotate_kernel"} <= set(JIT_FUNCTIONS)


@pytest.mark.parametrize("name", sorted(JIT_FUNCTIONS))
def test_constexpr_annotations_are_objects(name):
    """triton 3.1's interpreter sees a parameter as constexpr only through the ``tl.constexpr`` object:
    a string annotation (``from __future__ import annotations``) makes ``tl.arange(0, BLOCK)`` fail there."""
    annotations = JIT_FUNCTIONS[name].fn.__annotations__
    strings = {param: ann for param, ann in annotations.items() if isinstance(ann, str)}
    assert not strings, f"{name}: string annotations {strings}"


def test_triton_version_is_supported():
    assert compat.triton_version() >= (3, 1)


@pytest.mark.parametrize("version, old_api", [((3, 1), True), ((3, 6), False), ((3, 9), False), ((4, 0), False)])
def test_compile_api_by_version(monkeypatch, version, old_api):
    monkeypatch.setattr(compat, "triton_version", lambda: version)
    assert compat._uses_attrs_descriptor() is old_api


@pytest.mark.parametrize("version", [(3, 0), (3, 2), (3, 5)])
def test_unknown_compile_api_raises(monkeypatch, version):
    monkeypatch.setattr(compat, "triton_version", lambda: version)
    with pytest.raises(RuntimeError, match="triton 3.1 and >= 3.6"):
        compat._uses_attrs_descriptor()
