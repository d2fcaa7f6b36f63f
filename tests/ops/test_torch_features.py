"""A patched model among torch's other features (CPU, torch path unless said otherwise; Triton-path
cases run on the ``device`` fixture).

autocast dtypes as upstream's, inference_mode / no_grad, channels-last images, ``.half()`` /
``.bfloat16()`` / ``.to()`` after patching, deepcopy / pickle / ``torch.save``, DDP (2 gloo
processes), concurrent forwards from several threads, and an import of fastpatch that leaves
torch's global state untouched.
"""
import copy
import io
import json
import pickle
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpatch
from fastpatch import backend, reference
from fastpatch.ops.rope_torch import rope_frequencies
from fastpatch.testing import TOLERANCES, relative_error

from modes import cpu_ci_only, device_for

SMALL = dict(img_size=(32, 48), patch_size=16, enc_embed_dim=64, enc_depth=1, enc_num_heads=2, dec_embed_dim=64,
             dec_depth=1, dec_num_heads=2)


def _backbone(patch_embed_cls: str = "PatchEmbedDust3R", seed: int = 0) -> reference.Dust3RBackbone:
    """A tiny eager reference backbone with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return reference.Dust3RBackbone(**SMALL, patch_embed_cls=patch_embed_cls).eval()


def _pair(seed: int = 0, patch_embed_cls: str = "PatchEmbedDust3R"):
    """(reference model, patched copy pinned to the torch path) with the same weights."""
    ref = _backbone(patch_embed_cls, seed)
    return ref, fastpatch.patch_model(copy.deepcopy(ref), backend="torch")


def _images(batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 48, generator=gen), torch.randn(batch, 3, 32, 48, generator=gen)


def _flat(outputs):
    return list(outputs[0]) + list(outputs[1])


def _assert_outputs_close(actual, expected, dtype: torch.dtype = torch.float32, what: str = "output"):
    for i, (a, e) in enumerate(zip(_flat(actual), _flat(expected))):
        err = relative_error(a, e)
        assert err <= TOLERANCES[dtype].forward, f"{what}[{i}]: relative error {err:.2e} ({dtype})"


# ----------------------------------------------------------------------------------------------
# Autocast, grad modes, memory formats, dtypes and devices
# ----------------------------------------------------------------------------------------------
def test_cpu_autocast_bfloat16_gives_upstream_dtypes():
    ref, patched = _pair()
    img1, img2 = _images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(img1, img2)
        actual = patched(img1, img2)
        ref_tokens, _ = ref.patch_embed(img1)
        tokens, pos = patched.patch_embed(img1)
        x = torch.randn(2, 6, 64)
        ref_block, block = ref.enc_blocks[0](x, pos), patched.enc_blocks[0](x, pos)
    assert [t.dtype for t in _flat(actual)] == [t.dtype for t in _flat(expected)]
    assert tokens.dtype == ref_tokens.dtype == torch.bfloat16
    assert block.dtype == ref_block.dtype
    for a, e in zip(_flat(actual), _flat(expected)):  # both rounded to bf16 along the way: a loose bound
        assert relative_error(a, e) < 0.1


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_grad_free_modes_then_training(mode):
    ref, patched = _pair()
    img1, img2 = _images()
    rope_frequencies.cache_clear()  # the first table is built inside the grad-free mode
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with context:
        actual = patched(img1, img2)
        expected = ref(img1, img2)
    assert not any(t.requires_grad for t in _flat(actual))
    _assert_outputs_close(actual, expected)
    patched.train()
    loss = sum(t.sum() for t in _flat(patched(img1, img2)))
    loss.backward()  # a cached table made in inference mode must not break autograd later
    assert patched.enc_blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_channels_last_images(backend_name, device):
    on = device_for(backend_name, device)
    embed = fastpatch.ManyAR_PatchEmbed((32, 48), 16, 3, 64).to(on)
    img = torch.randn(2, 3, 32, 48).to(on)
    true_shape = torch.tensor([[32, 48], [48, 32]]).to(on)
    with fastpatch.use_backend(backend_name), torch.no_grad():
        expected = embed(img, true_shape)
        actual = embed(img.to(memory_format=torch.channels_last), true_shape)
    assert torch.equal(actual[1], expected[1])
    assert relative_error(actual[0], expected[0]) <= TOLERANCES[torch.float32].forward


def test_channels_last_backbone():
    ref, patched = _pair()
    img1, img2 = _images()
    with torch.no_grad():
        expected = ref(img1, img2)
        actual = patched(img1.to(memory_format=torch.channels_last), img2.to(memory_format=torch.channels_last))
    _assert_outputs_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_after_patching(dtype):
    """``.half()`` / ``.bfloat16()`` on a patched model: dtype right, error vs the float64 oracle of the
    same rounded weights and inputs within the dtype's tolerance."""
    ref, patched = _pair()
    patched = patched.half() if dtype == torch.float16 else patched.bfloat16()
    assert fastpatch.is_patched(patched)
    img1, img2 = (t.to(dtype) for t in _images())
    oracle = copy.deepcopy(ref).double()
    oracle.load_state_dict({k: v.double() for k, v in patched.state_dict().items()})
    with torch.no_grad():
        actual = patched(img1, img2)
        expected = oracle(img1.double(), img2.double())
    assert all(t.dtype == dtype for t in _flat(actual))
    _assert_outputs_close(actual, expected, dtype, what=f"{dtype} backbone")


def test_to_device_and_dtype_after_patching():
    ref, patched = _pair()
    moved = patched.to(device="cpu", dtype=torch.bfloat16).to(torch.float32)
    assert moved is patched and fastpatch.is_patched(moved)
    assert patched.patch_embed.proj.weight.dtype == torch.float32
    meta = copy.deepcopy(patched).to("meta")
    img1, img2 = _images()
    outputs = _flat(meta(img1.to("meta"), img2.to("meta")))
    assert all(t.device.type == "meta" and t.shape == (2, 6, 64) for t in outputs)
    ref.to(torch.bfloat16).to(torch.float32)  # the same rounding of the weights
    with torch.no_grad():
        _assert_outputs_close(patched(img1, img2), ref(img1, img2))


# ----------------------------------------------------------------------------------------------
# Copies and serialisation
# ----------------------------------------------------------------------------------------------
def _pinned_backends(model, img1, img2):
    """Backends requested while each replaced module's forward runs."""
    seen = []
    handle = model.enc_blocks[0].norm1.register_forward_hook(lambda *_: seen.append(backend.requested_backend()))
    with torch.no_grad():
        model(img1, img2)
    handle.remove()
    return seen


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_patched_model_copies_and_serialises(how):
    ref, patched = _pair()
    img1, img2 = _images()
    if how == "deepcopy":
        clone = copy.deepcopy(patched)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(patched))
    else:
        buffer = io.BytesIO()
        torch.save(patched, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert fastpatch.is_patched(clone) and isinstance(clone.enc_blocks[0], fastpatch.Block)
    assert clone.patch_embed.proj.weight is not patched.patch_embed.proj.weight
    assert _pinned_backends(clone, img1, img2) == ["torch"]  # the pinned backend survives the copy
    with torch.no_grad():
        _assert_outputs_close(clone(img1, img2), ref(img1, img2))
    unpatched = fastpatch.unpatch_model(clone)
    assert type(unpatched.enc_blocks[0]) is reference.Block


# ----------------------------------------------------------------------------------------------
# DDP: two gloo processes against one process on the whole batch
# ----------------------------------------------------------------------------------------------
def _loss(model, img1, img2):
    return sum((t * t).mean() for t in _flat(model(img1, img2)))


def _ddp_worker(rank: int, world_size: int, init_file: str, out_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = fastpatch.patch_model(_backbone(), backend="torch").train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        img1, img2 = (t.chunk(world_size)[rank] for t in _images(batch=4))
        _loss(ddp, img1, img2).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out_file)
        dist.barrier()  # no rank tears gloo down while the other still uses it (that aborts the process)
    finally:
        dist.destroy_process_group()


@cpu_ci_only
def test_ddp_two_processes_match_single_process(tmp_path):
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path / "grads.pt")),
             nprocs=world_size, join=True)
    ddp_grads = torch.load(tmp_path / "grads.pt")
    model = fastpatch.patch_model(_backbone(), backend="torch").train()
    img1, img2 = _images(batch=4)
    # DDP averages the per-rank gradients of per-rank means: the mean over ranks of the shard losses.
    sum(_loss(model, a, b) for a, b in zip(img1.chunk(world_size), img2.chunk(world_size))).div(world_size).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ddp_grads.keys() == expected.keys()
    for name, grad in expected.items():
        err = relative_error(ddp_grads[name], grad)
        assert err <= TOLERANCES[torch.float32].backward, f"{name}: relative error {err:.2e}"


# ----------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------
def test_concurrent_forwards_from_threads():
    """Threads with different dtypes (so different per-device/dtype RoPE tables) and different
    ``use_backend`` choices run at once; each gets its single-threaded result and its own backend."""
    ref, _ = _pair()
    models = {dtype: fastpatch.patch_model(copy.deepcopy(ref).to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    img1, img2 = _images()
    rope_frequencies.cache_clear()
    expected = {}
    with torch.no_grad(), fastpatch.use_backend("torch"):
        for dtype, model in models.items():
            expected[dtype] = model(img1.to(dtype), img2.to(dtype))
    rope_frequencies.cache_clear()
    jobs = [(dtype, name) for dtype in models for name in ("torch", "auto")] * 2
    barrier = threading.Barrier(len(jobs))
    results, errors = {}, []

    def work(index, dtype, name):
        try:
            with torch.no_grad(), fastpatch.use_backend(name):
                barrier.wait()
                seen = backend.requested_backend()
                # "auto" on CPU runs the Triton interpreter in the normal mode; keep those forwards to one.
                out = models[dtype](img1.to(dtype), img2.to(dtype)) if name == "torch" else None
                results[index] = (seen, out)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,) + job) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for index, (dtype, name) in enumerate(jobs):
        seen, out = results[index]
        assert seen == name
        if out is not None:
            for a, e in zip(_flat(out), _flat(expected[dtype])):
                assert torch.equal(a, e)
    assert backend.requested_backend() == "auto"


# ----------------------------------------------------------------------------------------------
# Import leaves torch's global state alone
# ----------------------------------------------------------------------------------------------
_STATE_SCRIPT = r"""
import json, os, sys
import torch

def state():
    return {
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "fp16_reduced_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "bf16_reduced_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "sdp": [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled()],
        "default_dtype": str(torch.get_default_dtype()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "environ": {k: v for k, v in os.environ.items() if "TRITON" in k or "TORCH" in k or "FASTPATCH" in k},
    }

before = state()
import fastpatch  # noqa: F401
import fastpatch.ops.rope_attention_triton  # noqa: F401
after = state()
print(json.dumps({"before": before, "after": after}))
"""


def test_import_does_not_change_torch_global_state():
    proc = subprocess.run([sys.executable, "-c", _STATE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["after"] == report["before"]
