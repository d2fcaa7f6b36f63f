"""A DUSt3R scene, dust3r's inference loop against ``fastpatch.inference``: pairs/s, speedup, max error.

Builds the ViT-Large/Base DUSt3R model with linear heads (``fastpatch.reference_model``, random
weights, or a linear-head checkpoint with ``--checkpoint``), patches it with fastpatch, makes a
synthetic scene of N random images and its complete symmetrised pair graph (N (N - 1) pairs, as
dust3r's ``make_pairs``), and runs it through

* dust3r's inference loop (``bench/pairs.py``: batches of consecutive pairs, both images of every
  pair encoded), and
* ``fastpatch.inference`` (each image encoded once, pairs decoded in batches),

both on the same patched model, alternating, and prints the pairs/s of each (best of ``--repeats``),
the speedup and the max relative error of the predictions.

    python examples/scene_inference.py                   # 4 images at 224x224, batch size 2, CPU fp32
    python examples/scene_inference.py --images 8 --batch-size 8
    python examples/scene_inference.py --device cuda --size 384 512 --images 16 --dtype bfloat16

In your own code the engine is one line: replace ``dust3r.inference.inference(pairs, model, ...)``
with ``fastpatch.inference(pairs, model, ...)``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import fastpatch
from fastpatch.reference_model import dust3r_model
from fastpatch.testing import relative_error

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, for bench/
from bench.pairs import (complete_symmetrized_pairs, prediction_tensors, synthetic_scene,  # noqa: E402
                         upstream_style_inference)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run, device: torch.device, dtype: torch.dtype) -> tuple:
    """(seconds, prediction tensors) of one ``run()`` under inference mode (and autocast for half dtypes)."""
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        result = run()
    _sync(device)
    return time.perf_counter() - start, prediction_tensors(result)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4, help="images in the scene (default 4: 12 pairs)")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                        help="image height and width, multiples of 16 (default 224 224)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per batch, both sides (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side, alternating (default 2)")
    parser.add_argument("--checkpoint", help="DUSt3R linear-head checkpoint (.pth); random weights if omitted")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype (float32: no autocast)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.images < 2:
        parser.error("--images must be at least 2 (a scene needs a pair)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    height, width = args.size

    torch.manual_seed(0)
    config = "DUSt3R_ViTLarge_BaseDecoder_224_linear" if max(height, width) <= 224 \
        else "DUSt3R_ViTLarge_BaseDecoder_512_linear"
    model = dust3r_model(config).eval()
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("model", state), strict=True)
    model = fastpatch.patch_model(model.to(device))
    pairs = complete_symmetrized_pairs(synthetic_scene(args.images, height, width))
    print(f"DUSt3R ViT-L/Base + linear heads ({config}), fastpatch modules on both sides; "
          f"{args.images} images at {height}x{width}, {len(pairs)} pairs (complete graph, symmetrised), "
          f"batch size {args.batch_size}, {device} {args.dtype}, torch threads {torch.get_num_threads()}")

    sides = {
        "dust3r inference loop": lambda: upstream_style_inference(pairs, model, device, batch_size=args.batch_size),
        "fastpatch.inference": lambda: fastpatch.inference(pairs, model, device, batch_size=args.batch_size,
                                                            verbose=False),
    }
    times = {name: [] for name in sides}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in sides.items():
            seconds, outputs[name] = _timed(run, device, dtype)
            times[name].append(seconds)

    (loop_name, engine_name) = sides
    rates = {name: len(pairs) / min(samples) for name, samples in times.items()}
    for name, rate in rates.items():
        print(f"{name:22s} {rate:8.3f} pairs/s  ({min(times[name]):.2f} s, best of {args.repeats})")
    print(f"speedup                {rates[engine_name] / rates[loop_name]:8.2f}x")
    errors = [relative_error(a.float(), e.float()) for a, e in zip(outputs[engine_name], outputs[loop_name])]
    print(f"max relative error over {len(errors)} prediction maps (pts3d, conf of both views): {max(errors):.2e}")


if __name__ == "__main__":
    main()
