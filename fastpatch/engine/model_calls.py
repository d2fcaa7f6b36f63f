"""The few calls the engine makes into a DUSt3R / MASt3R model, through the model's own methods.

The engine never reimplements the network: it calls

* ``model._encode_image(img (B, C, H, W), true_shape (B, 2)) -> (tokens (B, N, C), pos (B, N, 2), ...)``,
* ``model._decoder(f1, pos1, f2, pos2) -> (dec1, dec2)``, each a sequence of ``(B, N, D)`` layer outputs,
* ``model._downstream_head(head_num, decout, true_shape) -> dict`` of ``(B, H, W, ...)`` tensors
  (``pts3d``, ``conf``; MASt3R adds ``desc``, ``desc_conf``),

so a patched model runs fastpatch's kernels and an unpatched one runs its own code. As dust3r's
``forward`` does, heads run with autocast off on float32 tokens. True shapes reach the encoder on the
image's device (some patch embeddings index the image with them) and the heads on the CPU (where
dust3r's ``inference`` leaves them; the heads read them as Python numbers).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ENGINE_METHODS", "has_engine_methods", "encode", "decode", "run_head", "as_second_view", "move_rows"]

#: The methods the engine needs; without them it falls back to ``model(view1, view2)``.
ENGINE_METHODS = ("_encode_image", "_decoder", "_downstream_head")

Rows = Union[None, slice, torch.Tensor]


def has_engine_methods(model: object) -> bool:
    """True when ``model`` has callable ``_encode_image``, ``_decoder`` and ``_downstream_head``."""
    return all(callable(getattr(model, name, None)) for name in ENGINE_METHODS)


def encode(model, img: torch.Tensor, true_shape: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Encoder tokens ``(B, N, C)`` and positions ``(B, N, 2)`` of ``img`` ``(B, C, H, W)``.

    ``true_shape``: ``(B, 2)`` integer, any device (moved to the image's).
    """
    out = model._encode_image(img, true_shape.to(img.device))
    return out[0], out[1]


def decode(model, f1: torch.Tensor, pos1: torch.Tensor, f2: torch.Tensor, pos2: torch.Tensor):
    """Both decoders: ``(dec1, dec2)``, tuples of ``(B, N, D)`` layer outputs for sides 1 and 2."""
    dec1, dec2 = model._decoder(f1, pos1, f2, pos2)
    return tuple(dec1), tuple(dec2)


def _autocast_off(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def run_head(model, head_num: int, decout: Sequence[torch.Tensor], true_shape: torch.Tensor,
             rows: Rows = None) -> Dict[str, torch.Tensor]:
    """``model._downstream_head(head_num, ...)`` on the rows ``rows`` (all when ``None``) of ``decout``.

    ``decout``: the decoder's ``(B, N, D)`` layer outputs for this side; ``true_shape``: ``(b, 2)``
    integer CPU tensor for the selected rows. Runs with autocast off on float32 tokens.
    """
    tokens = [layer if rows is None else layer[rows] for layer in decout]
    with _autocast_off(tokens[-1].device):
        return model._downstream_head(head_num, [t.float() for t in tokens], true_shape)


def as_second_view(result: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """dust3r's naming for head 2: its ``pts3d`` are view 2's points in view 1's frame (in place)."""
    if "pts3d" in result:
        result["pts3d_in_other_view"] = result.pop("pts3d")
    return result


def move_rows(result: Dict[str, torch.Tensor], device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """``result`` with every value on ``device`` (CPU by default).

    Raises:
        TypeError: a value is not a tensor (the engine splits every output by rows).
    """
    out = {}
    for name, value in result.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model output {name!r} is a {type(value).__name__}; the pair engine needs tensors "
                            "with one row per pair")
        out[name] = value.to(device or "cpu")
    return out
