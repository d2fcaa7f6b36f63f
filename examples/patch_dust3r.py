"""Accelerate a DUSt3R model with fastpatch and measure it against the eager model.

Builds the DUSt3R ViT-Large encoder / Base decoder backbone (``fastpatch.reference``, the same
module tree and state_dict keys as upstream) with random weights — or the weights of a DUSt3R
checkpoint given with ``--checkpoint`` — runs an image pair through it eagerly, patches it with
``fastpatch.patch_model``, runs it again, and prints the time of each, the speedup and the max
error of every output (encoder output and each decoder layer, both views).

    python examples/patch_dust3r.py                      # 512x384 pair, CPU fp32
    python examples/patch_dust3r.py --size 224 224 --repeats 5
    python examples/patch_dust3r.py --checkpoint DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth
    python examples/patch_dust3r.py --device cuda --dtype bfloat16

With your own upstream model the whole usage is three lines::

    import fastpatch
    model = AsymmetricCroCo3DStereo.from_pretrained(...)
    model = fastpatch.patch_model(model)
"""
from __future__ import annotations

import argparse
import time

import torch

import fastpatch
from fastpatch.reference import dust3r_backbone
from fastpatch.testing import relative_error


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    backbone = {k: v for k, v in state.items() if not k.startswith("downstream_head")}
    model.load_state_dict(backbone, strict=True)


def _time_forward(model, inputs, device, dtype) -> tuple:
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        out1, out2 = model(*inputs)
    _sync(device)
    return time.perf_counter() - start, out1 + out2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"),
                        help="image height and width, multiples of 16 (default 384 512)")
    parser.add_argument("--batch", type=int, default=1, help="image pairs per forward")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per side, interleaved")
    parser.add_argument("--checkpoint", help="DUSt3R checkpoint (.pth); random weights if omitted")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype (float32: no autocast)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = dust3r_backbone("DUSt3R_ViTLarge_BaseDecoder_512").eval()
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    model.to(device)
    h, w = args.size
    img1 = torch.randn(args.batch, 3, h, w, device=device).clamp_(-1, 1)
    img2 = torch.randn(args.batch, 3, h, w, device=device).clamp_(-1, 1)
    inputs = (img1, img2)
    print(f"DUSt3R ViT-L/Base backbone, {h}x{w} pair x{args.batch}, {device} {args.dtype}, "
          f"backend {fastpatch.backend.select_backend(img1)}, torch threads {torch.get_num_threads()}")

    # Warm up both sides (Triton compilation, allocator), then alternate timed runs.
    _, eager_out = _time_forward(model, inputs, device, dtype)
    patched = fastpatch.patch_model(model)
    print(patched.fastpatch_report.summary())
    _time_forward(patched, inputs, device, dtype)
    eager_times, patched_times = [], []
    for _ in range(args.repeats):
        fastpatch.unpatch_model(patched)
        eager_times.append(_time_forward(model, inputs, device, dtype)[0])
        patched = fastpatch.patch_model(model)
        seconds, patched_out = _time_forward(patched, inputs, device, dtype)
        patched_times.append(seconds)

    eager_s, patched_s = min(eager_times), min(patched_times)
    errors = [relative_error(p.float(), e.float()) for p, e in zip(patched_out, eager_out)]
    print(f"eager    {eager_s * 1e3:10.1f} ms  (best of {args.repeats})")
    print(f"patched  {patched_s * 1e3:10.1f} ms  (best of {args.repeats})")
    print(f"speedup  {eager_s / patched_s:10.2f}x")
    print(f"max relative error over {len(errors)} outputs: {max(errors):.2e}")


if __name__ == "__main__":
    main()
