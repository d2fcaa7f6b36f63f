"""How the patch-embedding launchers launch: under the inputs' device guard, with the fp32 dot
precision torch's cuDNN TF32 switch asks for, and never with an empty grid.

The kernels are replaced by spies that record each launch (and run the real kernel where the test
needs numbers); the device guard is replaced by one that records the device it is entered with.
"""
import contextlib
from typing import List, NamedTuple, Tuple

import pytest
import torch

import fastpatch
from fastpatch.launchers import patch_embed as launchers

KERNEL_NAMES = ("patch_embed_fwd_kernel", "patch_embed_grad_weight_kernel", "patch_embed_grad_image_kernel")


class Launch(NamedTuple):
    kernel: str
    grid: Tuple[int, ...]
    constexprs: dict
    guarded_by: object  # the device the launch guard was entered with, or None outside any guard


class LaunchRecorder:
    """Replaces the launch guard and the three kernels of the launcher module with recording spies."""

    def __init__(self, monkeypatch, run: bool):
        self.launches: List[Launch] = []
        self.guards: List[torch.device] = []
        self._inside = None
        monkeypatch.setattr(launchers, "launch_device", self._guard)
        for name in KERNEL_NAMES:
            monkeypatch.setattr(launchers, name, self._spy(name, getattr(launchers, name), run))

    @contextlib.contextmanager
    def _guard(self, device):
        self.guards.append(device)
        self._inside = device
        try:
            yield
        finally:
            self._inside = None

    def _spy(self, name, kernel, run):
        recorder = self

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append(Launch(name, tuple(grid), kwargs, recorder._inside))
                    if run:
                        kernel[grid](*args, **kwargs)
                return launch

        return Spy()


@contextlib.contextmanager
def tf32_switches(cudnn: bool, matmul: bool):
    """Set torch's cuDNN and cuBLAS TF32 switches inside the block, restoring both after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _inputs(device, dtype=torch.float32, batch=2):
    img = torch.randn(batch, 3, 16, 24).to(device, dtype).requires_grad_()
    weight = (torch.randn(16, 3, 8, 8) * 0.1).to(device, dtype).requires_grad_()
    bias = torch.randn(16).to(device, dtype).requires_grad_()
    return img, weight, bias


def test_every_launch_runs_under_the_inputs_device(monkeypatch, device):
    """Forward and both backward launches enter launch_device(img.device) around the launch."""
    recorder = LaunchRecorder(monkeypatch, run=True)
    img, weight, bias = _inputs(device)
    true_shape = torch.tensor([[16, 24], [24, 16]], device=device)
    with fastpatch.use_backend("triton"):
        tokens, _ = fastpatch.patch_embed(img, weight, bias, 8, true_shape, many_ar=True)
    tokens.square().sum().backward()
    assert [launch.kernel for launch in recorder.launches] == list(KERNEL_NAMES)
    assert [launch.guarded_by for launch in recorder.launches] == [img.device] * 3
    assert recorder.guards == [img.device] * 3


def test_launch_guard_gets_the_tensors_device_not_a_default(monkeypatch):
    """With tensors on ``meta`` (kernels recorded, not run) the guard is entered with ``meta``."""
    recorder = LaunchRecorder(monkeypatch, run=False)
    img, weight, bias = (t.detach() for t in _inputs("meta"))
    tokens, _ = launchers.patch_embed_forward(img, weight, bias, 8)
    launchers.patch_embed_grad_params(tokens, img, weight, 8)
    launchers.patch_embed_grad_image(tokens, img, weight, 8)
    assert recorder.guards == [torch.device("meta")] * 3
    assert [launch.guarded_by for launch in recorder.launches] == [torch.device("meta")] * 3


@pytest.mark.parametrize("allow_tf32", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dot_precision_follows_the_cudnn_tf32_switch(monkeypatch, allow_tf32, dtype):
    """fp32 products use TF32 exactly when torch.backends.cudnn.allow_tf32 is set (the switch of the
    conv2d the patch embedding replaces), read at every call; half dtypes always say "ieee"."""
    recorder = LaunchRecorder(monkeypatch, run=False)
    img, weight, bias = (t.detach() for t in _inputs("meta", dtype))
    with tf32_switches(cudnn=allow_tf32, matmul=not allow_tf32):  # the matmul switch must not matter
        tokens, _ = launchers.patch_embed_forward(img, weight, bias, 8)
        launchers.patch_embed_grad_params(tokens, img, weight, 8)
        launchers.patch_embed_grad_image(tokens, img, weight, 8)
    expected = "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"
    assert [launch.constexprs["DOT_PRECISION"] for launch in recorder.launches] == [expected] * 3

    with tf32_switches(cudnn=not allow_tf32, matmul=not allow_tf32):  # flipped between calls
        launchers.patch_embed_forward(img, weight, bias, 8)
    flipped = "tf32" if dtype == torch.float32 and not allow_tf32 else "ieee"
    assert recorder.launches[-1].constexprs["DOT_PRECISION"] == flipped


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch without per-operator TF32 settings")
@pytest.mark.parametrize("conv_precision", ["tf32", "ieee"])
def test_dot_precision_follows_the_per_operator_cudnn_conv_setting(monkeypatch, conv_precision):
    """With torch's per-operator API (``cudnn.conv.fp32_precision`` differing from ``cudnn.rnn``'s), the
    legacy ``cudnn.allow_tf32`` getter raises; the launch must still follow the conv setting."""
    cudnn = torch.backends.cudnn
    saved = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision
    recorder = LaunchRecorder(monkeypatch, run=False)
    img, weight, bias = (t.detach() for t in _inputs("meta"))
    try:
        cudnn.conv.fp32_precision = conv_precision
        cudnn.rnn.fp32_precision = "ieee" if conv_precision == "tf32" else "tf32"
        with pytest.raises(RuntimeError):  # what the launcher must not trip over
            cudnn.allow_tf32
        launchers.patch_embed_forward(img, weight, bias, 8)
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved
    assert recorder.launches[-1].constexprs["DOT_PRECISION"] == conv_precision


def test_empty_batch_launches_nothing(monkeypatch, device):
    """B = 0: empty tokens/positions, zero parameter gradients, an empty image gradient, no launch."""
    recorder = LaunchRecorder(monkeypatch, run=True)
    img, weight, bias = (t.detach() for t in _inputs(device, batch=0))
    portrait = torch.zeros(0, dtype=torch.bool, device=device)
    tokens, pos = launchers.patch_embed_forward(img, weight, bias, 8, portrait)
    grad_tokens = torch.randn(0, 6, 16, device=device)
    grad_weight, grad_bias = launchers.patch_embed_grad_params(grad_tokens, img, weight, 8, portrait)
    grad_img = launchers.patch_embed_grad_image(grad_tokens, img, weight, 8, portrait)
    assert recorder.launches == []
    assert tokens.shape == (0, 6, 16) and pos.shape == (0, 6, 2) and pos.dtype == torch.int64
    assert grad_weight.shape == weight.shape and torch.equal(grad_weight, torch.zeros_like(weight))
    assert grad_bias.shape == bias.shape and torch.equal(grad_bias, torch.zeros_like(bias))
    assert grad_img.shape == img.shape
