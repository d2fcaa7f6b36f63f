"""fastpatch under ``torch.compile``, and no host synchronisation in forward or backward.

* Torch path (what CPU runs): the patched backbone, the attention modules, the blocks and both patch
  embeddings trace with zero graph breaks (``torch._dynamo.explain``) and compile with
  ``fullgraph=True`` to the eager result; the backend pinned by ``patch_model(..., backend=...)``
  (forward hooks on a per-thread override stack) is traced too, and is guarded: the same compiled
  module recompiles when the backend changes. One real inductor compile.
* Triton path (on the ``device`` fixture: CPU through the interpreter, or CUDA in compiled mode):
  every ``fastpatch::`` custom op passes
  ``torch.library.opcheck`` (schema, fake impl, registered autograd, AOT dispatch), and the patched
  backbone compiles with ``fullgraph=True`` under ``aot_eager``, forward and backward matching eager.
* No ``.item()`` / ``nonzero`` / boolean-mask indexing anywhere in forward or backward, so
  ``mode="reduce-overhead"`` (CUDA graphs) can capture the model: a dispatch-mode spy fails on any
  op that reads device memory on the host (the Triton path on ``device``, the torch path on CPU).

Models are tiny (32x48 images, patch 16 -> 6 tokens, width 64, 2 heads of 32) and compiled
graphs few: compiling is the slow part.
"""
import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpatch
from fastpatch import reference
from fastpatch.ops.rope_attention_triton import rope_attention_fwd  # noqa: F401  (registers the fastpatch:: ops)
from fastpatch.ops import patch_embed_triton  # noqa: F401
from fastpatch.ops import qknorm_rope_attention_triton  # noqa: F401  (every module registering fastpatch:: ops)
from fastpatch.testing import TOLERANCES, relative_error

from modes import device_for

aten = torch.ops.aten

SMALL = dict(img_size=(32, 48), patch_size=16, enc_embed_dim=64, enc_depth=1, enc_num_heads=2, dec_embed_dim=64,
             dec_depth=1, dec_num_heads=2)
DIM, HEADS = 64, 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _backbone(patch_embed_cls: str = "PatchEmbedDust3R") -> reference.Dust3RBackbone:
    """A tiny eager reference backbone (random weights from the seeded generator), in eval mode."""
    return reference.Dust3RBackbone(**SMALL, patch_embed_cls=patch_embed_cls).eval()


def _images(batch: int = 2, device="cpu"):
    """Two (B, 3, 32, 48) images and (B, 2) true shapes, the second sample portrait (stored transposed)."""
    true_shape = torch.tensor([[32, 48], [48, 32]] * (batch // 2))
    inputs = torch.randn(batch, 3, 32, 48), torch.randn(batch, 3, 32, 48), true_shape, true_shape.clone()
    return tuple(t.to(device) for t in inputs)


def _flat(outputs):
    """Backbone outputs (two lists of tensors) as one list."""
    return list(outputs[0]) + list(outputs[1])


def _assert_close(actual, expected, what: str):
    actual = actual if isinstance(actual, (list, tuple)) else [actual]
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not a.is_floating_point():
            assert torch.equal(a, e), f"{what}[{i}]"
            continue
        err = relative_error(a, e)
        assert err <= TOLERANCES[torch.float32].forward, f"{what}[{i}]: relative error {err:.2e}"


def _explain_breaks(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    reasons = [r.reason.splitlines()[0] for r in explanation.break_reasons]
    return explanation.graph_break_count, reasons


# ----------------------------------------------------------------------------------------------
# Torch path: zero graph breaks, fullgraph compile matches eager
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_embed_cls", ["PatchEmbedDust3R", "ManyAR_PatchEmbed"])
def test_patched_backbone_has_no_graph_breaks_and_compiles_fullgraph(patch_embed_cls):
    model = fastpatch.patch_model(_backbone(patch_embed_cls), backend="torch")
    inputs = _images()
    breaks, reasons = _explain_breaks(model, *inputs)
    assert breaks == 0, reasons
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(*inputs)
        actual = torch.compile(model, backend="eager", fullgraph=True)(*inputs)
    _assert_close(_flat(actual), _flat(expected), "backbone outputs")


def _module_cases():
    """(name, module, inputs) for every drop-in module, on the torch path, with RoPE100."""
    rope = fastpatch.RoPE2D(100.0)
    x, y = torch.randn(2, 6, DIM), torch.randn(2, 4, DIM)
    xpos = torch.cartesian_prod(torch.arange(2), torch.arange(3)).expand(2, 6, 2)
    ypos = torch.cartesian_prod(torch.arange(2), torch.arange(2)).expand(2, 4, 2)
    img = torch.randn(2, 3, 32, 48)
    true_shape = torch.tensor([[32, 48], [48, 32]])
    return [
        ("Attention", fastpatch.Attention(DIM, rope=rope, num_heads=HEADS, qkv_bias=True), (x, xpos)),
        ("Attention-norope", fastpatch.Attention(DIM, rope=None, num_heads=HEADS), (x, None)),
        ("CrossAttention", fastpatch.CrossAttention(DIM, rope=rope, num_heads=HEADS), (x, y, y, xpos, ypos)),
        ("Block", fastpatch.Block(DIM, HEADS, qkv_bias=True, rope=rope), (x, xpos)),
        ("DecoderBlock", fastpatch.DecoderBlock(DIM, HEADS, qkv_bias=True, rope=rope), (x, y, xpos, ypos)),
        ("PatchEmbedDust3R", fastpatch.PatchEmbedDust3R((32, 48), 16, 3, DIM), (img,)),
        ("ManyAR_PatchEmbed", fastpatch.ManyAR_PatchEmbed((32, 48), 16, 3, DIM), (img, true_shape)),
    ]


MODULE_CASES = _module_cases()


@pytest.mark.parametrize("name,module,inputs", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_modules_have_no_graph_breaks_under_use_backend(name, module, inputs):
    module.eval()
    with fastpatch.use_backend("torch"):
        breaks, reasons = _explain_breaks(module, *inputs)
        assert breaks == 0, reasons
        torch._dynamo.reset()
        expected = module(*inputs)
        actual = torch.compile(module, backend="eager", fullgraph=True)(*inputs)
    _assert_close(actual, expected, name)


def test_inductor_compile_of_patched_block_matches_eager_forward_and_backward():
    block = fastpatch.patch_model(reference.Block(DIM, HEADS, qkv_bias=True, rope=reference.RoPE2D(100.0)),
                                  backend="torch")
    x = torch.randn(2, 6, DIM, requires_grad=True)
    xpos = torch.cartesian_prod(torch.arange(2), torch.arange(3)).expand(2, 6, 2)
    grad_out = torch.randn(2, 6, DIM)

    def run(fn):
        out = fn(x, xpos)
        grads = torch.autograd.grad(out, [x] + list(block.parameters()), grad_out)
        return [out] + list(grads)

    expected = run(block)
    actual = run(torch.compile(block, fullgraph=True))
    _assert_close(actual, expected, "block output and grads")


def test_compiled_backend_choice_is_guarded_and_recompiles(monkeypatch, device):
    """Compiled under ``use_backend("torch")``, the same compiled module called under ``"triton"``
    recompiles and runs the Triton custom op (no stale choice baked into the graph)."""
    attn = fastpatch.Attention(DIM, rope=fastpatch.RoPE2D(100.0), num_heads=HEADS).eval().to(device)
    x = torch.randn(1, 6, DIM).to(device)
    xpos = torch.cartesian_prod(torch.arange(2), torch.arange(3)).expand(1, 6, 2).to(device)
    seen = []

    def spy(gm, example_inputs):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    compiled = torch.compile(attn, backend=spy, fullgraph=True)
    with torch.no_grad():
        with fastpatch.use_backend("torch"):
            torch_out = compiled(x, xpos)
        with fastpatch.use_backend("triton"):
            triton_out = compiled(x, xpos)
    assert len(seen) == 2
    assert not any("fastpatch" in target for target in seen[0])
    assert any("fastpatch.rope_attention_fwd" in target for target in seen[1])
    _assert_close(triton_out, torch_out, "triton vs torch")


# ----------------------------------------------------------------------------------------------
# Triton path: the custom ops trace with fake tensors and registered autograd
# ----------------------------------------------------------------------------------------------
def _attention_inputs(n_q: int = 16, n_k: int = 16, head_dim: int = 32, device="cpu"):
    q, k, v = (torch.randn(1, 1, n, head_dim).to(device) for n in (n_q, n_k, n_k))
    q_pos = torch.randint(0, 4, (1, n_q, 2)).to(device)
    k_pos = torch.randint(0, 4, (1, n_k, 2)).to(device)
    return q, k, v, q_pos, k_pos


def _opcheck_samples(device):
    """op name -> (args, test_utils) for every ``fastpatch::`` op, on ``device``; small so the interpreter is quick."""
    q, k, v, q_pos, k_pos = _attention_inputs(n_k=12, device=device)
    scale = 32 ** -0.5
    out, lse = torch.ops.fastpatch.rope_attention_fwd(q, k, v, q_pos, k_pos, 100.0, 1.0, scale)
    img, weight, bias = (t.to(device) for t in (torch.randn(2, 3, 16, 24), torch.randn(16, 3, 8, 8) * 0.1,
                                                torch.randn(16)))
    grad_tokens = torch.randn(2, 6, 16).to(device)
    flags = lambda *values: torch.tensor(values).to(device)  # noqa: E731  (ManyAR portrait flags)
    no_autograd = ("test_schema", "test_faketensor")
    grad = lambda *ts: tuple(t.clone().requires_grad_() for t in ts)  # noqa: E731
    # qk-norm attention: 2 frames of 1 special token + a 2x3 grid (14 tokens), head dim 32
    tq, tk, tv = (torch.randn(1, 2, 14, 32).to(device) for _ in range(3))
    norms = tuple((torch.randn(32) * 0.2 + centre).to(device) for centre in (1.0, 0.0, 1.0, 0.0))
    grid_pos = torch.tensor([[0, 0]] + [[r + 1, c + 1] for r in range(2) for c in range(3)]).repeat(2, 1)[None]
    qk_args = (None, [2, 3, 1], 100.0, 1e-5, scale, "float32")
    qk_out, qk_lse = torch.ops.fastpatch.qknorm_rope_attention_fwd(tq, tk, tv, *norms, *qk_args)
    return {
        "rope_attention_fwd": (grad(q, k, v) + (q_pos, k_pos, 100.0, 1.0, scale), None),
        "rope_attention_fwd_norope": (grad(q, k, v) + (None, None, None, 1.0, scale), None),
        "rope_attention_bwd": ((torch.randn_like(out), q, k, v, out, lse, q_pos, k_pos, 100.0, 1.0, scale),
                               no_autograd),
        "patch_embed_fwd": (grad(img, weight, bias) + (8, flags(True, False)), None),
        "patch_embed_grad_params": ((grad_tokens, img, weight, 8, None), no_autograd),
        "patch_embed_grad_image": ((grad_tokens, img, weight, 8, flags(False, True)), no_autograd),
        "qknorm_rope_attention_fwd": (grad(tq, tk, tv, *norms) + qk_args, None),
        "qknorm_rope_attention_bwd": ((torch.randn_like(qk_out), tq, tk, tv, *norms, qk_out, qk_lse,
                                       grid_pos.to(device), None, 100.0, 1e-5, scale, "float32"), no_autograd),
    }


OPCHECK_CASES = ["rope_attention_fwd", "rope_attention_fwd_norope", "rope_attention_bwd", "patch_embed_fwd",
                 "patch_embed_grad_params", "patch_embed_grad_image", "qknorm_rope_attention_fwd",
                 "qknorm_rope_attention_bwd"]


def test_every_fastpatch_custom_op_has_an_opcheck_case():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("fastpatch::")}
    covered = {case.removesuffix("_norope") for case in OPCHECK_CASES}
    assert registered == covered


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_custom_op_passes_opcheck(case, device):
    args, test_utils = _opcheck_samples(device)[case]
    op = getattr(torch.ops.fastpatch, case.removesuffix("_norope")).default
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    torch.library.opcheck(op, args, **kwargs)


def test_triton_path_backbone_compiles_fullgraph_forward_and_backward(device):
    """The patched backbone on the Triton path (on ``device``), under ``aot_eager``: the fake impls
    shape the graph, the registered backward is traced, and the results are eager's."""
    model = fastpatch.patch_model(_backbone("ManyAR_PatchEmbed"), backend="triton").to(device)
    inputs = _images(device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fn):
        outputs = _flat(fn(*inputs))
        loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1], device=device)).sum() for o in outputs)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return outputs + [g for g in grads if g is not None]

    expected = run(model)
    actual = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    _assert_close(actual, expected, "triton-path outputs and grads")


# ----------------------------------------------------------------------------------------------
# No host synchronisation (CUDA-graph capture)
# ----------------------------------------------------------------------------------------------
# Ops whose result the host must read from device memory: a sync on CUDA, fatal inside graph capture.
HOST_SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.masked_select,
                 aten.is_nonzero, aten.equal, aten.unique_consecutive, aten._unique2, aten.repeat_interleave}


def _cpu_only_validation() -> bool:
    """True inside ManyAR's true_shape value check, which runs only for CPU tensors outside tracing."""
    return any(frame.name == "_portrait_flags" for frame in traceback.extract_stack())


class HostSyncSpy(TorchDispatchMode):
    """Records every aten call that would make the host wait for the device (``.item()``,
    ``nonzero``, boolean-mask indexing, ``torch.equal``...), outside the CPU-only checks."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        masked = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if (func.overloadpacket in HOST_SYNC_OPS or masked) and not _cpu_only_validation():
            self.syncs.append(f"{func} from\n{''.join(traceback.format_stack(limit=8)[:-1])}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_and_backward_have_no_host_syncs(backend, device):
    on = device_for(backend, device)
    model = fastpatch.patch_model(_backbone("ManyAR_PatchEmbed"), backend=backend).to(on)
    model.train()  # dropout/drop-path modules are active code paths too (all probabilities 0 here)
    img1, img2, shape1, shape2 = _images(device=on)
    img1.requires_grad_()
    with HostSyncSpy() as spy:
        outputs = _flat(model(img1, img2, shape1, shape2))
        sum(o.sum() for o in outputs).backward()
    assert not spy.syncs, "\n\n".join(spy.syncs)


def test_host_sync_spy_catches_item_and_boolean_masks():
    x = torch.randn(4)
    with HostSyncSpy() as spy:
        x.sum().item()
        x[x > 0]
    assert len(spy.syncs) >= 2


def test_patched_backbone_runs_on_meta_tensors():
    """Meta tensors hold no data, so any host read of values (``.item()``, ``nonzero``) would raise:
    the whole forward is data-independent by construction (the torch path serves ``meta``)."""
    model = fastpatch.patch_model(copy.deepcopy(_backbone("ManyAR_PatchEmbed"))).to("meta")
    img1, img2, shape1, shape2 = (t.to("meta") for t in _images())
    outputs = _flat(model(img1, img2, shape1, shape2))
    assert [o.shape for o in outputs] == [(2, 6, 64)] * 4
    assert all(o.device.type == "meta" for o in outputs)
