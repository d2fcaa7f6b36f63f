"""FLOP counts of the benchmarked components, from spec ``dust3r-vit.md`` §11.

One multiply-add is 2 FLOPs; softmax, LayerNorm, GELU and RoPE are left out (< 1 %). A forward +
backward pass counts 3x the forward for the linear layers (forward, grad of input, grad of weight)
and 3.5x for the attention core (FlashAttention's convention: the backward recomputes the scores and
does four more products, 2.5x the forward).
"""
from __future__ import annotations

__all__ = ["attention_core", "component", "encoder", "decoder_pair", "linear_head", "pair", "scene", "patch_embed",
           "mode_factors"]

IN_CHANS = 3
FWD_BWD_LINEAR = 3.0
FWD_BWD_ATTENTION = 3.5


def mode_factors(mode: str) -> tuple:
    """(linear, attention-core) multipliers of the forward FLOPs for ``"forward"`` / ``"forward_backward"``."""
    if mode == "forward":
        return 1.0, 1.0
    if mode == "forward_backward":
        return FWD_BWD_LINEAR, FWD_BWD_ATTENTION
    raise ValueError(f"unknown mode {mode!r}")


def attention_core(batch: int, heads: int, q_tokens: int, k_tokens: int, head_dim: int) -> float:
    """softmax(q k^T) v forward: the two products, 4 B H Nq Nk Dh."""
    return 4.0 * batch * heads * q_tokens * k_tokens * head_dim


def patch_embed(batch: int, tokens: int, embed_dim: int, patch: int = 16, in_chans: int = IN_CHANS) -> float:
    """Patch projection: 2 B N C_in p^2 E."""
    return 2.0 * batch * tokens * in_chans * patch * patch * embed_dim


def component(name: str, mode: str, batch: int, tokens: int, dim: int) -> float:
    """FLOPs of an attention module or block at ``dim`` channels on ``tokens`` tokens (cross: Nq = Nk).

    ``attention`` / ``cross_attention``: four C x C projections (qkv or q, k, v; proj) + the core;
    ``block``: attention + MLP (ratio 4), 24 B N C^2 + 4 B N^2 C (spec §11: 12 N C^2 + 2 N^2 C MACs);
    ``decoder_block``: self + cross attention + MLP, 32 B N d^2 + 8 B N^2 d (16 N d^2 + 4 N^2 d MACs).
    """
    attention_parts = {"attention": 1, "cross_attention": 1, "block": 1, "decoder_block": 2}
    projections = {"attention": 4, "cross_attention": 4, "block": 12, "decoder_block": 16}  # C x C products
    if name not in attention_parts:
        raise ValueError(f"no FLOP formula for {name!r}")
    linear_factor, attention_factor = mode_factors(mode)
    linear = 2.0 * batch * tokens * dim * dim * projections[name]
    core = attention_parts[name] * attention_core(batch, 1, tokens, tokens, dim)  # H * Dh = C
    return linear_factor * linear + attention_factor * core


def encoder(batch: int, tokens: int, dim: int = 1024, depth: int = 24, patch: int = 16) -> float:
    """ViT encoder forward: patch embedding + ``depth`` blocks (523.0 GFLOPs per image at 512x384)."""
    return patch_embed(batch, tokens, dim, patch) + depth * component("block", "forward", batch, tokens, dim)


def decoder_pair(batch: int, tokens: int, enc_dim: int = 1024, dec_dim: int = 768, dec_depth: int = 12) -> float:
    """decoder_embed on both views and both decoder streams of a pair (95.1 GFLOPs at 224x224, spec §11)."""
    decoder_embed = 2 * 2.0 * batch * tokens * enc_dim * dec_dim
    return decoder_embed + 2 * dec_depth * component("decoder_block", "forward", batch, tokens, dec_dim)


def linear_head(batch: int, tokens: int, dec_dim: int = 768, patch: int = 16, channels: int = 4) -> float:
    """DUSt3R's linear head on one view: the projection to ``channels`` x p^2 values per token, 2 B N d c p^2."""
    return 2.0 * batch * tokens * dec_dim * channels * patch * patch


def pair(batch: int, tokens: int, enc_dim: int = 1024, enc_depth: int = 24, dec_dim: int = 768,
         dec_depth: int = 12) -> float:
    """Backbone forward on an image pair, no heads: two encodes, decoder_embed and both decoder
    streams (1483 GFLOPs per pair at 512x384)."""
    return 2 * encoder(batch, tokens, enc_dim, enc_depth) + decoder_pair(batch, tokens, enc_dim, dec_dim, dec_depth)


def scene(encodes: int, pairs: int, tokens: int) -> float:
    """A scene's inference with the ViT-L/Base linear-head model: ``encodes`` image encodes, then per
    pair both decoder streams and both heads (all images of ``tokens`` tokens)."""
    return encoder(encodes, tokens) + decoder_pair(pairs, tokens) + 2 * linear_head(pairs, tokens)
