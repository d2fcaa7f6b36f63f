"""Behavioural verification: run a module and fastpatch's replacement on probe inputs and compare.

For a module whose code is not a known upstream version, :func:`probe_reason` builds CPU copies of
it with deterministic random parameters (float64, then float32), adopts each copy into fastpatch's
class exactly as :func:`~fastpatch.patch_model` would, and runs both forwards on fastpatch's torch
path (the caller refuses modules with active dropout first):

* attention: 12, 7 and 1 tokens in batches of 3 samples: a non-square grid at the origin, the
  same grid far from it, random positions holding zero and :data:`PROBE_MAX_POSITION`; Nq != Nk
  for cross-attention; ``None`` positions when the replacement is told they skip RoPE;
* blocks: the same tokens, with the attention and MLP children replaced by :class:`_StandIn`
  random functions of all their arguments (a block only wires its children; this checks the
  wiring for any children, and keeps a ViT-L block probe cheap);
* RoPE2D: head dims 16 and 64 on the same positions;
* patch embeddings: landscape, portrait and square images, with and without ``true_shape``;
  ManyAR batches mixing landscape and (stored transposed) portrait samples.

Every float64 call runs in eval mode, the first in training mode too; in float32 (which catches
code that changes precision only in fp32 runs) the first call runs in both modes.
Outputs must have the same structure, shapes and dtypes, integer outputs (positions) must be
equal, and floating outputs must agree within :func:`probe_tolerance`: round-off of the dtype
(:data:`fastpatch.testing.TOLERANCES`) plus, where RoPE angles enter, the rounding of angles that
upstream computes in float32 whatever the token dtype (2 u32 · F0 · max position: 1.5e-5 at F0 = 1;
measured 4e-7 for croco's own RoPE2D). The smallest real change known (an fp16 round trip of q/k
around RoPE) differs by 3e-4 and more.

Probing leaves the model untouched: the copies get fresh parameters (the real ones are never
copied, see :func:`_probe_copy`), their memo caches start empty, hooks are dropped, and the global
RNG state and thread count are restored afterwards. Probe parameters are uniform with the variance
of a 1/sqrt(fan-in) initialisation, so activations stay O(1).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..backend import use_backend
from ..testing import TOLERANCES, relative_error
from .adoption import adopt

__all__ = ["PROBE_MAX_POSITION", "probe_tolerance", "probe_reason", "active_dropout"]

#: Largest grid coordinate in the probes (DUSt3R's 512 model uses up to 31; 1024-pixel inputs 63).
PROBE_MAX_POSITION = 127
_SEED = 20261202
_FP32_UNIT_ROUNDOFF = 2.0 ** -24

Call = Tuple[tuple, dict]  # forward's positional and keyword arguments


def probe_tolerance(dtype: torch.dtype, rope_f0: Optional[float]) -> float:
    """Largest relative error (:func:`fastpatch.testing.relative_error`) a probe accepts (module docstring)."""
    angle = 0.0 if rope_f0 is None else 2 * _FP32_UNIT_ROUNDOFF * abs(rope_f0) * PROBE_MAX_POSITION
    return TOLERANCES[dtype].forward + angle


def active_dropout(module: nn.Module) -> Optional[str]:
    """The first dropout with a non-zero probability in ``module``'s subtree (its path), or None.

    Counts ``torch.nn`` dropouts (``p``) and stochastic depth modules (``drop_prob``, as timm's
    and croco's ``DropPath``). Random masks cannot be compared between two forwards.
    """
    for path, sub in module.named_modules():
        p = sub.p if isinstance(sub, nn.modules.dropout._DropoutNd) else getattr(sub, "drop_prob", 0.0)
        if isinstance(p, (int, float)) and p > 0:
            return f"{path or 'itself'} (p={p})"
    return None


# ----------------------------------------------------------------------------------------------
# Probe copies
# ----------------------------------------------------------------------------------------------
def _is_cache(name: str, value: object) -> bool:
    return isinstance(value, dict) and "cache" in name.lower()


def _probe_tensor(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A float64 CPU tensor shaped like a floating ``like``, random (unit variance, divided by
    sqrt(fan-in) for matrices), or a CPU copy of an integer ``like`` (index buffers)."""
    if not like.is_floating_point():
        if like.device.type == "meta":
            return torch.zeros(like.shape, dtype=like.dtype)
        return like.detach().to("cpu", copy=True)
    bound = math.sqrt(3.0) / (math.sqrt(max(1, like[0].numel())) if like.dim() >= 2 else 1.0)
    return torch.empty(like.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)


class _StandIn(nn.Module):
    """A cheap random function standing in for a block's child in a block probe.

    ``forward(x, *others, **named)`` returns ``x``'s shape: an elementwise nonlinearity of ``x`` plus,
    for every other tensor argument (by position and name, each with its own weight), the token mean
    of a nonlinearity of a float tensor, or the positions weighted per token (per sample when the
    token counts differ). A block whose forward wires its children differently from upstream's
    (another input, a missing residual, swapped arguments) gives another output.
    """

    def __init__(self, index: int, dtype: torch.dtype):
        super().__init__()
        generator = torch.Generator().manual_seed(_SEED + 7 * index)
        self.weights = torch.rand(16, 3, generator=generator, dtype=torch.float64).to(dtype) + 0.5

    def forward(self, x: torch.Tensor, *others, **named) -> torch.Tensor:
        w = self.weights
        out = torch.tanh(x * w[0, 0] + w[0, 1]) * w[0, 2]
        for i, other in enumerate(list(others) + [named[k] for k in sorted(named)], start=1):
            if not isinstance(other, torch.Tensor):
                continue
            if other.is_floating_point():
                out = out + (torch.tanh(other * w[i, 0]) * w[i, 1]).mean(dim=1, keepdim=True)
            else:
                term = (other.to(x.dtype) * w[i, :2]).sum(-1, keepdim=True) / PROBE_MAX_POSITION
                out = out + (term if term.shape[1] == x.shape[1] else term.mean(dim=1, keepdim=True))
        return out


def _stood_in(module: nn.Module) -> List[nn.Module]:
    """A block's children that hold its weights (attention, MLP): replaced by stand-ins in its probe."""
    return [child for name, child in module._modules.items() if child is not None and name in _STOOD_IN]


def _copied_modules(module: nn.Module, shell: bool) -> List[nn.Module]:
    """The modules whose parameters a probe copy gets probe values for (all but stand-in subtrees)."""
    skipped = {id(m) for child in _stood_in(module) for m in child.modules()} if shell else set()
    return [sub for sub in module.modules() if id(sub) not in skipped]


def _probe_state(module: nn.Module, generator: torch.Generator, shell: bool) -> Dict[int, torch.Tensor]:
    """id(real parameter or buffer) -> its float64 probe values, for every one in ``module``'s tree
    (``shell``: but in the children that get stand-ins)."""
    state: Dict[int, torch.Tensor] = {}
    for sub in _copied_modules(module, shell):
        for tensor in list(sub._parameters.values()) + list(sub._buffers.values()):
            if tensor is not None and id(tensor) not in state:
                state[id(tensor)] = _probe_tensor(tensor, generator)
    return state


def _probe_copy(module: nn.Module, state: Dict[int, torch.Tensor], dtype: torch.dtype, shell: bool) -> nn.Module:
    """A deep copy of ``module`` on the CPU whose parameters and buffers are ``state``'s probe values
    in ``dtype`` (the real tensors are mapped in the deepcopy memo, so they are never copied), whose
    memo caches (dict attributes named ``*cache*``) start empty and whose hooks are dropped.
    ``shell``: the attention and MLP children become :class:`_StandIn` functions instead of copies."""
    memo: Dict[int, object] = {}
    for index, child in enumerate(_stood_in(module) if shell else ()):
        memo[id(child)] = _StandIn(index, dtype)
    for sub in _copied_modules(module, shell):
        for tensor in sub._parameters.values():
            if tensor is not None:
                memo[id(tensor)] = nn.Parameter(_cast(state[id(tensor)], dtype), requires_grad=False)
        for tensor in sub._buffers.values():
            if tensor is not None:
                memo[id(tensor)] = _cast(state[id(tensor)], dtype)
        for obj in [sub] + [v for v in vars(sub).values() if hasattr(v, "__dict__") and not isinstance(v, nn.Module)]:
            for name, value in vars(obj).items():
                if _is_cache(name, value):
                    memo[id(value)] = type(value)()
    probe = copy.deepcopy(module, memo)
    for sub in probe.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks, sub._backward_pre_hooks,
                      sub._state_dict_hooks, sub._load_state_dict_pre_hooks):
            hooks.clear()
    return probe


def _cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype) if values.is_floating_point() else values.clone()


# ----------------------------------------------------------------------------------------------
# Probe inputs, per role
# ----------------------------------------------------------------------------------------------
def _positions(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, tokens, 2) probe positions: sample 0 a raster grid at the origin (3 columns, so
    non-square), sample 1 the same grid far from it (near :data:`PROBE_MAX_POSITION`), the others
    random positions holding a zero and the maximum; every sample differs."""
    index = torch.arange(tokens)
    grid = torch.stack((index // 3, index % 3), dim=-1)
    pos = torch.randint(0, PROBE_MAX_POSITION + 1, (batch, tokens, 2), generator=generator)
    pos[:, 0] = 0
    pos[:, -1] = PROBE_MAX_POSITION
    pos[0] = grid
    if batch > 1:
        pos[1] = grid + torch.tensor([PROBE_MAX_POSITION - 3 - (tokens - 1) // 3, PROBE_MAX_POSITION - 40])
    return pos


def _width(module: nn.Module, *names: str) -> Optional[int]:
    """The input width of the first of ``module``'s children ``names`` that declares one."""
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            width = getattr(child, "in_features", None) or getattr(child, "normalized_shape", (None,))[-1]
            if width is None and isinstance(getattr(child, "weight", None), torch.Tensor):
                width = child.weight.shape[-1]
            if isinstance(width, int):
                return width
    return None


def _tokens(batch: int, n: int, width: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, n, width, generator=generator, dtype=dtype)


#: Roles whose forward only wires its children: probed with :class:`_StandIn` attention and MLP.
_SHELL_ROLES = frozenset({"Block", "DecoderBlock", "VGGTBlock", "BlockRope"})
_STOOD_IN = frozenset({"attn", "cross_attn", "mlp"})
_BATCH = 3  # samples per probe call: a grid at the origin, a grid far from it, random positions


def _attention_calls(module, dtype, generator, optional_positions) -> Iterator[Call]:
    width = _width(module, "qkv")
    for n in (12, 7, 1):
        yield (_tokens(_BATCH, n, width, dtype, generator), _positions(_BATCH, n, generator)), {}
    if optional_positions:
        yield (_tokens(_BATCH, 12, width, dtype, generator), None), {}


def _cross_attention_calls(module, dtype, generator, optional_positions) -> Iterator[Call]:
    width = _width(module, "projq", "projk", "projv")
    for n_q, n_k, same_memory in ((12, 7, True), (7, 12, False), (1, 5, True)):
        query = _tokens(_BATCH, n_q, width, dtype, generator)
        key = _tokens(_BATCH, n_k, width, dtype, generator)
        value = key if same_memory else _tokens(_BATCH, n_k, width, dtype, generator)
        yield (query, key, value, _positions(_BATCH, n_q, generator), _positions(_BATCH, n_k, generator)), {}
    if optional_positions:
        q_pos, k_pos = _positions(_BATCH, query.shape[1], generator), _positions(_BATCH, key.shape[1], generator)
        for positions in ((None, None), (q_pos, None), (None, k_pos)):
            yield (query, key, value) + positions, {}


def _block_calls(width, dtype, generator, optional_positions) -> Iterator[Call]:
    for n in (12, 7):
        yield (_tokens(_BATCH, n, width, dtype, generator), _positions(_BATCH, n, generator)), {}


def _decoder_block_calls(width, dtype, generator, optional_positions) -> Iterator[Call]:
    for n_x, n_y in ((12, 7), (7, 12)):
        yield (_tokens(_BATCH, n_x, width, dtype, generator), _tokens(_BATCH, n_y, width, dtype, generator),
               _positions(_BATCH, n_x, generator), _positions(_BATCH, n_y, generator)), {}


def _rope_calls(module, dtype, generator, optional_positions) -> Iterator[Call]:
    for head_dim in (16, 64):
        for n in (12, 7):
            tokens = torch.randn(_BATCH, 2, n, head_dim, generator=generator, dtype=dtype)
            yield (tokens, _positions(_BATCH, n, generator)), {}


def _image(batch: int, channels: int, height: int, width: int, dtype, generator) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)


def _patch_embed_calls(module, dtype, generator, optional_positions) -> Iterator[Call]:
    channels, (ph, pw) = module.proj.in_channels, tuple(module.patch_size)
    for batch, rows, cols in ((2, 2, 3), (1, 3, 1), (1, 2, 2)):
        img = _image(batch, channels, rows * ph, cols * pw, dtype, generator)
        yield (img,), {}
        yield (img,), {"true_shape": torch.tensor([[rows * ph, cols * pw]] * batch)}


def _many_ar_calls(module, dtype, generator, optional_positions) -> Iterator[Call]:
    channels, p = module.proj.in_channels, module.patch_size[0]
    # (tensor rows, tensor cols) in patches, then each sample's true (height, width) in patches.
    for rows, cols, shapes in ((2, 3, ((2, 3), (3, 2))), (1, 2, ((2, 1), (1, 2), (2, 1))), (2, 2, ((2, 2),))):
        img = _image(len(shapes), channels, rows * p, cols * p, dtype, generator)
        yield (img, torch.tensor(shapes) * p), {}


def _qknorm_attention_calls(module, dtype, generator, optional_positions) -> Iterator[Call]:
    """VGGT / π3 attention: the usual attention probes (positions required: these apply RoPE); π3's
    forward (x, attn_bias, xpos) gets ``attn_bias=None``."""
    width = _width(module, "qkv")
    takes_bias = len(inspect.signature(type(module).forward).parameters) == 4
    for n in (12, 7, 1):
        x, pos = _tokens(_BATCH, n, width, dtype, generator), _positions(_BATCH, n, generator)
        yield ((x, None, pos) if takes_bias else (x, pos)), {}


_CALLS: Dict[str, Callable[..., Iterator[Call]]] = {
    "VGGTAttention": _qknorm_attention_calls,
    "FlashAttentionRope": _qknorm_attention_calls,
    "VGGTBlock": _block_calls,
    "BlockRope": _block_calls,
    "Attention": _attention_calls,
    "CrossAttention": _cross_attention_calls,
    "Block": _block_calls,
    "DecoderBlock": _decoder_block_calls,
    "RoPE2D": _rope_calls,
    "cuRoPE2D": _rope_calls,
    "PatchEmbedDust3R": _patch_embed_calls,
    "ManyAR_PatchEmbed": _many_ar_calls,
}


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------
def _kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _difference(original: object, replacement: object, tolerance: float) -> Optional[str]:
    """How ``original``'s output differs from ``replacement``'s (None: same to ``tolerance``)."""
    if isinstance(original, torch.Tensor) and isinstance(replacement, torch.Tensor):
        if original.shape != replacement.shape or original.dtype != replacement.dtype:
            return f"returns {_kind(original)}, fastpatch {_kind(replacement)}"
        if not original.is_floating_point():
            return None if torch.equal(original, replacement) else f"returns other {original.dtype} values"
        error = relative_error(replacement, original)
        return None if error <= tolerance else f"differs by {error:.1e} (tolerance {tolerance:.1e})"
    if isinstance(original, (tuple, list)) and isinstance(replacement, (tuple, list)) \
            and len(original) == len(replacement):
        for a, b in zip(original, replacement):
            reason = _difference(a, b, tolerance)
            if reason is not None:
                return reason
        return None
    if type(original) is type(replacement) and not isinstance(original, torch.Tensor) and original == replacement:
        return None
    return f"returns {_kind(original)}, fastpatch {_kind(replacement)}"


def _describe(call: Call) -> str:
    args, kwargs = call
    parts = [_kind(a) if isinstance(a, torch.Tensor) else repr(a) for a in args]
    parts += [f"{k}={_kind(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def probe_reason(module: nn.Module, role_name: str, replacement_class: type,
                 semantics: Optional[Dict[str, object]] = None, rope_f0: Optional[float] = None) -> Optional[str]:
    """Why ``module`` and ``replacement_class`` adopting it disagree on the probes (None: they agree).

    Args:
        module: the built module (any device; never modified, its parameters never copied).
        role_name: the upstream class it stands for (picks the probe inputs).
        replacement_class: fastpatch's class for that role.
        semantics: instance attributes :func:`~fastpatch.patching.adoption.adopt` gives the
            replacement (what the original ignores); ``optional_positions`` adds ``None``-position probes.
        rope_f0: the F0 of the RoPE the module applies, if any (widens the tolerance, see
            :func:`probe_tolerance`).
    """
    semantics = semantics or {}
    with torch.random.fork_rng(devices=[]), torch.no_grad(), use_backend("torch"), warnings.catch_warnings(), \
            _one_thread():
        warnings.simplefilter("ignore")
        return _probe(module, role_name, replacement_class, semantics, rope_f0)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Probe tensors are tiny: one intra-op thread avoids OpenMP waits (100x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _probe(module: nn.Module, role_name: str, replacement_class: type, semantics: Dict[str, object],
           rope_f0: Optional[float]) -> Optional[str]:
    """:func:`probe_reason` without the global settings it makes."""
    calls_of = _CALLS[role_name]
    shell = role_name in _SHELL_ROLES
    width = _width(module, "norm1", "norm_y", "norm2", "attn", "mlp") if shell else None
    state = _probe_state(module, torch.Generator().manual_seed(_SEED), shell)
    for dtype, eval_calls in ((torch.float64, None), (torch.float32, 1)):
        original = _probe_copy(module, state, dtype, shell)
        replacement = adopt(original, replacement_class, "auto", semantics)
        generator = torch.Generator().manual_seed(_SEED + 1)
        try:
            calls = list(calls_of(original if width is None else width, dtype, generator,
                                  semantics.get("optional_positions", False)))
        except (AttributeError, TypeError, ValueError, IndexError) as error:
            return f"probe inputs cannot be sized from its children ({type(error).__name__}: {error})"
        # Every call in eval mode (float32: the first only), the first one in training mode too.
        for training, selected in ((False, calls[:eval_calls]), (True, calls[:1])):
            original.train(training)
            replacement.train(training)
            for args, kwargs in selected:
                reason = _run_both(original, replacement, args, kwargs, probe_tolerance(dtype, rope_f0))
                if reason is not None:
                    mode = "training" if training else "eval"
                    return f"probe {_describe((args, kwargs))} in {dtype} {mode} mode: {reason}"
    return None


def _run_both(original: nn.Module, replacement: nn.Module, args: tuple, kwargs: dict,
              tolerance: float) -> Optional[str]:
    try:
        expected = original.forward(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of the original on valid inputs is a refusal
        return f"its forward raises {type(error).__name__}: {error}"
    try:
        actual = replacement.forward(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        return f"fastpatch's forward raises {type(error).__name__}: {error}"
    return _difference(expected, actual, tolerance)
