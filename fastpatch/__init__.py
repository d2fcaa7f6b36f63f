"""fastpatch: Triton kernels for DUSt3R-family models (DUSt3R, MASt3R, CroCo).

Drop-in modules with upstream's constructor arguments and state_dict keys, functional ops with
autograd, and :func:`patch_model` to accelerate an already-built model in place. Which
implementation runs (compiled Triton, Triton interpreter, or the torch path) is decided in
:mod:`fastpatch.backend`.
"""
from .backend import use_backend
from .ops.rope_attention import rope_attention
from .ops.qknorm_rope_attention import TokenGrid, qknorm_rope_attention
from .modules.attention import Attention, CrossAttention, RoPE2D
from .modules.blocks import Block, DecoderBlock, Mlp
from .modules.qknorm_attention import BlockRope, FlashAttentionRope, VGGTAttention, VGGTBlock
from .modules.patch_embed import ManyAR_PatchEmbed, PatchEmbedDust3R, get_patch_embed
from .ops.patch_embed import patch_embed
from .patching import (PatchRefusedError, PatchReport, is_patched, patch_dust3r, patch_model, unpatch_dust3r,
                       unpatch_model)
from .engine import inference, symmetric_inference

__version__ = "0.1.0"
