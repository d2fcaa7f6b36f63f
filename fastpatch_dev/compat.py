"""Everything that differs between the Triton versions fastpatch supports (3.1 and newer), in one place.

The kernels are written in the subset every supported version accepts, so the only
version-specific code is how Triton turns launch arguments into a compiled variant, which the
ahead-of-time compile tests must reproduce:

* **Runtime specialisation.** At each launch Triton's runtime folds integer arguments equal to 1
  into constants, and marks pointers whose address and integers whose value are divisible by 16
  with ``tt.divisibility = 16`` (vectorised loads, shared-memory layouts and wgmma selection follow
  from it). triton 3.1 computes this with ``JITFunction._get_config`` into an ``AttrsDescriptor``
  (``divisible_by_16`` / ``equal_to_1`` index sets; folded arguments stay in the signature and are
  repeated as constants); triton >= 3.6 calls ``native_specialize_impl`` per argument, which
  returns ``(type, "D" | "")`` or ``("constexpr", value)``.
* **Ahead-of-time compile.** ``ASTSource`` takes the signature of the non-constexpr arguments,
  constants by name and an ``AttrsDescriptor`` in 3.1; in >= 3.6 a signature of every argument
  (``"constexpr"`` for the folded ones), constants by name and attributes keyed by argument path.

triton 3.2 to 3.5 sit between those two APIs; fastpatch's kernels run there, but these helpers
raise ``RuntimeError`` on them rather than guess. Development tooling (the installed ``fastpatch``
never imports it); triton is imported inside the functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

__all__ = ["LaunchSpecialization", "triton_version", "launch_specialization", "compile_for_target"]


@dataclass(frozen=True)
class LaunchSpecialization:
    """The compiled variant Triton's runtime picks for one launch.

    Attributes:
        types: every argument name -> its Triton type (``"*fp16"``, ``"i32"``, ``"i64"``, ``"fp32"``),
            or ``"constexpr"`` for constexpr parameters and the arguments the runtime folded.
        constexprs: name -> value for the constexpr parameters and the folded arguments (integers
            equal to 1, and None).
        divisible_by_16: names of the arguments compiled with ``tt.divisibility = 16``.
    """

    types: Dict[str, str]
    constexprs: Dict[str, object]
    divisible_by_16: Tuple[str, ...]

    def key(self) -> Tuple:
        """Hashable identity: two launches with equal keys run the same compiled kernel."""
        return (tuple(sorted(self.types.items())), tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted(self.divisible_by_16)))


def triton_version() -> Tuple[int, int]:
    """(major, minor) of the installed triton."""
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _uses_attrs_descriptor() -> bool:
    """True for triton 3.1's specialisation/compile API; raises for versions these helpers do not know."""
    version = triton_version()
    if version == (3, 1):
        return True
    if version >= (3, 6):
        return False
    raise RuntimeError(f"fastpatch_dev.compat knows the compile API of triton 3.1 and >= 3.6, not {version}")


def _target(capability: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", capability, 32)


def launch_specialization(kernel, args: Mapping[str, object], capability: int) -> LaunchSpecialization:
    """What Triton's runtime derives from ``kernel[grid](**args)`` on a ``sm_<capability>`` GPU.

    Args:
        kernel: a ``@triton.jit`` function.
        args: every parameter of ``kernel`` by name (tensors, ints, floats, None, constexpr values),
            as a launcher passes them. Tensors only need ``data_ptr()`` and ``dtype``: CPU tensors
            with the launch's layout give the same divisibility as CUDA ones (both allocators align
            to at least 64 bytes, so views differ only by their storage offsets).
        capability: 80, 90, ...: the backend whose rules apply.

    Returns:
        The :class:`LaunchSpecialization`, computed by the installed triton's own functions.
    """
    missing = [p.name for p in kernel.params if p.name not in args]
    if missing:
        raise ValueError(f"{kernel.__name__}: no value for {missing}")
    if _uses_attrs_descriptor():
        return _specialization_attrs_descriptor(kernel, args)
    return _specialization_native(kernel, args, capability)


def _specialization_attrs_descriptor(kernel, args: Mapping[str, object]) -> LaunchSpecialization:
    from triton.runtime.jit import mangle_type

    values = [args[p.name] for p in kernel.params]
    config = kernel._get_config(*values)
    types, constexprs = {}, {}
    for param, value in zip(kernel.params, values):
        if param.is_constexpr:
            types[param.name], constexprs[param.name] = "constexpr", value
        elif param.num in config.equal_to_1 or value is None:
            types[param.name], constexprs[param.name] = "constexpr", value
        else:
            types[param.name] = mangle_type(value)
    divisible = tuple(p.name for p in kernel.params if p.num in config.divisible_by_16 and p.name not in constexprs)
    return LaunchSpecialization(types, constexprs, divisible)


def _specialization_native(kernel, args: Mapping[str, object], capability: int) -> LaunchSpecialization:
    # The per-argument rules of triton.runtime.jit.create_function_from_signature (>= 3.6).
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import native_specialize_impl

    backend = make_backend(_target(capability))
    types, constexprs, divisible = {}, {}, []
    for param in kernel.params:
        value = args[param.name]
        if param.is_constexpr:
            types[param.name], constexprs[param.name] = "constexpr", value
            continue
        specialize = not param.do_not_specialize
        align = not param.do_not_specialize_on_alignment
        annotation = param.annotation_type
        if isinstance(annotation, str) and (annotation == "u1" or annotation[:2] in ("fp", "bf")):
            specialize = False
        kind, attr = native_specialize_impl(backend, value, param.is_const, specialize, align)
        if annotation:
            kind = annotation
            attr = attr if specialize else None
        types[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr
        elif attr == "D":
            divisible.append(param.name)
    return LaunchSpecialization(types, constexprs, tuple(divisible))


def compile_for_target(kernel, spec: LaunchSpecialization, capability: int, num_warps: int, num_stages: int):
    """Compile ``kernel`` for ``sm_<capability>`` exactly as the runtime would for ``spec`` (no GPU needed).

    Returns:
        The compiled kernel: ``.asm`` holds ``"ttir"``, ``"ttgir"``, ``"ptx"``, ``"cubin"``;
        ``.metadata.shared`` the shared memory in bytes.
    """
    import triton
    from triton.compiler import ASTSource

    names = [p.name for p in kernel.params]
    if _uses_attrs_descriptor():
        from triton.compiler.compiler import AttrsDescriptor

        folded = {n for n in spec.constexprs if not kernel.params[names.index(n)].is_constexpr}
        signature = {n: t if t != "constexpr" else _folded_type(spec.constexprs[n])
                     for n, t in spec.types.items() if n in folded or t != "constexpr"}
        attrs = AttrsDescriptor(divisible_by_16=tuple(names.index(n) for n in spec.divisible_by_16),
                                equal_to_1=tuple(names.index(n) for n in folded if spec.constexprs[n] == 1))
        src = ASTSource(fn=kernel, signature=signature, constants=dict(spec.constexprs), attrs=attrs)
    else:
        from triton.backends.compiler import BaseBackend

        attrs = {(names.index(n),): BaseBackend.parse_attr("D") for n in spec.divisible_by_16}
        src = ASTSource(fn=kernel, signature=dict(spec.types), constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=_target(capability), options=options)


def _folded_type(value) -> str:
    # triton 3.1 keeps folded arguments in the signature with their runtime type.
    from triton.runtime.jit import mangle_type

    kind = mangle_type(value)
    return "*i8" if kind == "none" else kind
