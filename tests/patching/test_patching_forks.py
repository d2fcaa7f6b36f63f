"""patch_model / patch_dust3r never change what a fork of the upstream classes computes (mini-dust3r, test-only).

Forks are written here the way tools built on dust3r write them: a class with upstream's name (a
subclass of upstream's class, or a look-alike) whose forward differs (LayerScale, qk-norm, attention
maps with a temperature), a helper method overridden, or an upstream instance given extra children,
parameters or its own ``forward``. Each must compute after ``patch_model`` what it computed before,
be listed with its reason in ``fastpatch_report.left_alone``, and still have the upstream modules
inside it replaced. ``trust=`` opts a fork the user knows to be compatible back in.
"""
import sys
import types

import pytest
import torch
from torch import nn

import fastpatch
from fastpatch import use_backend
from fastpatch.patching import fingerprint
from fastpatch.testing import TOLERANCES, relative_error
from upstream import perturb_

FP32 = TOLERANCES[torch.float32].forward
DIM, HEADS, ROWS, COLS = 64, 2, 2, 6


def _inputs(batch: int = 2):
    """Tokens (B, ROWS*COLS, DIM) and their (y, x) grid positions (B, ROWS*COLS, 2)."""
    x = torch.randn(batch, ROWS * COLS, DIM)
    pos = torch.cartesian_prod(torch.arange(ROWS), torch.arange(COLS)).expand(batch, -1, -1).clone()
    return x, pos


def _heads(attn: nn.Module, x: torch.Tensor):
    """q, k, v (B, H, N, Dh) from an upstream-style ``qkv`` projection."""
    b, n, c = x.shape
    return attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)


def _merge(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dh) heads -> proj_drop(proj((B, N, C)))."""
    b, h, n, dh = out.shape
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, h * dh)))


# ----------------------------------------------------------------------------------------------
# Forks, each built by a function of the upstream code: (module, path of the fork, replaced paths)
# ----------------------------------------------------------------------------------------------
def _layer_scale_block(upstream):
    """DINOv2-style LayerScale: ``ls1``/``ls2`` children scale both residual branches."""

    class LayerScale(nn.Module):
        def __init__(self, dim, init_values):
            super().__init__()
            self.gamma = nn.Parameter(torch.full((dim,), init_values))

        def forward(self, x):
            return x * self.gamma

    class Block(upstream.blocks.Block):
        def __init__(self, dim, num_heads, rope=None, init_values=0.5, **kwargs):
            super().__init__(dim, num_heads, rope=rope, **kwargs)
            self.ls1 = LayerScale(dim, init_values)
            self.ls2 = LayerScale(dim, init_values)

        def forward(self, x, xpos):
            x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), xpos)))
            return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    block = Block(DIM, HEADS, rope=upstream.rope.RoPE2D(freq=100.0), qkv_bias=True)
    return block, "<root>", {"Attention": ["attn"], "RoPE2D": ["attn.rope"]}


def _layer_scale_lookalike_block(upstream):
    """A look-alike ``Block`` (not a subclass) with LayerScale as direct parameters ``gamma_1``/``gamma_2``."""

    class Block(nn.Module):
        def __init__(self, dim, num_heads, rope):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = upstream.blocks.Attention(dim, rope=rope, num_heads=num_heads, qkv_bias=True)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = upstream.blocks.Mlp(dim, 4 * dim)
            self.drop_path = nn.Identity()
            self.gamma_1 = nn.Parameter(torch.full((dim,), 0.5))
            self.gamma_2 = nn.Parameter(torch.full((dim,), 0.5))

        def forward(self, x, xpos):
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), xpos))
            return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))

    block = Block(DIM, HEADS, rope=upstream.rope.RoPE2D(freq=100.0))
    return block, "<root>", {"Attention": ["attn"], "RoPE2D": ["attn.rope"]}


def _qk_norm_attention_in_block(upstream):
    """An upstream Block whose ``attn`` is a qk-norm Attention (LayerNorm on q and k per head)."""

    class Attention(upstream.blocks.Attention):
        def __init__(self, dim, rope=None, num_heads=8, **kwargs):
            super().__init__(dim, rope=rope, num_heads=num_heads, **kwargs)
            self.q_norm = nn.LayerNorm(dim // num_heads)
            self.k_norm = nn.LayerNorm(dim // num_heads)

        def forward(self, x, xpos):
            q, k, v = _heads(self, x)
            q, k = self.q_norm(q), self.k_norm(k)
            if self.rope is not None:
                q, k = self.rope(q, xpos), self.rope(k, xpos)
            return _merge(self, torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1) @ v)

    rope = upstream.rope.RoPE2D(freq=100.0)
    block = upstream.blocks.Block(DIM, HEADS, qkv_bias=True, rope=rope)
    block.attn = Attention(DIM, rope=rope, num_heads=HEADS, qkv_bias=True)
    return block, "attn", {"Block": ["<root>"], "RoPE2D": ["attn.rope"]}


def _attention_map_temperature_attention(upstream):
    """An attention-map reader: keeps the maps in ``attn_map`` and sharpens them with a temperature."""

    class Attention(upstream.blocks.Attention):
        temperature = 0.5

        def forward(self, x, xpos):
            q, k, v = _heads(self, x)
            if self.rope is not None:
                q, k = self.rope(q, xpos), self.rope(k, xpos)
            attn = torch.softmax(q @ k.transpose(-2, -1) * (self.scale / self.temperature), dim=-1)
            self.attn_map = attn.detach()
            return _merge(self, attn @ v)

    return Attention(DIM, rope=upstream.rope.RoPE2D(freq=100.0), num_heads=HEADS), "<root>", {"RoPE2D": ["rope"]}


def _interpolated_rope_in_block(upstream):
    """A ``RoPE2D`` subclass that only overrides the helper ``get_cos_sin`` (positions interpolated by 1/2).

    Its forward is upstream's; the function is not. The Attention holding it reads ``rope.base``, so it
    must be left alone too; the Block around it is upstream's and is replaced.
    """

    class RoPE2D(upstream.rope.RoPE2D):
        def get_cos_sin(self, D, seq_len, device, dtype):
            inv_freq = 0.5 / self.base ** (torch.arange(0, D, 2, device=device).float() / D)
            angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq).to(dtype)
            angles = torch.cat((angles, angles), dim=-1)
            return angles.cos(), angles.sin()

    block = upstream.blocks.Block(DIM, HEADS, qkv_bias=True, rope=RoPE2D(freq=100.0))
    return block, "attn.rope", {"Block": ["<root>"]}


FORKS = {
    "layer_scale_block": _layer_scale_block,
    "layer_scale_lookalike_block": _layer_scale_lookalike_block,
    "qk_norm_attention": _qk_norm_attention_in_block,
    "attention_map_temperature": _attention_map_temperature_attention,
    "interpolated_rope": _interpolated_rope_in_block,
}


@pytest.mark.parametrize("fork", list(FORKS))
def test_fork_computes_the_same_after_patching(upstream, fork):
    module, fork_path, replaced = FORKS[fork](upstream)
    module = perturb_(module).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = module(*inputs)
    patched = fastpatch.patch_model(module, backend="torch")
    with torch.no_grad():
        actual = patched(*inputs)
    err = relative_error(actual, expected)
    assert err <= FP32, f"{fork}: patch_model changed the output (relative error {err:.2e})"
    report = patched.fastpatch_report
    assert fork_path in [path for path, _ in report.left_alone], str(report)
    assert report.replaced == replaced, str(report)


def test_fork_reasons_name_what_differs(upstream):
    reasons = {}
    for fork in ("layer_scale_block", "layer_scale_lookalike_block", "attention_map_temperature"):
        module, path, _ = FORKS[fork](upstream)
        reasons[fork] = dict(fastpatch.patch_model(module).fastpatch_report.left_alone)[path]
    assert "forward" in reasons["attention_map_temperature"]
    assert "forward" in reasons["layer_scale_block"]  # the class is checked before its children
    assert "forward" in reasons["layer_scale_lookalike_block"]
    block, path, _ = _interpolated_rope_in_block(upstream)
    left_alone = dict(fastpatch.patch_model(block).fastpatch_report.left_alone)
    assert "get_cos_sin" in left_alone["attn.rope"] and "rope" in left_alone["attn"]


def test_attention_map_fork_still_runs_its_own_forward(upstream):
    attn, _, _ = _attention_map_temperature_attention(upstream)
    attn = fastpatch.patch_model(attn, backend="torch")
    with torch.no_grad():
        attn(*_inputs(1))
    assert attn.attn_map.shape == (1, HEADS, ROWS * COLS, ROWS * COLS)


# ----------------------------------------------------------------------------------------------
# Upstream instances changed after construction
# ----------------------------------------------------------------------------------------------
def _temperature_forward(self, x, xpos):
    q, k, v = _heads(self, x)
    q, k = self.rope(q, xpos), self.rope(k, xpos)
    return _merge(self, torch.softmax(q @ k.transpose(-2, -1) * (2 * self.scale), dim=-1) @ v)


class _ScaledDropout(nn.Dropout):
    """Dropout that also scales its input: fastpatch's attention reads ``attn_drop.p`` and would skip it."""

    def forward(self, x):
        return super().forward(x) * 0.5


def _edit_extra_child(block):
    block.attn.q_norm = nn.LayerNorm(DIM // HEADS)
    return "attn", "q_norm"


def _edit_missing_child(block):
    del block.attn.proj_drop
    return "attn", "proj_drop"


def _edit_extra_parameter(block):
    block.gamma_1 = nn.Parameter(torch.ones(DIM))
    return "<root>", "gamma_1"


def _edit_instance_forward(block):
    block.attn.forward = types.MethodType(_temperature_forward, block.attn)
    return "attn", "forward"


def _edit_attention_dropout(block):
    block.attn.attn_drop = _ScaledDropout(0.0)
    return "attn", "attn_drop"


EDITS = {
    "extra_child": _edit_extra_child,
    "missing_child": _edit_missing_child,
    "extra_parameter": _edit_extra_parameter,
    "instance_forward": _edit_instance_forward,
    "attention_dropout": _edit_attention_dropout,
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_upstream_instance_is_left_alone(upstream, edit):
    block = upstream.blocks.Block(DIM, HEADS, qkv_bias=True, rope=upstream.rope.RoPE2D(freq=100.0))
    path, what = EDITS[edit](perturb_(block).eval())
    inputs = _inputs()
    runs = edit != "missing_child"  # upstream's own forward needs proj_drop
    if runs:
        with torch.no_grad():
            expected = block(*inputs)
    patched = fastpatch.patch_model(block, backend="torch")
    left_alone = dict(patched.fastpatch_report.left_alone)
    assert path in left_alone and what in left_alone[path], str(patched.fastpatch_report)
    if runs:
        with torch.no_grad():
            assert relative_error(patched(*inputs), expected) <= FP32


# ----------------------------------------------------------------------------------------------
# Upstream code is still replaced; forks inside an upstream model
# ----------------------------------------------------------------------------------------------
SMALL = dict(img_size=(32, 48), patch_size=16, enc_embed_dim=DIM, enc_depth=2, enc_num_heads=HEADS,
             dec_embed_dim=DIM, dec_depth=2, dec_num_heads=HEADS, pos_embed="RoPE100")


def _dust3r(upstream, patch_embed_cls="PatchEmbedDust3R"):
    torch.manual_seed(0)
    model = upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d",
                                                   patch_embed_cls=patch_embed_cls, **SMALL)
    return perturb_(model, scale=0.02).eval()


def _dust3r_outputs(model, batch=1):
    torch.manual_seed(1)
    shape = torch.tensor([[32, 48]] * batch)
    views = [dict(img=torch.randn(batch, 3, 32, 48), true_shape=shape, instance=[str(i)]) for i in range(2)]
    with torch.no_grad(), use_backend("torch"):
        res1, res2 = model(*views)
    return [res1["pts3d"], res1["conf"], res2["pts3d_in_other_view"], res2["conf"]]


@pytest.mark.parametrize("patch_embed_cls", ["PatchEmbedDust3R", "ManyAR_PatchEmbed"])
def test_every_upstream_module_of_a_dust3r_model_is_replaced(upstream, patch_embed_cls):
    model = _dust3r(upstream, patch_embed_cls)
    fastpatch.patch_model(model)
    report = model.fastpatch_report
    assert report.left_alone == []
    assert report.replaced[patch_embed_cls] == ["patch_embed"]
    assert len(report.replaced["Attention"]) == 2 + 4 and len(report.replaced["CrossAttention"]) == 4
    assert len(report.replaced["Block"]) == 2 and len(report.replaced["DecoderBlock"]) == 4


def test_layer_scale_fork_inside_an_upstream_model(upstream):
    model = _dust3r(upstream)
    fork, _, _ = _layer_scale_block(upstream)
    fork.attn.rope = model.enc_blocks[1].attn.rope  # the model's shared RoPE2D
    model.enc_blocks[1] = perturb_(fork, seed=1).eval()
    expected = _dust3r_outputs(model)
    fastpatch.patch_model(model)
    for out, ref in zip(_dust3r_outputs(model), expected):
        assert relative_error(out, ref) <= FP32
    report = model.fastpatch_report
    assert [path for path, _ in report.left_alone] == ["enc_blocks.1"]
    assert report.replaced["Block"] == ["enc_blocks.0"]
    assert "enc_blocks.1.attn" in report.replaced["Attention"]
    assert type(model.enc_blocks[1].attn) is fastpatch.Attention and type(model.enc_blocks[1]) is type(fork)


# ----------------------------------------------------------------------------------------------
# trust=: the explicit opt-in
# ----------------------------------------------------------------------------------------------
def _counting_attention_class(upstream, name="Attention"):
    """A compatible fork: counts its calls, then computes upstream's function."""

    def forward(self, x, xpos):
        type(self).calls += 1
        return upstream.blocks.Attention.forward(self, x, xpos)

    return type(name, (upstream.blocks.Attention,), {"calls": 0, "forward": forward})


@pytest.mark.parametrize("name", ["Attention", "CountingAttention"])
def test_trusted_fork_is_replaced(upstream, name):
    cls = _counting_attention_class(upstream, name)
    attn = perturb_(cls(DIM, rope=upstream.rope.RoPE2D(freq=100.0), num_heads=HEADS)).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = attn(*inputs)
    assert fastpatch.patch_model(attn).fastpatch_report.replaced == {"RoPE2D": ["rope"]}
    patched = fastpatch.patch_model(attn, backend="torch", trust=[cls])
    assert type(patched) is fastpatch.Attention and patched.fastpatch_report.replaced["Attention"] == ["<root>"]
    with torch.no_grad():
        assert relative_error(patched(*inputs), expected) <= FP32


def test_trust_keeps_the_checks_fastpatch_forward_needs(upstream):
    cls = _counting_attention_class(upstream)
    attn = cls(DIM, rope=upstream.rope.RoPE2D(freq=100.0), num_heads=HEADS)
    attn.attn_drop = _ScaledDropout(0.0)
    patched = fastpatch.patch_model(attn, trust=[cls])
    assert patched is attn and "attn_drop" in dict(patched.fastpatch_report.left_alone)["<root>"]


def test_trust_rejects_a_class_with_no_recognised_role():
    with pytest.raises(ValueError, match="Linear"):
        fastpatch.patch_model(nn.Sequential(nn.Linear(2, 2)), trust=[nn.Linear])
    with pytest.raises(TypeError, match="class"):
        fastpatch.patch_model(nn.Sequential(nn.Linear(2, 2)), trust=[nn.Linear(2, 2)])


# ----------------------------------------------------------------------------------------------
# Class-level patching
# ----------------------------------------------------------------------------------------------
def test_class_level_patching_never_rebinds_a_fork(upstream, monkeypatch):
    fork_attention = type(_attention_map_temperature_attention(upstream)[0])

    class CrossAttention(upstream.blocks.CrossAttention):  # upstream's forward, its own construction
        def __init__(self, dim, rope=None, num_heads=8, qkv_bias=False, **kwargs):
            super().__init__(dim, rope=rope, num_heads=num_heads, qkv_bias=True, **kwargs)

    fork = types.ModuleType("dust3r_fork_blocks_under_test")
    fork.Attention, fork.CrossAttention = fork_attention, CrossAttention
    monkeypatch.setitem(sys.modules, fork.__name__, fork)
    try:
        rebound = fastpatch.patch_dust3r()
        assert "mini_dust3r.croco.blocks.Attention" in rebound
        assert "mini_dust3r.croco.blocks.CrossAttention" in rebound
        assert not [name for name in rebound if name.startswith(fork.__name__)]
        assert fork.Attention is fork_attention and fork.CrossAttention is CrossAttention
    finally:
        fastpatch.unpatch_dust3r()
    try:
        rebound = fastpatch.patch_dust3r(trust=[CrossAttention])
        assert f"{fork.__name__}.CrossAttention" in rebound and fork.CrossAttention is fastpatch.CrossAttention
        assert fork.Attention is fork_attention
    finally:
        fastpatch.unpatch_dust3r()
    assert upstream.blocks.Attention.__module__.startswith("mini_dust3r")


# ----------------------------------------------------------------------------------------------
# The code fingerprint
# ----------------------------------------------------------------------------------------------
def _formatted(self, x):
    """A docstring does not count."""
    # nor do comments, blank lines or spacing
    return self.proj( x * 2 )


def _reformatted(self, x):
    return self.proj(x * 2)


def _changed_constant(self, x):
    return self.proj(x * 3)


def _changed_attribute(self, x):
    return self.proj2(x * 2)


def test_fingerprint_sees_code_not_formatting():
    assert fingerprint(_formatted) == fingerprint(_reformatted)  # the name does not count either
    assert fingerprint(_formatted) != fingerprint(_changed_constant)
    assert fingerprint(_formatted) != fingerprint(_changed_attribute)
