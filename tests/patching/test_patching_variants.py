"""patch_model's behavioural verification, on spec-written variants of the upstream classes (tests/variants.py).

A module named like an upstream class whose code is no known upstream version is replaced only when
its structure fits and it computes, on fastpatch's probe inputs, what fastpatch's replacement
computes; its forward must also read no attribute of ``self`` that fastpatch's forward ignores.

* **Harmless variants** (SDPA, an offset RoPE table, another ``_init_weights``, an extra
  ``.contiguous()``, optional positions, a reordered block, an unused helper, a class named otherwise
  that derives from a replaced one) must be replaced, reported as ``"verified by probe"``, and compute
  after patching what they computed before, on the torch path and on the Triton path (the ``device``
  fixture: the interpreter on CPU), within the fp32 tolerance. Each is first checked to be the spec's
  function (fastpatch's eager :mod:`fastpatch.reference` classes with its weights).
* **Real changes** (attention over heads, no portrait handling, attention maps, a mask, a 3-D RoPE switch,
  qk-norm, LayerScale, a temperature read directly or in a helper, half-precision RoPE), and changes that
  only some probe inputs reveal (non-square grids, large or per-sample positions, square ManyAR samples,
  training mode), must be left alone with a reason, with one ``UserWarning`` per call (``strict=True``:
  :class:`fastpatch.PatchRefusedError`, nothing patched), and compute exactly what they computed before.
  Each is also shown to differ from the spec's function for some input or setting, so that its refusal
  means something.
* Probing leaves the model alone: no global random numbers drawn, no cache entries, no parameter copied,
  and one probe per distinct class and configuration however many instances share it.

Sizes are small (width 64, 2 heads of 32 channels, a few tokens) for the Triton interpreter.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import nn

import fastpatch
import variants
from fastpatch import reference, use_backend
from fastpatch.testing import TOLERANCES, relative_error
from modes import device_for
from upstream import perturb_

FP32 = TOLERANCES[torch.float32].forward
DIM, HEADS = 64, 2  # head dim 32: a size the Triton attention kernels take
PATCH, IMG_H, IMG_W = 16, 32, 48
BACKENDS = ("torch", "triton")
VERIFIED = "verified by probe"
KNOWN = "known code"


# ----------------------------------------------------------------------------------------------
# Inputs: fixed tensors from their own generators (the global RNG is not used)
# ----------------------------------------------------------------------------------------------
def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _grid(batch: int, rows: int, cols: int, first_row: int = 0, first_col: int = 0) -> torch.Tensor:
    """(batch, rows*cols, 2) int64 (y, x) positions in raster order, starting at (first_row, first_col)."""
    k = torch.arange(rows * cols)
    pos = torch.stack((k // cols + first_row, k % cols + first_col), dim=-1)
    return pos.expand(batch, -1, -1).contiguous()


@dataclass
class Call:
    """One forward call: positional and keyword arguments (tensors moved to the device at run time)."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> "Call":
        move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        return Call(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()})


def _self_attention_calls() -> List[Call]:
    """Two batches: 2 x (2 x 6 grid) tokens, and 1 x (3 x 5 grid) tokens with rows from 4, columns from 9."""
    return [Call((_randn(2, 12, DIM, seed=1), _grid(2, 2, 6))),
            Call((_randn(1, 15, DIM, seed=2), _grid(1, 3, 5, 4, 9)))]


def _cross_attention_calls(same_lengths: bool = False) -> List[Call]:
    """Queries on a 2 x 6 grid against keys/values on a 2 x 4 grid (Nq != Nk), or on a 2 x 6 grid too."""
    query, memory = _randn(2, 12, DIM, seed=3), _randn(2, 12 if same_lengths else 8, DIM, seed=4)
    kpos = _grid(2, 2, 6) if same_lengths else _grid(2, 2, 4, 1, 3)
    return [Call((query, memory, memory, _grid(2, 2, 6), kpos))]


def _decoder_calls() -> List[Call]:
    return [Call((_randn(2, 12, DIM, seed=5), _randn(2, 8, DIM, seed=6), _grid(2, 2, 6), _grid(2, 2, 4)))]


def _rope_calls() -> List[Call]:
    """Heads (B, H, N, Dh) at grid positions, at positions far from 0, and at negative positions."""
    head_dim = DIM // HEADS
    return [Call((_randn(2, HEADS, 12, head_dim, seed=7), _grid(2, 2, 6))),
            Call((_randn(1, HEADS, 15, head_dim, seed=8), _grid(1, 3, 5, 40, 75))),
            Call((_randn(1, HEADS, 12, head_dim, seed=9), _grid(1, 3, 4, -2, -3)))]


def _images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    return _randn(batch, 3, height, width, seed=seed)


def _patch_embed_calls() -> List[Call]:
    """A landscape batch (true_shape passed and ignored) and a portrait image."""
    return [Call((_images(2, IMG_H, IMG_W, seed=10),), {"true_shape": torch.tensor([[IMG_H, IMG_W]] * 2)}),
            Call((_images(1, IMG_W, IMG_H, seed=11),))]


def _many_ar_calls() -> List[Call]:
    """A landscape + portrait (stored transposed) batch, and a square image."""
    mixed = torch.tensor([[IMG_H, IMG_W], [IMG_W, IMG_H]])
    return [Call((_images(2, IMG_H, IMG_W, seed=12), mixed)),
            Call((_images(1, IMG_H, IMG_H, seed=13), torch.tensor([[IMG_H, IMG_H]])))]


# ----------------------------------------------------------------------------------------------
# Running modules and comparing outputs
# ----------------------------------------------------------------------------------------------
def _tensors(output) -> List[torch.Tensor]:
    """A forward output (a tensor, or a tuple of them) as a flat list."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in _tensors(item)]


def _outputs(module: nn.Module, calls: Sequence[Call], backend: Optional[str] = None,
             device: torch.device = torch.device("cpu")) -> List[List[torch.Tensor]]:
    """Every call's outputs (detached, on the CPU), under ``use_backend(backend)`` when given."""
    module.to(device)
    results = []
    with torch.no_grad(), (use_backend(backend) if backend else contextlib.nullcontext()):
        for call in calls:
            call = call.to(device)
            results.append([t.detach().cpu() for t in _tensors(module(*call.args, **call.kwargs))])
    module.to("cpu")
    return results


def _assert_same(actual, expected, what: str, exact: bool = False) -> None:
    """Integer outputs (positions) equal; floating outputs equal (``exact``) or within the fp32 tolerance."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} calls vs {len(expected)}"
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert len(got) == len(want), f"{what}, call {i}: {len(got)} outputs instead of {len(want)}"
        for j, (a, e) in enumerate(zip(got, want)):
            assert a.shape == e.shape and a.dtype == e.dtype, \
                f"{what}, call {i} output {j}: {a.dtype}{tuple(a.shape)} instead of {e.dtype}{tuple(e.shape)}"
            if exact or not e.is_floating_point():
                assert torch.equal(a, e), f"{what}, call {i} output {j}: changed ({relative_error(a, e):.2e})"
            else:
                err = relative_error(a, e)
                assert err <= FP32, f"{what}, call {i} output {j}: relative error {err:.2e} > {FP32:.0e}"


def _patch(module: nn.Module, **kwargs) -> Tuple[nn.Module, List[warnings.WarningMessage]]:
    """patch_model, returning the patched model and the UserWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched = fastpatch.patch_model(module, **kwargs)
    return patched, [w for w in caught if issubclass(w.category, UserWarning)]


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under a fixed seed, every parameter perturbed (so biases and LayerNorms matter), in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build()
    return perturb_(module, seed=seed).eval()


def _twin(reference_module: nn.Module, variant: nn.Module) -> nn.Module:
    """``reference_module`` (fastpatch's eager spec class) holding ``variant``'s weights; same keys required."""
    reference_module.load_state_dict(variant.state_dict(), strict=True)
    return reference_module.eval()


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A variant with its inputs and what patch_model must do with it.

    ``build()`` returns (the variant with perturbed weights, fastpatch's eager spec class holding the same
    weights, or None). ``replaced``: the whole expected ``report.replaced``. For a harmless variant,
    ``probed`` are the paths accepted ``"verified by probe"``, the others in ``replaced`` being ``"known
    code"``. For a real change, ``difference(variant, twin)`` returns how far the variant is from the
    spec's function under some input or setting (relative error, inf for another output structure),
    ``left_alone`` the paths that must be left alone (the first is the variant itself) and
    ``reason_mentions`` what the variant's refusal reason must name.
    """

    build: Callable[[], Tuple[nn.Module, Optional[nn.Module]]]
    calls: Callable[[], List[Call]]
    replaced: Dict[str, List[str]]
    probed: Tuple[str, ...] = ("<root>",)
    difference: Optional[Callable[[nn.Module, nn.Module], float]] = None
    reason_mentions: Tuple[str, ...] = ()
    left_alone: Tuple[str, ...] = ("<root>",)


def _attention_case(cls: type, rope: bool = True, **kwargs) -> Case:
    """A self-attention variant with fastpatch's eager RoPE2D (replaced as known code) or none."""

    def build():
        module = _seeded(0, lambda: cls(DIM, rope=reference.RoPE2D(100.0) if rope else None, num_heads=HEADS,
                                        qkv_bias=True, **kwargs))
        return module, _twin(reference.Attention(DIM, rope=reference.RoPE2D(100.0) if rope else None,
                                                 num_heads=HEADS, qkv_bias=True), module)

    replaced = {"Attention": ["<root>"], **({"RoPE2D": ["rope"]} if rope else {})}
    return Case(build, _self_attention_calls, replaced)


def _cross_attention_case(cls: type) -> Case:
    def build():
        module = _seeded(0, lambda: cls(DIM, rope=reference.RoPE2D(100.0), num_heads=HEADS, qkv_bias=True))
        return module, _twin(reference.CrossAttention(DIM, rope=reference.RoPE2D(100.0), num_heads=HEADS,
                                                      qkv_bias=True), module)

    return Case(build, _cross_attention_calls, {"CrossAttention": ["<root>"], "RoPE2D": ["rope"]})


def _optional_positions_calls(positions: Callable[[], List[Call]], positional: int) -> Callable[[], List[Call]]:
    """The calls with positions, then the same without them (defaulted) and with None passed."""

    def calls():
        with_positions = positions()
        first = with_positions[0].args[:positional]
        nones = (None,) * (len(with_positions[0].args) - positional)
        return with_positions + [Call(first), Call(first + nones)]

    return calls


def _rope_case(f0: float) -> Case:
    def build():
        module = variants.OffsetTableRoPE2D(freq=100.0, F0=f0)
        return module, reference.RoPE2D(freq=100.0, F0=f0)

    return Case(build, _rope_calls, {"RoPE2D": ["<root>"]})


def _rope_in_attention_case(f0: float) -> Case:
    """fastpatch's eager Attention (known code) holding the offset-table RoPE: the Triton path fuses it."""

    def build():
        module = _seeded(0, lambda: reference.Attention(DIM, rope=variants.OffsetTableRoPE2D(100.0, F0=f0),
                                                        num_heads=HEADS, qkv_bias=True))
        return module, _twin(reference.Attention(DIM, rope=reference.RoPE2D(100.0, F0=f0), num_heads=HEADS,
                                                 qkv_bias=True), module)

    return Case(build, _self_attention_calls, {"Attention": ["<root>"], "RoPE2D": ["rope"]}, probed=("rope",))


def _block_case(cls: type) -> Case:
    def build():
        module = _seeded(0, lambda: cls(DIM, HEADS, qkv_bias=True, rope=reference.RoPE2D(100.0)))
        return module, _twin(reference.Block(DIM, HEADS, qkv_bias=True, norm_layer=variants.spec_layer_norm,
                                             rope=reference.RoPE2D(100.0)), module)

    return Case(build, _self_attention_calls, {"Attention": ["attn"], "RoPE2D": ["attn.rope"], "Block": ["<root>"]})


def _decoder_block_case() -> Case:
    def build():
        rope = reference.RoPE2D(100.0)
        module = _seeded(0, lambda: variants.MemoryFirstDecoderBlock(DIM, HEADS, qkv_bias=True, rope=rope))
        return module, _twin(reference.DecoderBlock(DIM, HEADS, qkv_bias=True, norm_layer=variants.spec_layer_norm,
                                                    rope=reference.RoPE2D(100.0)), module)

    replaced = {"Attention": ["attn"], "CrossAttention": ["cross_attn"], "RoPE2D": ["attn.rope"],
                "DecoderBlock": ["<root>"]}
    return Case(build, _decoder_calls, replaced)


def _initialised(module: nn.Module) -> nn.Module:
    module._init_weights()  # the variant's own initialisation: runs, but forward never calls it
    return module


def _patch_embed_case(cls: type, reference_cls: type, calls: Callable[[], List[Call]], role: str) -> Case:
    def build():
        module = _seeded(0, lambda: _initialised(cls(img_size=(IMG_H, IMG_W), patch_size=PATCH, in_chans=3,
                                                     embed_dim=DIM)))
        return module, _twin(reference_cls(img_size=(IMG_H, IMG_W), patch_size=PATCH, in_chans=3, embed_dim=DIM),
                             module)

    return Case(build, calls, {role: ["<root>"]})


HARMLESS: Dict[str, Case] = {
    "sdpa_attention": _attention_case(variants.SdpaAttention),
    "sdpa_attention_without_rope": _attention_case(variants.SdpaAttention, rope=False),
    "sdpa_scaled_attention": _attention_case(variants.SdpaScaledAttention),
    "sdpa_cross_attention": _cross_attention_case(variants.SdpaCrossAttention),
    "offset_table_rope": _rope_case(f0=1.0),
    "offset_table_rope_f0": _rope_case(f0=2.0),
    "offset_table_rope_in_attention": _rope_in_attention_case(f0=1.0),
    "offset_table_rope_f0_in_attention": _rope_in_attention_case(f0=0.5),
    "trunc_normal_init_patch_embed": _patch_embed_case(variants.TruncNormalInitPatchEmbed,
                                                       reference.PatchEmbedDust3R, _patch_embed_calls,
                                                       "PatchEmbedDust3R"),
    "kaiming_init_many_ar_patch_embed": _patch_embed_case(variants.KaimingInitManyARPatchEmbed,
                                                          reference.ManyAR_PatchEmbed, _many_ar_calls,
                                                          "ManyAR_PatchEmbed"),
    "contiguous_attention": _attention_case(variants.ContiguousAttention),
    "optional_positions_attention": Case(_attention_case(variants.OptionalPositionsAttention).build,
                                         _optional_positions_calls(_self_attention_calls, 1),
                                         {"Attention": ["<root>"], "RoPE2D": ["rope"]}),
    "optional_positions_cross_attention": Case(_cross_attention_case(variants.OptionalPositionsCrossAttention).build,
                                               _optional_positions_calls(_cross_attention_calls, 3),
                                               {"CrossAttention": ["<root>"], "RoPE2D": ["rope"]}),
    "pre_norm_block": _block_case(variants.PreNormBlock),
    "block_without_drop_path": _block_case(variants.NoDropPathBlock),
    "derived_sdpa_attention": _attention_case(variants.DerivedSdpaAttention),
    "memory_first_decoder_block": _decoder_block_case(),
}


# Real changes. Attention variants hold fastpatch's own RoPE2D (never replaced), so nothing inside them is
# replaced and their outputs after patching must be bit for bit what they were.
def _refused_attention(cls: type, difference, mentions: Tuple[str, ...] = (), calls=_self_attention_calls) -> Case:
    def build():
        module = _seeded(0, lambda: cls(DIM, rope=fastpatch.RoPE2D(100.0), num_heads=HEADS, qkv_bias=True))
        twin = reference.Attention(DIM, rope=reference.RoPE2D(100.0), num_heads=HEADS, qkv_bias=True)
        twin.load_state_dict(module.state_dict(), strict=False)  # qk-norm's q_norm/k_norm have no twin
        return module, twin.eval()

    return Case(build, calls, {}, difference=difference, reason_mentions=mentions)


def _refused_cross_attention(cls: type):
    module = _seeded(0, lambda: cls(DIM, rope=fastpatch.RoPE2D(100.0), num_heads=HEADS, qkv_bias=True))
    return module, _twin(reference.CrossAttention(DIM, rope=reference.RoPE2D(100.0), num_heads=HEADS,
                                                  qkv_bias=True), module)


def _error(variant_out, spec_out) -> float:
    """How far a variant's output is from the spec's: relative error, or inf for another structure."""
    if not isinstance(variant_out, torch.Tensor) or variant_out.shape != spec_out.shape:
        return math.inf
    return relative_error(variant_out, spec_out)


def _on_first_call(variant: nn.Module, twin: nn.Module, calls: Callable[[], List[Call]] = _self_attention_calls,
                   dtype: torch.dtype = torch.float32) -> float:
    args = [a.to(dtype) if a.is_floating_point() else a for a in calls()[0].args]
    with torch.no_grad():
        return _error(variant.to(dtype)(*args), twin.to(dtype)(*args))


def _with_setting(name: str, value) -> Callable[[nn.Module, nn.Module], float]:
    """The variant differs from the spec once attribute ``name`` holds ``value`` (set on a copy)."""

    def difference(variant, twin):
        variant = copy.deepcopy(variant)
        setattr(variant, name, value)
        return _on_first_call(variant, twin)

    return difference


def _masked_difference(variant, twin) -> float:
    x, pos = _self_attention_calls()[0].args
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, -1, -1)
    with torch.no_grad():
        return _error(variant(x, pos, mask=causal), twin(x, pos))


def _heads_axis_difference(variant, twin) -> float:
    return _on_first_call(variant, twin, lambda: _cross_attention_calls(same_lengths=True))


def _rope_3d_difference(variant, twin) -> float:
    tokens = _randn(2, HEADS, 12, DIM // HEADS, seed=14)
    frames = torch.cat((torch.tensor([0, 1]).view(2, 1, 1).expand(2, 12, 1), _grid(2, 2, 6)), dim=-1)
    variant = copy.deepcopy(variant)
    variant.use_3d = True
    return _error(variant(tokens, frames), twin(tokens, frames[..., 1:]))


def _refused_rope_in_attention() -> Case:
    """fastpatch's eager Attention (known code) holding the 3-D-switch RoPE: the RoPE is left alone, and so
    is the Attention, whose replacement would apply that RoPE as the spec's."""

    def build():
        module = _seeded(0, lambda: reference.Attention(DIM, rope=variants.Switchable3dRoPE2D(100.0),
                                                        num_heads=HEADS, qkv_bias=True))
        return module, reference.RoPE2D(100.0)

    def difference(attention, twin):
        return _rope_3d_difference(attention.rope, twin)

    return Case(build, _self_attention_calls, {}, probed=(), difference=difference, reason_mentions=("use_3d",),
                left_alone=("rope", "<root>"))


def _refused_block(cls: type, difference, mentions: Tuple[str, ...], keep_gamma: bool = False) -> Case:
    """A LayerScale block; its fastpatch-eager Attention inside is replaced (known code)."""

    def build():
        module = _seeded(0, lambda: cls(DIM, HEADS, qkv_bias=True, rope=reference.RoPE2D(100.0)))
        if keep_gamma:  # back to the fresh values: the spec's function, which no probe can tell apart
            with torch.no_grad():
                module.gamma_1.fill_(1.0)
                module.gamma_2.fill_(1.0)
        twin = reference.Block(DIM, HEADS, qkv_bias=True, norm_layer=variants.spec_layer_norm,
                               rope=reference.RoPE2D(100.0))
        twin.load_state_dict(module.state_dict(), strict=False)
        return module, twin.eval()

    return Case(build, _self_attention_calls, {"Attention": ["attn"], "RoPE2D": ["attn.rope"]},
                difference=difference, reason_mentions=mentions)


def _gamma_difference(variant, twin) -> float:
    variant = copy.deepcopy(variant)
    with torch.no_grad():
        variant.gamma_1.fill_(0.5)
    return _on_first_call(variant, twin)


def _landscape_only_case() -> Case:
    def build():
        module = _seeded(0, lambda: variants.LandscapeOnlyManyARPatchEmbed(
            img_size=(IMG_H, IMG_W), patch_size=PATCH, in_chans=3, embed_dim=DIM))
        return module, _twin(reference.ManyAR_PatchEmbed(img_size=(IMG_H, IMG_W), patch_size=PATCH, in_chans=3,
                                                         embed_dim=DIM), module)

    def difference(variant, twin):  # the portrait sample: other tokens and other positions
        args = _many_ar_calls()[0].args
        with torch.no_grad():
            (tokens, pos), (spec_tokens, spec_pos) = variant(*args), twin(*args)
        return max(_error(tokens, spec_tokens), _error(pos.double(), spec_pos.double()))

    return Case(build, _many_ar_calls, {}, difference=difference)


def _rope_difference(positions: torch.Tensor) -> Callable[[nn.Module, nn.Module], float]:
    """A RoPE variant against the spec's at ``positions`` (B, N, 2)."""

    def difference(variant, twin):
        tokens = _randn(positions.shape[0], HEADS, positions.shape[1], DIM // HEADS, seed=16)
        return _error(variant(tokens, positions), twin(tokens, positions))

    return difference


def _refused_rope(cls: type, difference) -> Case:
    return Case(lambda: (cls(100.0), reference.RoPE2D(100.0)), _rope_calls, {}, difference=difference)


def _in_training(variant, twin) -> float:
    return _on_first_call(variant.train(), twin.train())


def _square_sample_difference(variant, twin) -> float:
    args = _many_ar_calls()[1].args  # one square image
    with torch.no_grad():
        (tokens, pos), (spec_tokens, spec_pos) = variant(*args), twin(*args)
    return max(_error(tokens, spec_tokens), _error(pos.double(), spec_pos.double()))


def _square_as_portrait_case() -> Case:
    def build():
        module = _seeded(0, lambda: variants.SquareAsPortraitManyARPatchEmbed(
            img_size=(IMG_H, IMG_W), patch_size=PATCH, in_chans=3, embed_dim=DIM))
        return module, _twin(reference.ManyAR_PatchEmbed(img_size=(IMG_H, IMG_W), patch_size=PATCH, in_chans=3,
                                                         embed_dim=DIM), module)

    return Case(build, _many_ar_calls, {}, difference=_square_sample_difference)


REAL_CHANGES: Dict[str, Case] = {
    "heads_axis_sdpa_cross_attention": Case(
        lambda: _refused_cross_attention(variants.HeadsAxisSdpaCrossAttention),
        lambda: _cross_attention_calls(same_lengths=True), {}, difference=_heads_axis_difference),
    "landscape_only_many_ar_patch_embed": _landscape_only_case(),
    "attention_maps_attention": _refused_attention(variants.AttentionMapsAttention, _on_first_call),
    "masked_attention": _refused_attention(
        variants.MaskedAttention, _masked_difference, ("mask",),
        calls=lambda: _self_attention_calls() + [
            Call(_self_attention_calls()[0].args,
                 {"mask": torch.ones(12, 12, dtype=torch.bool).tril().expand(2, -1, -1)})]),
    "switchable_3d_rope": Case(lambda: (variants.Switchable3dRoPE2D(100.0), reference.RoPE2D(100.0)), _rope_calls,
                               {}, difference=_rope_3d_difference, reason_mentions=("use_3d",)),
    "switchable_3d_rope_in_attention": _refused_rope_in_attention(),
    "qk_norm_attention": _refused_attention(variants.QkNormAttention, _on_first_call, ("q_norm",)),
    "layer_scale_block": _refused_block(variants.LayerScaleBlock, _on_first_call, ("ls1",)),
    "gamma_block_at_init": _refused_block(variants.GammaBlock, _gamma_difference, ("gamma_1",), keep_gamma=True),
    "temperature_attention": _refused_attention(variants.TemperatureAttention, _with_setting("temperature", 0.5),
                                                ("temperature",)),
    "half_rope_in_fp32_attention": _refused_attention(variants.HalfRopeInFp32Attention, _on_first_call),
    "half_rope_attention": _refused_attention(
        variants.HalfRopeAttention, lambda variant, twin: _on_first_call(variant, twin, dtype=torch.float64)),
    # the static check must follow forward into the methods it calls on self
    "helper_temperature_attention": _refused_attention(variants.HelperTemperatureAttention,
                                                       _with_setting("temperature", 0.5), ("temperature",)),
    # a class not named like upstream's, deriving from one
    "derived_temperature_attention": _refused_attention(variants.DerivedTemperatureAttention,
                                                        _with_setting("temperature", 0.5), ("temperature",)),
    # differences only some probe inputs reveal: non-square grids, large positions, per-sample positions,
    # square ManyAR samples, training mode
    "swapped_axes_rope": _refused_rope(variants.SwappedAxesRoPE2D, _rope_difference(_grid(1, 2, 6))),
    "clamped_table_rope": _refused_rope(variants.ClampedTableRoPE2D, _rope_difference(_grid(1, 3, 5, 40, 75))),
    "first_sample_positions_rope": _refused_rope(
        variants.FirstSamplePositionsRoPE2D, _rope_difference(torch.cat((_grid(1, 2, 6), _grid(1, 6, 2))))),
    "square_as_portrait_many_ar_patch_embed": _square_as_portrait_case(),
    "training_scaled_attention": _refused_attention(variants.TrainingScaledAttention, _in_training),
}


# ----------------------------------------------------------------------------------------------
# Harmless variants: verified by probe, replaced, same outputs on both backends
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(HARMLESS))
def test_harmless_variant_computes_the_spec_function(name):
    """The variant itself (unpatched) is the spec's function: fastpatch's eager classes with its weights."""
    case = HARMLESS[name]
    variant, twin = case.build()
    calls = case.calls()
    # the spec's classes need positions: calls without them are checked after patching only
    spec_calls = [call for call in calls if None not in call.args and len(call.args) == len(calls[0].args)]
    got, want = _outputs(variant, spec_calls), _outputs(twin, spec_calls)
    _assert_same(got, want, f"{name} against the spec's function")


@pytest.mark.parametrize("name", list(HARMLESS))
def test_harmless_variant_is_verified_by_probe_and_replaced(name, device):
    case = HARMLESS[name]
    variant, _ = case.build()
    calls = case.calls()
    expected = _outputs(variant, calls)
    expected_train = _outputs(variant.train(), calls)
    variant.eval()

    patched, user_warnings = _patch(variant)
    report = patched.fastpatch_report
    assert report.left_alone == [], f"{name}: {report.left_alone}"
    assert report.replaced == case.replaced, f"{name}: {report.summary()}"
    assert not user_warnings, [str(w.message) for w in user_warnings]
    for paths in case.replaced.values():
        for path in paths:
            want = VERIFIED if path in case.probed else KNOWN
            assert report.accepted_by[path] == want, f"{name}: {path} accepted by {report.accepted_by[path]!r}"
    assert type(patched) is getattr(fastpatch, next(r for r, p in case.replaced.items() if "<root>" in p))

    for backend in BACKENDS:
        actual = _outputs(patched, calls, backend, device_for(backend, device))
        _assert_same(actual, expected, f"{name} on the {backend} path")
    _assert_same(_outputs(patched.train(), calls, "torch"), expected_train, f"{name} in training mode")


def test_optional_positions_cross_attention_with_only_query_positions(device):
    """Positions optional: a call with query positions but no key positions (Nq == Nk) computes what it did."""
    variant, _ = HARMLESS["optional_positions_cross_attention"].build()
    query, memory, _, qpos, _ = _cross_attention_calls(same_lengths=True)[0].args
    calls = [Call((query, memory, memory, qpos)), Call((query, memory, memory, None, qpos))]
    expected = _outputs(variant, calls)
    patched, _ = _patch(variant)
    for backend in BACKENDS:
        _assert_same(_outputs(patched, calls, backend, device_for(backend, device)), expected,
                     f"one position argument on the {backend} path")


IGNORED_DROPOUTS = {
    "sdpa_attention_attn_drop": lambda: variants.SdpaAttention(DIM, rope=reference.RoPE2D(100.0), num_heads=HEADS,
                                                               qkv_bias=True, attn_drop=0.1),
    "block_without_drop_path": lambda: variants.NoDropPathBlock(DIM, HEADS, qkv_bias=True, drop_path=0.1,
                                                                rope=reference.RoPE2D(100.0)),
}


@pytest.mark.parametrize("name", list(IGNORED_DROPOUTS))
def test_variant_ignoring_its_dropout_keeps_its_training_outputs(name, device):
    """A forward that never applies its attn_drop / drop_path (p = 0.1) is deterministic in training: it
    must stay so, and unchanged, after patching (replaced without that dropout, or left alone)."""
    variant = _seeded(0, IGNORED_DROPOUTS[name]).train()
    calls = _self_attention_calls()
    expected = _outputs(variant, calls)
    patched, _ = _patch(variant)
    for backend in BACKENDS:
        _assert_same(_outputs(patched, calls, backend, device_for(backend, device)), expected,
                     f"{name}: training, {backend} path")


# ----------------------------------------------------------------------------------------------
# Real changes: left alone with a reason, outputs untouched, and really different from the spec
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REAL_CHANGES))
def test_real_change_differs_from_the_spec_function(name):
    """The refusal means something: for some input or setting the variant is not the spec's function."""
    case = REAL_CHANGES[name]
    variant, twin = case.build()
    err = case.difference(variant, twin)
    assert err > 10 * FP32, f"{name}: only {err:.2e} from the spec's function"


@pytest.mark.parametrize("name", list(REAL_CHANGES))
def test_real_change_is_left_alone(name, device):
    case = REAL_CHANGES[name]
    variant, _ = case.build()
    calls = case.calls()
    expected = _outputs(variant, calls)
    state = {key: value.clone() for key, value in variant.state_dict().items()}
    variant_class = type(variant)

    patched, user_warnings = _patch(variant)
    report = patched.fastpatch_report
    assert patched is variant and type(variant) is variant_class
    reasons = dict(report.left_alone)
    assert sorted(reasons) == sorted(case.left_alone), f"{name}: {report.summary()}"
    reason = reasons[case.left_alone[0]]
    assert isinstance(reason, str) and reason.strip(), f"{name}: empty reason"
    for word in case.reason_mentions:
        assert word in reason, f"{name}: the reason does not name {word!r}: {reason}"
    assert report.replaced == case.replaced, f"{name}: {report.summary()}"
    assert len(user_warnings) == 1, f"{name}: {[str(w.message) for w in user_warnings]}"
    assert all(torch.equal(value, state[key]) for key, value in variant.state_dict().items())

    exact = not case.replaced  # nothing inside replaced: bit for bit what it computed
    for backend in BACKENDS:
        run_on = device_for(backend, device)
        actual = _outputs(patched, calls, backend, run_on)
        _assert_same(actual, expected, f"{name} on the {backend} path", exact=exact and run_on.type == "cpu")


# ----------------------------------------------------------------------------------------------
# Probing leaves the model alone
# ----------------------------------------------------------------------------------------------
class _Model(nn.Module):
    """A container (no role) of harmless variants sharing one caching RoPE (one patch embedding with a
    spec-written position getter, one with fastpatch's eager one), plus one real change."""

    def __init__(self, with_real_change: bool = True):
        super().__init__()
        self.rope = variants.CachingOffsetTableRoPE2D(100.0)
        self.patch_embed = variants.TruncNormalInitPatchEmbed((IMG_H, IMG_W), PATCH, 3, DIM)
        self.patch_embed.position_getter = variants.GridPositionGetter()  # spec-written, not fastpatch's
        self.many_ar = variants.KaimingInitManyARPatchEmbed((IMG_H, IMG_W), PATCH, 3, DIM)
        self.attn = variants.SdpaAttention(DIM, rope=self.rope, num_heads=HEADS, qkv_bias=True)
        self.cross_attn = variants.OptionalPositionsCrossAttention(DIM, rope=self.rope, num_heads=HEADS)
        self.block = variants.PreNormBlock(DIM, HEADS, qkv_bias=True, rope=self.rope)
        if with_real_change:
            self.temperature_attn = variants.TemperatureAttention(DIM, rope=self.rope, num_heads=HEADS)

    def forward(self, img: torch.Tensor, true_shape: torch.Tensor) -> List[torch.Tensor]:
        x, pos = self.patch_embed(img)
        y, ypos = self.many_ar(img, true_shape)
        outputs = [x, y, self.attn(x, pos), self.cross_attn(x, y, y, pos, ypos), self.block(x, pos)]
        if hasattr(self, "temperature_attn"):
            outputs.append(self.temperature_attn(x, pos))
        return outputs


def _model_call() -> Call:
    return Call((_images(2, IMG_H, IMG_W, seed=15), torch.tensor([[IMG_H, IMG_W], [IMG_W, IMG_H]])))


def test_probing_leaves_the_model_untouched():
    model = _seeded(0, _Model).train()  # training mode: every dropout is 0, so probes run in it too
    modules = dict(model.named_modules())
    attributes = {path: set(vars(m)) for path, m in modules.items() if path}
    parameters = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    getters = [model.patch_embed.position_getter, model.many_ar.position_getter]
    rng = torch.get_rng_state()

    patched, user_warnings = _patch(model)
    assert torch.equal(torch.get_rng_state(), rng), "patch_model drew from the global random number generator"
    report = patched.fastpatch_report
    for path in ("rope", "patch_embed", "many_ar", "attn", "cross_attn", "block"):
        assert report.accepted_by.get(path) == VERIFIED, f"{path}: {report.summary()}"
    assert [path for path, _ in report.left_alone] == ["temperature_attn"]
    assert len(user_warnings) == 1

    assert modules["rope"].cache == {}, "probing filled the original RoPE's cache"
    assert all(g.cache_positions == {} for g in getters), "probing filled a position getter's cache"
    assert all(not m.cache for m in patched.modules() if isinstance(getattr(m, "cache", None), dict))
    for path, module in modules.items():
        if path:
            assert set(vars(module)) == attributes[path], f"{path}: attributes added or removed"
            assert module.training, f"{path}: the original's mode changed"
    assert all(m.training for m in patched.modules())
    after = dict(patched.named_parameters())
    assert after.keys() == parameters.keys()
    for name, (param, value) in parameters.items():
        assert after[name] is param, f"{name}: the patched model holds another tensor"
        assert torch.equal(param.detach(), value), f"{name}: changed by patching"
    # the cache checks mean something: running the originals does fill those caches
    tokens, pos = _rope_calls()[0].args
    modules["rope"](tokens, pos)
    img, true_shape = _model_call().args
    modules["patch_embed"](img)
    modules["many_ar"](img, true_shape)
    assert modules["rope"].cache and all(g.cache_positions for g in getters)


@variants.upstream_name("Attention")
class CountedSdpaAttention(variants.SdpaAttention):
    """Harmless SDPA attention used by the probe-count test only (its own code, so nothing about it can be
    remembered from another test): keys before queries, explicit ``scale``."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = variants.qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            k = self.rope(k, xpos)
            q = self.rope(q, xpos)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(variants.merge_heads(out)))


def test_identical_instances_are_probed_once(monkeypatch):
    """8 blocks holding SDPA attentions of one class and configuration (each its own weights) cost the
    probes of one: the variant's SDPA calls during patch_model do not grow with the number of instances."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    def blocks(count: int) -> nn.Module:
        rope = reference.RoPE2D(100.0)
        model = nn.ModuleList(reference.Block(DIM, HEADS, qkv_bias=True, rope=rope) for _ in range(count))
        for i, block in enumerate(model):
            block.attn = perturb_(CountedSdpaAttention(DIM, rope=rope, num_heads=HEADS, qkv_bias=True), seed=i)
        return model

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    counts = []
    for count in (1, 8):
        model = blocks(count)
        calls.clear()
        patched, _ = _patch(model)
        counts.append(len(calls))
        assert patched.fastpatch_report.accepted_by.get("0.attn") == VERIFIED, patched.fastpatch_report.summary()
        assert len(patched.fastpatch_report.replaced["Attention"]) == count
    one, eight = counts
    assert one > 0, "the SDPA variant was not run at all while being verified"
    assert eight <= one, f"8 identical instances ran the variant {eight} times, one instance {one} times"


# ----------------------------------------------------------------------------------------------
# Warnings and strict=True
# ----------------------------------------------------------------------------------------------
def _mixed_model() -> nn.Module:
    """One harmless variant, and two real changes of two classes (so 2 modules left alone, 2 classes)."""
    model = nn.Module()
    model.accepted = _seeded(0, lambda: variants.SdpaAttention(DIM, rope=reference.RoPE2D(100.0), num_heads=HEADS))
    model.temperature = _seeded(1, lambda: variants.TemperatureAttention(DIM, num_heads=HEADS))
    model.layer_scale = _seeded(2, lambda: variants.LayerScaleBlock(DIM, HEADS))
    return model


def _run_mixed(model: nn.Module) -> List[torch.Tensor]:
    x, pos = _self_attention_calls()[0].args
    with torch.no_grad(), use_backend("torch"):
        return [model.accepted(x, pos), model.temperature(x, pos), model.layer_scale(x, pos)]


def test_one_warning_per_call_names_how_many_and_which_classes():
    for _ in range(2):  # one warning per call, every call
        model = _mixed_model()
        patched, user_warnings = _patch(model)
        assert len(user_warnings) == 1, [str(w.message) for w in user_warnings]
        message = str(user_warnings[0].message)
        assert re.search(r"\b2\b", message), f"the warning does not say how many: {message}"
        for cls in (variants.TemperatureAttention, variants.LayerScaleBlock):
            assert cls.__name__ in message or cls.__qualname__ in message, f"{cls.__qualname__} unnamed: {message}"
        assert [path for path, _ in patched.fastpatch_report.left_alone] == ["temperature", "layer_scale"]


def test_strict_raises_and_leaves_the_model_unpatched():
    assert issubclass(fastpatch.PatchRefusedError, RuntimeError)
    model = _mixed_model()
    before = {path: (module, type(module)) for path, module in model.named_modules()}
    expected = _run_mixed(model)
    with pytest.raises(fastpatch.PatchRefusedError) as raised:
        fastpatch.patch_model(model, strict=True)
    assert "Attention" in str(raised.value) and "Block" in str(raised.value)
    assert not fastpatch.is_patched(model)
    after = {path: (module, type(module)) for path, module in model.named_modules()}
    assert after.keys() == before.keys()
    assert all(after[path][0] is module and after[path][1] is cls for path, (module, cls) in before.items())
    _assert_same([_run_mixed(model)], [expected], "strict refusal", exact=True)


def test_nothing_is_warned_when_everything_is_accepted():
    model = _seeded(0, lambda: _Model(with_real_change=False))
    expected = _outputs(model, [_model_call()])
    patched, user_warnings = _patch(model, strict=True)
    assert not user_warnings, [str(w.message) for w in user_warnings]
    report = patched.fastpatch_report
    assert report.left_alone == [], report.summary()
    for path in ("rope", "patch_embed", "many_ar", "attn", "cross_attn", "block"):
        assert report.accepted_by.get(path) == VERIFIED, f"{path}: {report.summary()}"
    assert isinstance(report.summary(), str) and "\n" not in report.summary()
    _assert_same(_outputs(patched, [_model_call()], "torch"), expected, "all accepted")
