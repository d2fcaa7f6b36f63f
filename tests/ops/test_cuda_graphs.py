"""CUDA graphs of a patched DUSt3R pair forward (bf16 autocast, inference).

What could break a capture, and what guards it:

* host reads of device values (``.item()``, ``nonzero``): none in forward (``test_torch_compile.py``'s
  dispatch spy, ``test_cuda_sync.py``);
* host-to-device copies: a capture would replay them from host memory that is gone by then.
  The backbone's default ``true_shape`` is filled on the device; a ManyAR ``true_shape`` on the CPU
  is copied at each call, so while a graph is being captured it raises ``RuntimeError`` (put it on
  the image's device); under ``torch.compile(mode="reduce-overhead")`` such a CPU input stays
  outside the graphs and results stay right;
* caches filled at the first call (Triton compiles, launch plans, RoPE frequency tables): the
  warm-up that torch's capture recipe runs first fills them.

CPU-runnable: a torch-function spy checks that, after a warm-up call, the patched pair forward moves
no host data to the device (meta tensors stand in for the device there); the capture-time refusal
of a CPU ``true_shape`` is checked with the capture detector forced on.

CUDA only (``FASTPATCH_TEST_COMPILED=1``; compiled Triton kernels): a plain ``torch.cuda.CUDAGraph``
capture of the pair forward (:class:`bench.test_bench_pair_latency.CapturedCall`, the one the
latency benchmark times) replays new inputs to the eager patched result; a CPU ``true_shape``
refuses to be captured; ``torch.compile(mode="reduce-overhead")`` records and replays the patched
pair forward: no cudagraph skip counted, a graph recorded, no fastpatch launcher called on replays,
outputs equal to the uncompiled patched model within the bf16 tolerance.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastpatch
from bench.test_bench_pair_latency import CapturedCall, autocast_forward
from fastpatch import reference
from fastpatch.ops import patch_embed as patch_embed_op
from fastpatch.testing import TOLERANCES, relative_error

from modes import COMPILED

cuda_only = pytest.mark.skipif(
    not (COMPILED and torch.cuda.is_available()),
    reason="CUDA graphs need a CUDA device and the compiled kernels: FASTPATCH_TEST_COMPILED=1 on a CUDA machine")

SMALL = dict(img_size=(32, 48), patch_size=16, enc_embed_dim=64, enc_depth=1, enc_num_heads=2, dec_embed_dim=64,
             dec_depth=1, dec_num_heads=2)
BF16 = torch.bfloat16
# (patch embedding class, whether the pair gets true shapes): upstream's default backbone, and ManyAR
# with true_shape on the device (a portrait sample in each view).
CONFIGS = [("PatchEmbedDust3R", False), ("ManyAR_PatchEmbed", True)]


def _backbone(patch_embed_cls: str, device) -> torch.nn.Module:
    """A tiny patched backbone (seeded random weights) in eval mode on ``device``."""
    return fastpatch.patch_model(reference.Dust3RBackbone(**SMALL, patch_embed_cls=patch_embed_cls).eval()).to(device)


def _pair(device, seed: int, portrait_first: bool = False, true_shapes: bool = True):
    """(img1, img2[, true_shape1, true_shape2]) of batch 2 on ``device``: one landscape and one portrait
    sample (stored transposed) per view, the portrait one first if ``portrait_first``."""
    generator = torch.Generator().manual_seed(seed)
    images = tuple(torch.randn(2, 3, 32, 48, generator=generator).to(device) for _ in range(2))
    rows = [[48, 32], [32, 48]] if portrait_first else [[32, 48], [48, 32]]
    shapes = tuple(torch.tensor(rows).to(device) for _ in range(2))
    return images + shapes if true_shapes else images


def _flat(outputs):
    """The backbone's two lists of tensors as one list."""
    return list(outputs[0]) + list(outputs[1])


def _cloned(outputs):
    return [t.clone() for t in _flat(outputs)]


def _assert_close(actual, expected, what: str):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = relative_error(a.float(), e.float())
        assert err <= TOLERANCES[BF16].forward, f"{what}[{i}]: relative error {err:.2e}"


def _assert_differ(first, second, what: str):
    """The two input sets give different outputs (beyond the tolerance): a replay stuck on the
    captured inputs could not pass the comparisons."""
    err = max(relative_error(a.float(), b.float()) for a, b in zip(first, second))
    assert err > TOLERANCES[BF16].forward, f"{what}: both input sets give the same outputs ({err:.2e})"


# ----------------------------------------------------------------------------------------------
# No host-to-device copy after a warm-up call (CPU-runnable on meta tensors; CUDA in compiled mode)
# ----------------------------------------------------------------------------------------------
_COPIES = (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_)
_FROM_DATA = (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor)


def _device_type(t) -> str:
    return t.device.type if isinstance(t, torch.Tensor) else "cpu"


class HostToDeviceSpy(TorchFunctionMode):
    """Records every torch call that moves host data to another device: ``torch.tensor`` /
    ``torch.as_tensor`` / ``Tensor.new_tensor`` of host data giving a non-CPU tensor, and
    ``Tensor.to`` / ``.cuda`` / ``.copy_`` from a CPU tensor into a non-CPU one."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _COPIES:
            source, target = (args[1], args[0]) if func is torch.Tensor.copy_ else (args[0], out)
        elif func in _FROM_DATA:
            source = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else kwargs.get("data"))
            target = out
        else:
            return out
        if _device_type(source) == "cpu" and _device_type(target) != "cpu":
            self.moves.append(f"{getattr(func, '__qualname__', func)}: cpu -> {target.device}")
        return out


@pytest.mark.parametrize("target", ["meta", pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("patch_embed_cls,true_shapes", CONFIGS + [("ManyAR_PatchEmbed", False)])
def test_patched_pair_forward_moves_no_host_data_after_warmup(patch_embed_cls, true_shapes, target):
    """Meta tensors: the torch path (what fastpatch runs for them); CUDA: the Triton path."""
    model = _backbone(patch_embed_cls, target)
    inputs = _pair(target, seed=0, true_shapes=true_shapes)
    with torch.no_grad():
        model(*inputs)  # warm-up: fills the per-device caches
        with HostToDeviceSpy() as spy:
            model(*inputs)
    assert not spy.moves, spy.moves


def test_host_to_device_spy_sees_the_copies_it_looks_for():
    host = torch.ones(2)
    with HostToDeviceSpy() as spy:
        torch.tensor([1, 2], device="meta")
        host.to("meta")
        torch.empty(2, device="meta").copy_(host)
        host.to(torch.float64)  # host to host: not a move
    assert len(spy.moves) == 3, spy.moves


# ----------------------------------------------------------------------------------------------
# A CPU true_shape while a CUDA graph is captured: refused (CPU-runnable with the detector forced on)
# ----------------------------------------------------------------------------------------------
def _many_ar_inputs(device):
    img = torch.randn(2, 3, 32, 48).to(device)
    weight, bias = torch.randn(64, 3, 16, 16).to(device), torch.randn(64).to(device)
    return img, weight, bias, torch.tensor([[32, 48], [48, 32]])


def test_cpu_true_shape_is_refused_while_a_cuda_graph_is_captured(monkeypatch):
    monkeypatch.setattr(patch_embed_op, "capturing_cuda_graph", lambda device: True)
    img, weight, bias, true_shape = _many_ar_inputs("meta")
    with pytest.raises(RuntimeError, match="true_shape is on the CPU while a CUDA graph is being captured"):
        fastpatch.patch_embed(img, weight, bias, 16, true_shape=true_shape, many_ar=True)
    tokens, pos = fastpatch.patch_embed(img, weight, bias, 16, true_shape=true_shape.to("meta"), many_ar=True)
    assert tokens.shape == (2, 6, 64) and pos.shape == (2, 6, 2)


def test_capture_detector_asks_cuda_only_for_cuda_devices(monkeypatch):
    def no_cuda():
        raise AssertionError("CUDA was asked about a non-CUDA device")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", no_cuda)
    assert not patch_embed_op.capturing_cuda_graph(torch.device("cpu"))
    assert not patch_embed_op.capturing_cuda_graph(torch.device("meta"))
    img, weight, bias, true_shape = _many_ar_inputs("cpu")
    fastpatch.patch_embed(img, weight, bias, 16, true_shape=true_shape, many_ar=True)


def _first_uses():
    from fastpatch.launchers import rope_attention as attention_launchers
    from fastpatch.ops import rope_torch

    device = torch.device("cuda", 7)  # never used before: every cache misses; nothing reaches CUDA
    return {
        "triton frequencies": lambda: attention_launchers.rope_frequencies(100.0, 1.0, 64, device),
        "launch plan": lambda: attention_launchers.launch_plan(device, torch.float32, 64, "ieee"),
        "torch-path frequencies": lambda: rope_torch.rope_frequencies(64, 100.0, 1.0, torch.float32, device),
    }


@pytest.mark.parametrize("cache", ["triton frequencies", "launch plan", "torch-path frequencies"])
def test_a_cache_first_filled_inside_a_capture_is_refused(monkeypatch, cache):
    """A cache miss inside a capture would record the host-to-device copy that fills it (a replayed read
    of freed host memory): refused with a clear error; warm caches never ask."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="first use is inside a CUDA graph capture"):
        _first_uses()[cache]()


def test_warm_caches_do_not_ask_about_captures(monkeypatch):
    from fastpatch.launchers import rope_attention as attention_launchers

    def no_cuda():
        raise AssertionError("a warm cache asked CUDA about a capture")

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 7)
    monkeypatch.setitem(attention_launchers._FREQUENCY_CACHE, (100.0, 1.0, 64, cuda),
                        attention_launchers.rope_frequencies(100.0, 1.0, 64, cpu))
    monkeypatch.setitem(attention_launchers._PLANS, (cuda, torch.float32, 64, "ieee"),
                        attention_launchers.launch_plan(cpu, torch.float32, 64, "ieee"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", no_cuda)
    attention_launchers.rope_frequencies(100.0, 1.0, 64, cuda)
    attention_launchers.launch_plan(cuda, torch.float32, 64, "ieee")


# ----------------------------------------------------------------------------------------------
# CUDA: plain torch.cuda.CUDAGraph capture
# ----------------------------------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("patch_embed_cls,true_shapes", CONFIGS)
def test_captured_pair_forward_replays_new_inputs(patch_embed_cls, true_shapes, device):
    model = _backbone(patch_embed_cls, device)
    forward = autocast_forward(model, BF16)
    first = _pair(device, seed=1, true_shapes=true_shapes)
    second = _pair(device, seed=2, portrait_first=True, true_shapes=true_shapes)
    graph = CapturedCall(forward, first)
    replayed_second = _cloned(graph(*second))
    replayed_first = _cloned(graph(*first))
    expected_first, expected_second = _cloned(forward(*first)), _cloned(forward(*second))
    _assert_differ(expected_first, expected_second, "eager outputs")
    _assert_close(replayed_second, expected_second, "replay of the second inputs")
    _assert_close(replayed_first, expected_first, "replay of the first inputs")


@cuda_only
def test_capture_refuses_a_cpu_true_shape(device):
    model = _backbone("ManyAR_PatchEmbed", device)
    forward = autocast_forward(model, BF16)
    img1, img2, shape1, shape2 = _pair("cpu", seed=1)
    img1, img2 = img1.to(device), img2.to(device)
    with pytest.raises(RuntimeError, match="true_shape is on the CPU while a CUDA graph is being captured"):
        CapturedCall(lambda a, b: forward(a, b, shape1, shape2), (img1, img2))
    # the refused capture leaves the device usable: eager calls with a CPU true_shape still work
    expected = _cloned(forward(img1, img2, shape1.to(device), shape2.to(device)))
    _assert_close(_cloned(forward(img1, img2, shape1, shape2)), expected, "eager with CPU true_shape after the refusal")


# ----------------------------------------------------------------------------------------------
# CUDA: torch.compile(mode="reduce-overhead") (cudagraph trees)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_compile():
    """Dynamo, inductor counters and cudagraph trees reset before and after the test."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    def reset():
        torch._dynamo.reset()
        cudagraph_trees.reset_cudagraph_trees()
        counters.clear()

    reset()
    yield
    reset()


@pytest.fixture
def launches(monkeypatch):
    """Counts calls of fastpatch's Triton launchers (what the custom ops run), by name."""
    from fastpatch.ops import patch_embed_triton, rope_attention_triton

    counts = {}
    launchers = ((rope_attention_triton, "rope_attention_forward"), (patch_embed_triton, "patch_embed_forward"))
    for module, name in launchers:
        launcher = getattr(module, name)

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def _cudagraph_skips() -> int:
    """torch's count of graphs compiled for CUDA graphs that skipped them (torch >= 2.4); fails
    the test when this torch has no such counter rather than passing blind."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_utils

    if not hasattr(cudagraph_utils, "log_cudagraph_skip_and_bump_counter"):
        pytest.fail(f"torch {torch.__version__} has no cudagraph skip counter (counters['inductor']"
                    "['cudagraph_skips'] bumped by cudagraph_utils.log_cudagraph_skip_and_bump_counter): "
                    "cannot tell whether CUDA graphs were skipped")
    return counters["inductor"]["cudagraph_skips"]


def _recorded_graphs(device: torch.device) -> int:
    """CUDA graphs the cudagraph trees of ``device`` have recorded (nodes of every tree)."""
    from torch._inductor import cudagraph_trees

    index = device.index if device.index is not None else torch.cuda.current_device()
    manager = cudagraph_trees.get_container(index).tree_manager
    if manager is None:
        return 0
    nodes, count = [node for roots in manager.roots.values() for node in roots], 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes.extend(child for children in node.children.values() for child in children)
    return count


def _compiled_step(compiled):
    def step(*inputs):
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), torch.autocast("cuda", dtype=BF16):
            return _cloned(compiled(*inputs))
    return step


@cuda_only
@pytest.mark.parametrize("patch_embed_cls,true_shapes", CONFIGS)
def test_reduce_overhead_compile_records_and_replays_the_pair_forward(patch_embed_cls, true_shapes, device,
                                                                      fresh_compile, launches):
    model = _backbone(patch_embed_cls, device)
    step = _compiled_step(torch.compile(model, mode="reduce-overhead", fullgraph=True))
    first = _pair(device, seed=1, true_shapes=true_shapes)
    second = _pair(device, seed=2, portrait_first=True, true_shapes=true_shapes)
    for _ in range(3):  # compile + warm-up run, recording, first replay
        step(*first)
    assert launches.get("rope_attention_forward", 0) > 0 and launches.get("patch_embed_forward", 0) > 0, \
        f"the compiled model did not run fastpatch's Triton kernels before replaying: {launches}"
    launches.clear()
    actual_second, actual_first = step(*second), step(*first)
    assert not launches, f"fastpatch launchers ran during replays (not captured in the CUDA graph): {launches}"
    assert _cudagraph_skips() == 0, "inductor skipped CUDA graphs (see the 'skipping cudagraphs' warning)"
    assert _recorded_graphs(device) >= 1, "no CUDA graph recorded by cudagraph trees"
    with torch.no_grad(), torch.autocast("cuda", dtype=BF16):
        expected_first, expected_second = _cloned(model(*first)), _cloned(model(*second))
    _assert_differ(expected_first, expected_second, "uncompiled outputs")
    _assert_close(actual_second, expected_second, "replay of the second inputs vs uncompiled")
    _assert_close(actual_first, expected_first, "replay of the first inputs vs uncompiled")


@cuda_only
def test_reduce_overhead_compile_with_cpu_true_shape_follows_its_values(device, fresh_compile):
    """A CPU true_shape stays outside the CUDA graphs (a CPU input): each call sees its current values."""
    model = _backbone("ManyAR_PatchEmbed", device)
    step = _compiled_step(torch.compile(model, mode="reduce-overhead", fullgraph=True))
    img1, img2, landscape_first, _ = _pair("cpu", seed=1)
    _, _, portrait_first, _ = _pair("cpu", seed=1, portrait_first=True)
    img1, img2 = img1.to(device), img2.to(device)
    expected = {}
    for shapes in (landscape_first, landscape_first, landscape_first, portrait_first, landscape_first):
        actual = step(img1, img2, shapes, shapes)
        with torch.no_grad(), torch.autocast("cuda", dtype=BF16):
            expected[shapes is portrait_first] = _cloned(model(img1, img2, shapes.to(device), shapes.to(device)))
        _assert_close(actual, expected[shapes is portrait_first], f"compiled with CPU true_shape {shapes.tolist()}")
    _assert_differ(expected[False], expected[True], "uncompiled outputs for the two true shapes")
