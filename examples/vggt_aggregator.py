"""A VGGT-sized aggregator (spec vggt.md §1.3-1.4, random weights), eager vs patched by fastpatch.

Builds the alternating-attention trunk from :mod:`fastpatch.reference_vggt`: per frame a camera token
and 4 register tokens (slot 0 for frame 0, slot 1 for the others) before the patch tokens, then
``depth`` pairs of (frame block, global block) at width 1024 / 16 heads with qk-norm and RoPE2D base
100, LayerScale 0.01. The DINOv2 patch embedding is replaced by random patch features. Runs it eager,
patches it with :func:`fastpatch.patch_model`, runs it again and prints time, peak memory and the
largest relative difference.

    python examples/vggt_aggregator.py                      # CPU: 2 frames, 2 block pairs (fp32)
    python examples/vggt_aggregator.py --frames 32 --depth 24 --dtype bfloat16   # a GPU, VGGT-1B size
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

import fastpatch
from fastpatch import reference_vggt as ref
from fastpatch.testing import relative_error

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.memory import peak_tensor_bytes  # noqa: E402


class Aggregator(nn.Module):
    """``forward(patch_tokens (S, P, C), height, width) -> (S, 5 + P, C)`` after ``depth`` frame/global pairs."""

    def __init__(self, dim: int = 1024, heads: int = 16, depth: int = 24):
        super().__init__()
        rope = ref.RotaryPositionEmbedding2D(100.0)
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, dim) * 0.02)
        self.register_token = nn.Parameter(torch.randn(1, 2, 4, dim) * 0.02)

        def block():
            return ref.VGGTBlock(dim, heads, qk_norm=True, init_values=0.01, rope=rope)
        self.frame_blocks = nn.ModuleList([block() for _ in range(depth)])
        self.global_blocks = nn.ModuleList([block() for _ in range(depth)])

    def forward(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        frames, _, dim = patches.shape
        slots = torch.tensor([0] + [1] * (frames - 1), device=patches.device)
        special = torch.cat((self.camera_token[0, slots], self.register_token[0, slots]), dim=1)
        tokens = torch.cat((special.to(patches.dtype), patches), dim=1)
        n = tokens.shape[1]
        pos = ref.vggt_positions(frames, 1, height, width, 5, patches.device)
        for frame_block, global_block in zip(self.frame_blocks, self.global_blocks):
            tokens = frame_block(tokens, pos)
            tokens = global_block(tokens.reshape(1, frames * n, dim), pos.reshape(1, frames * n, 2))
            tokens = tokens.reshape(frames, n, dim)
        return tokens


def _timed(model, patches, args, device):
    autocast = torch.autocast(device, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")
    with torch.inference_mode(), autocast:
        model(patches, args.height, args.width)  # warm-up (Triton compiles on a GPU)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resting = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = model(patches, args.height, args.width)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - resting
        elapsed = time.perf_counter() - start
        if device != "cuda":
            peak = peak_tensor_bytes(lambda: model(patches, args.height, args.width))
    return out.float(), elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--depth", type=int, default=None, help="frame/global block pairs (default 2 on CPU, 24 on GPU)")
    parser.add_argument("--height", type=int, default=28, help="patch rows (518x392 images: 28)")
    parser.add_argument("--width", type=int, default=37, help="patch columns (37)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype (default bfloat16 on GPU, float32 on CPU)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.depth = args.depth or (24 if device == "cuda" else 2)
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    torch.manual_seed(0)
    model = Aggregator(depth=args.depth).to(device).eval()
    patches = torch.randn(args.frames, args.height * args.width, 1024, device=device)

    eager_out, eager_s, eager_peak = _timed(model, patches, args, device)
    patched = fastpatch.patch_model(model)
    fast_out, fast_s, fast_peak = _timed(patched, patches, args, device)
    print(patched.fastpatch_report.summary())
    print(f"{args.frames} frames x {5 + args.height * args.width} tokens, {args.depth} block pairs, {args.dtype}, "
          f"{device}")
    print(f"eager     {eager_s * 1e3:9.1f} ms   peak {eager_peak / 2**20:8.1f} MiB")
    print(f"fastpatch {fast_s * 1e3:9.1f} ms   peak {fast_peak / 2**20:8.1f} MiB   "
          f"(x{eager_s / fast_s:.2f} speed, x{fast_peak / eager_peak:.2f} memory)")
    print(f"max relative difference {relative_error(fast_out, eager_out):.2e}")


if __name__ == "__main__":
    main()
