"""The whole DUSt3R model (backbone + linear heads) with dust3r's model interface, from the spec.

Written from ``shared/spec/dust3r-vit.md`` §9: :class:`Dust3RModel` extends
:class:`fastpatch.reference.Dust3RBackbone` with the two ``linear`` prediction heads and the methods
dust3r's ``inference`` (and :func:`fastpatch.inference`) call on a model:

* ``_encode_image(image, true_shape) -> (features (B, N, enc_dim), pos (B, N, 2), None)``;
* ``_encode_symmetrized(view1, view2) -> ((shape1, shape2), (feat1, feat2), (pos1, pos2))``;
* ``_decoder(f1, pos1, f2, pos2) -> (dec1, dec2)``, two tuples of ``dec_depth + 1`` tensors;
* ``_downstream_head(head_num, decout, img_shape) -> {'pts3d': (B, H, W, 3), 'conf': (B, H, W)}``;
* ``forward(view1, view2) -> (res1, res2)``: ``res1 = {'pts3d', 'conf'}``,
  ``res2 = {'pts3d_in_other_view', 'conf'}`` (view 2's points in view 1's frame).

A view is a dict with ``'img'`` (B, 3, H, W), optional ``'true_shape'`` (B, 2) of (height, width)
(default: the tensor's size) and ``'instance'`` (B labels). State-dict keys are a DUSt3R linear-head
checkpoint's: the backbone keys, then ``downstream_head1.proj.*`` and ``downstream_head2.proj.*``.
Like the backbone, this is the eager baseline and, in float64, an oracle; nothing here is fast on purpose.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .reference import DUST3R_CONFIGS, Dust3RBackbone

__all__ = ["LinearPts3d", "Dust3RModel", "DUST3R_MODEL_CONFIGS", "dust3r_model"]

Prediction = Dict[str, torch.Tensor]


def _points_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """depth_mode 'exp': v -> (v / |v|) * (e^|v| - 1) over the last axis (|v| floored at 1e-8 in the division)."""
    norm = raw.norm(dim=-1, keepdim=True)
    return raw / norm.clamp(min=1e-8) * torch.expm1(norm)


class LinearPts3d(nn.Module):
    """DUSt3R's ``linear`` head: per token, ``p x p`` pixels of 3D points and a confidence.

    ``forward(decout, img_shape=(H, W))`` reads ``decout[-1]`` (B, (H/p)·(W/p), dec_dim), tokens in
    raster order of an (H/p) x (W/p) grid, and returns ``{'pts3d': (B, H, W, 3), 'conf': (B, H, W)}``:
    ``proj`` maps each token to (3 + 1)·p² values, channel c of sub-pixel (i, j) being value
    c·p² + i·p + j (pixel shuffle); points are post-processed with depth_mode 'exp' and the confidence
    as conf_min + min(e^c, conf_max - conf_min). Keys: ``proj.weight`` ((3 + 1)·p², dec_dim), ``proj.bias``.
    """

    def __init__(self, dec_embed_dim: int, patch_size: int, conf_min: float = 1.0, conf_max: float = math.inf):
        super().__init__()
        self.patch_size = patch_size
        self.conf_min, self.conf_max = conf_min, conf_max
        self.proj = nn.Linear(dec_embed_dim, (3 + 1) * patch_size ** 2)

    def forward(self, decout: Sequence[torch.Tensor], img_shape: Tuple[int, int]) -> Prediction:
        height, width = img_shape
        p = self.patch_size
        tokens = decout[-1]
        batch, n, _ = tokens.shape
        if height % p or width % p or n != (height // p) * (width // p):
            raise ValueError(f"head: {n} tokens do not tile a {height}x{width} image in {p}x{p} patches")
        feat = self.proj(tokens).transpose(1, 2).reshape(batch, -1, height // p, width // p)
        pixels = F.pixel_shuffle(feat, p).permute(0, 2, 3, 1)  # (B, H, W, 4)
        conf = self.conf_min + pixels[..., 3].exp().clamp(max=self.conf_max - self.conf_min)
        return {"pts3d": _points_from_raw(pixels[..., :3]), "conf": conf}


def _transposed(prediction: Prediction) -> Prediction:
    """Swap the two image axes (1, 2) of every map."""
    return {key: value.swapaxes(1, 2) for key, value in prediction.items()}


def _is_symmetrized(view1: dict, view2: dict) -> bool:
    """Whether sample 2k of the batch is a pair (a, b) and sample 2k + 1 is (b, a), by 'instance' labels.

    A batch of one, an odd batch or views without 'instance' labels are not symmetrised.
    """
    first, second = view1.get("instance"), view2.get("instance")
    if first is None or second is None or len(first) != len(second) or len(first) < 2 or len(first) % 2:
        return False
    return all(first[k] == second[k + 1] and first[k + 1] == second[k] for k in range(0, len(first), 2))


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Rows [even0, odd0, even1, odd1, ...]."""
    return torch.stack((even, odd), dim=1).flatten(0, 1)


def _true_shape(view: dict) -> torch.Tensor:
    """The view's (B, 2) integer (height, width), as a tensor; the image tensor's size when absent."""
    img = view["img"]
    shape = view.get("true_shape")
    if shape is None:
        return torch.tensor(img.shape[-2:]).repeat(img.shape[0], 1)
    shape = torch.as_tensor(shape)
    if tuple(shape.shape) != (img.shape[0], 2):
        raise ValueError(f"true_shape must have shape ({img.shape[0]}, 2), got {tuple(shape.shape)}")
    return shape


class Dust3RModel(Dust3RBackbone):
    """DUSt3R (``AsymmetricCroCo3DStereo``) with linear heads and the dust3r model interface.

    Constructor: upstream's model arguments, ``output_mode='pts3d'``, ``head_type='linear'``,
    ``depth_mode=('exp', -inf, inf)``, ``conf_mode=('exp', 1, inf)``, ``landscape_only=True``,
    then the :class:`Dust3RBackbone` arguments. Only these head settings are implemented (anything
    else raises ``ValueError``).

    ``landscape_only`` (how the head reads the decoder tokens of a batch):

    * ``True`` (the constructor default, as in training): the batch tensor is landscape (W >= H);
      each portrait sample (true height > true width, stored transposed, as ManyAR embeds it) is
      predicted on its (W/p rows x H/p cols) token grid and its maps are transposed back, so every
      output is (B, H, W, ...) in the batch tensor's layout;
    * ``False`` (how dust3r's ``load_model`` builds released checkpoints): every sample of a batch must
      have the same true shape (H, W), and the maps are (B, H, W, ...) in that shape.
    """

    def __init__(self, output_mode: str = "pts3d", head_type: str = "linear",
                 depth_mode: tuple = ("exp", -math.inf, math.inf), conf_mode: tuple = ("exp", 1, math.inf),
                 landscape_only: bool = True, **backbone_kwargs):
        if output_mode != "pts3d" or head_type != "linear":
            raise ValueError(f"only output_mode='pts3d' with head_type='linear' is implemented, "
                             f"got {output_mode!r} / {head_type!r}")
        if tuple(depth_mode) != ("exp", -math.inf, math.inf):
            raise ValueError(f"only depth_mode=('exp', -inf, inf) is implemented, got {depth_mode!r}")
        if conf_mode is None or len(conf_mode) != 3 or conf_mode[0] != "exp":
            raise ValueError(f"only conf_mode=('exp', min, max) is implemented, got {conf_mode!r}")
        super().__init__(**backbone_kwargs)
        self.output_mode, self.head_type = output_mode, head_type
        self.depth_mode, self.conf_mode = tuple(depth_mode), tuple(conf_mode)
        self.landscape_only = landscape_only
        dec_embed_dim, patch_size = self.decoder_embed.out_features, self.patch_embed.patch_size[0]
        self.downstream_head1 = LinearPts3d(dec_embed_dim, patch_size, conf_mode[1], conf_mode[2])
        self.downstream_head2 = LinearPts3d(dec_embed_dim, patch_size, conf_mode[1], conf_mode[2])

    # -- dust3r's model interface ---------------------------------------------------------------
    def _encode_image(self, image: torch.Tensor, true_shape: Optional[torch.Tensor]):
        """(B, 3, H, W), (B, 2) -> (features (B, N, enc_dim), positions (B, N, 2) int64, None)."""
        if true_shape is not None:
            true_shape = torch.as_tensor(true_shape).to(image.device)
        features, pos = self.encode(image, true_shape)
        return features, pos, None

    def _encode_pair(self, img1, img2, shape1, shape2):
        """Encode both images of each pair; one batch when the two tensors have the same size."""
        if img1.shape[-2:] == img2.shape[-2:]:
            features, pos, _ = self._encode_image(torch.cat((img1, img2)), torch.cat((shape1, shape2)))
            (feat1, feat2), (pos1, pos2) = features.chunk(2), pos.chunk(2)
            return feat1, feat2, pos1, pos2
        feat1, pos1, _ = self._encode_image(img1, shape1)
        feat2, pos2, _ = self._encode_image(img2, shape2)
        return feat1, feat2, pos1, pos2

    def _encode_symmetrized(self, view1: dict, view2: dict):
        """Encode a batch of pairs; a symmetrised batch (see :func:`_is_symmetrized`) encodes its even samples only.

        Returns ``((shape1, shape2), (feat1, feat2), (pos1, pos2))``: the (B, 2) true shapes, the
        encoder outputs (B, N, enc_dim) and positions (B, N, 2) of each view.
        """
        img1, img2 = view1["img"], view2["img"]
        shape1, shape2 = _true_shape(view1), _true_shape(view2)
        if _is_symmetrized(view1, view2):
            feat1, feat2, pos1, pos2 = self._encode_pair(img1[::2], img2[::2], shape1[::2], shape2[::2])
            feat1, feat2 = _interleave(feat1, feat2), _interleave(feat2, feat1)
            pos1, pos2 = _interleave(pos1, pos2), _interleave(pos2, pos1)
        else:
            feat1, feat2, pos1, pos2 = self._encode_pair(img1, img2, shape1, shape2)
        return (shape1, shape2), (feat1, feat2), (pos1, pos2)

    def _decoder(self, f1, pos1, f2, pos2) -> Tuple[tuple, tuple]:
        """Both decoder streams: per view a tuple [encoder output, block outputs..., the last after dec_norm]."""
        out1, out2 = self.decode(f1, pos1, f2, pos2)
        return tuple(out1), tuple(out2)

    def _downstream_head(self, head_num: int, decout: Sequence[torch.Tensor], img_shape: torch.Tensor) -> Prediction:
        """Head ``head_num`` (1 or 2) on one view's decoder outputs, in float32 with autocast off.

        ``img_shape``: the view's (B, 2) true shapes. Returns ``{'pts3d': (B, H, W, 3), 'conf': (B, H, W)}``
        laid out as the class docstring says for ``landscape_only``.
        """
        if head_num not in (1, 2):
            raise ValueError(f"head_num must be 1 or 2, got {head_num!r}")
        head = self.downstream_head1 if head_num == 1 else self.downstream_head2
        decout = [tokens.float() for tokens in decout]
        shapes = torch.as_tensor(img_shape).cpu()
        with torch.autocast(decout[-1].device.type, enabled=False):
            if not self.landscape_only:
                if not (shapes == shapes[0]).all():
                    raise ValueError(f"landscape_only=False needs one true shape per batch, got {shapes.tolist()}")
                return head(decout, tuple(shapes[0].tolist()))
            return self._landscape_head(head, decout, shapes)

    @staticmethod
    def _landscape_head(head: LinearPts3d, decout: List[torch.Tensor], shapes: torch.Tensor) -> Prediction:
        short, long = int(shapes.min()), int(shapes.max())
        portrait = shapes[:, 0] > shapes[:, 1]
        if not portrait.any():
            return head(decout, (short, long))
        if portrait.all():
            return _transposed(head(decout, (long, short)))
        landscape = ~portrait
        by_landscape = head([tokens[landscape] for tokens in decout], (short, long))
        by_portrait = _transposed(head([tokens[portrait] for tokens in decout], (long, short)))
        merged = {}
        for key, value in by_landscape.items():
            merged[key] = value.new_empty((len(shapes),) + value.shape[1:])
            merged[key][landscape] = value
            merged[key][portrait] = by_portrait[key]
        return merged

    def forward(self, view1: dict, view2: dict) -> Tuple[Prediction, Prediction]:
        """A batch of pairs -> (res1 {'pts3d', 'conf'}, res2 {'pts3d_in_other_view', 'conf'}), float32 maps."""
        (shape1, shape2), (feat1, feat2), (pos1, pos2) = self._encode_symmetrized(view1, view2)
        dec1, dec2 = self._decoder(feat1, pos1, feat2, pos2)
        res1 = self._downstream_head(1, dec1, shape1)
        res2 = self._downstream_head(2, dec2, shape2)
        res2["pts3d_in_other_view"] = res2.pop("pts3d")
        return res1, res2


DUST3R_MODEL_CONFIGS: Dict[str, dict] = {
    f"{name}_linear": dict(config, head_type="linear", patch_embed_cls="PatchEmbedDust3R", landscape_only=False)
    for name, config in DUST3R_CONFIGS.items()
}


def dust3r_model(config: str = "DUSt3R_ViTLarge_BaseDecoder_512_linear", **overrides) -> Dust3RModel:
    """Build a :class:`Dust3RModel` from a named config (:data:`DUST3R_MODEL_CONFIGS`), keyword overrides applied.

    The configs are the released linear-head checkpoints as dust3r's ``load_model`` builds them for
    inference: ``PatchEmbedDust3R``, ``landscape_only=False`` (override both for ManyAR batches).
    """
    if config not in DUST3R_MODEL_CONFIGS:
        raise ValueError(f"unknown DUSt3R model config {config!r}; expected one of {sorted(DUST3R_MODEL_CONFIGS)}")
    return Dust3RModel(**dict(DUST3R_MODEL_CONFIGS[config], **overrides))
