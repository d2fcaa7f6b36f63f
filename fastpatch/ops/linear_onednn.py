"""Linear layers on CPU through oneDNN, with the GELU or the residual add fused into the GEMM.

``torch.nn.functional.linear`` on a float32 CPU tensor runs MKL's ``sgemm`` after copying the bias
into the output. Measured on the 2-core AMD EPYC (AVX-512) machine, 2026-12-02, torch 2.13, 2 threads,
a (1, 768, in) input, 5 timed calls per side: on the quiet machine (load average < 1) MKL and
oneDNN with the plain weight were level (1024 -> 3072: 28 vs 27 ms; 4096 -> 1024: 34-39 vs 35-37 ms),
and oneDNN with a prepacked weight (``mkldnn._reorder_linear_weight``) about 10% faster (26 and
31 ms; not used here: it would hold a second copy of every weight); under a load average of ~4.6
from other processes MKL slowed down more (1024 -> 3072: 71-78 vs 48-50 ms, 4096 -> 1024: 90 vs
60-64 ms). What this op saves for sure is the passes the fused post-ops replace (bias copy, GELU,
residual add). Whole-encoder results: ``bench/results/2026-12-02-cpu-upstream``.

``torch.ops.mkldnn._linear_pointwise`` -- the op inductor's CPU lowering uses for frozen linears --
runs oneDNN's inner product on plain (strided) tensors, applies the bias, and can apply a post-op
on the fp32 accumulator before the result is written: ``"gelu"`` (exact erf GELU, the
``nn.GELU()`` default) or a binary ``"add"`` of a residual. The weight is passed in its ordinary
``(out, in)`` layout; nothing is prepacked or cached, so this op holds no memory of its own.

:func:`linear` runs that op only for an inference call it can run exactly (:func:`onednn_usable`): CPU,
float32 everywhere, no CPU autocast (``F.linear`` would compute in its dtype), oneDNN built in and
enabled (``torch.backends.mkldnn.enabled``), nothing recording the call (autograd with an input
requiring grad, ``torch.compile`` tracing, jit tracing, dispatch/function modes, functorch transforms,
forward-mode tangents), plain ``torch.Tensor`` inputs. Every other call runs the plain torch ops, which
is also the autograd path. Both compute ``act(x @ weight.T + bias) + residual`` in float32; the results
differ by float32 round-off only (another summation order inside the GEMM, one rounding instead of two
for the fused add).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .direct_launch import launch_directly
from .forward_ad import carries_tangents

__all__ = ["linear", "onednn_usable", "ACTIVATIONS"]

ACTIVATIONS = (None, "gelu")  # the post-op names :func:`linear` accepts

_PARAMETER_TYPES = (torch.Tensor, torch.nn.Parameter)
_ONEDNN_BUILT = bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) \
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_usable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`linear` may run oneDNN for these tensors (see the module docstring).

    Requires ``x`` ``(..., in)`` with at least 2 dims and at least one element, ``weight``
    ``(out, in)`` contiguous, ``bias`` ``(out,)`` or None, ``residual`` None or a contiguous tensor of
    the output's shape; all float32 CPU plain tensors, and a call that nothing records.
    """
    if not _ONEDNN_BUILT or not torch.backends.mkldnn.enabled:
        return False
    if not launch_directly(x, residual) or carries_tangents(x, weight, bias, residual):
        return False  # x / residual: recorded, traced, in a mode or transform, or a tensor subclass
    if torch.is_autocast_enabled("cpu"):
        return False  # F.linear computes in the autocast dtype there; the fp32 GEMM would not
    grad = torch.is_grad_enabled()
    for parameter in (weight, bias):  # nn.Parameter is fine here (launch_directly wants plain tensors)
        if parameter is not None and (type(parameter) not in _PARAMETER_TYPES or (grad and parameter.requires_grad)):
            return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() < 2 or x.numel() == 0 or x.layout != torch.strided or weight.layout != torch.strided:
        return False
    if weight.dim() != 2 or not weight.is_contiguous() or weight.device.type != "cpu":
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu" or bias.dim() != 1):
        return False
    if residual is not None:
        if residual.dtype != torch.float32 or residual.device.type != "cpu" or not residual.is_contiguous():
            return False
        if residual.shape != x.shape[:-1] + weight.shape[:1]:
            return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           activation: Optional[str] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(x @ weight.T + bias) + residual``, on oneDNN with fused post-ops when it may run.

    Args:
        x: ``(..., in)``, any strides.
        weight: ``(out, in)``, as ``nn.Linear`` stores it.
        bias: ``(out,)`` or None.
        activation: None or ``"gelu"`` (exact erf GELU, ``nn.GELU(approximate="none")``).
        residual: None or a tensor of the output's shape ``(..., out)``, added after the activation
            (``residual + act(linear(x))``, the pre-norm block's skip connection).

    Returns:
        A new ``(..., out)`` tensor, contiguous. Differentiable on the plain path (the only path taken
        when autograd records the call). Only one of ``activation`` and ``residual`` is fused into
        the oneDNN call; given both, the residual is added by a separate op.

    Raises:
        ValueError: an ``activation`` not in :data:`ACTIVATIONS`.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if onednn_usable(x, weight, bias, residual):
        return _onednn_linear(x, weight, bias, activation, residual)
    out = F.linear(x, weight, bias)
    if activation == "gelu":
        out = F.gelu(out)
    return out if residual is None else residual + out


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str],
                   residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The oneDNN call of :func:`linear` (inputs already accepted by :func:`onednn_usable`)."""
    if residual is not None and activation is None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation or "none", [], "none" if activation else "")
    return out if residual is None else residual + out
