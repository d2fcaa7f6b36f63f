"""What patch_model reads of a class's code: fingerprints from text, the methods forward runs, the
attributes it reads, and the report, warning and strict mode built on the decisions."""
import inspect
import textwrap
import warnings

import pytest
import torch
from torch import nn

import fastpatch
from fastpatch import reference
from fastpatch.patching import PatchRefusedError, fingerprint, source_fingerprints
from fastpatch.patching.forward_code import forward_code
from fastpatch.testing import TOLERANCES, relative_error


class Base(nn.Module):
    def forward(self, x):
        return self.helper(x) * self.gain

    def helper(self, x):
        return x + self.offset

    def never_called(self):
        return self.secret


class Derived(Base):
    def forward(self, x):
        return super().forward(x) + self.shift_value

    @property
    def shift_value(self):
        return self.shift


class Escapes(nn.Module):
    def forward(self, x):
        return some_function(self, x)  # noqa: F821 - never run


class Stores(nn.Module):
    def forward(self, x):
        self.last = x
        return x


class DynamicRead(nn.Module):
    def forward(self, x):
        return getattr(self, "gain") * x


def test_forward_code_follows_methods_super_and_properties():
    code = forward_code(Derived)
    assert code.failure is None
    assert {name for name, _ in code.methods} == {"forward", "helper", "shift_value"}
    assert ("forward", Base) in code.methods and ("forward", Derived) in code.methods
    assert code.reads == {"gain", "offset", "shift"}  # never_called's "secret" does not count


@pytest.mark.parametrize("cls, words", [(Escapes, "other than through its attributes"),
                                         (Stores, "assigns self.last"),
                                         (DynamicRead, "other than through its attributes")])
def test_forward_code_fails_where_self_cannot_be_followed(cls, words):
    assert words in forward_code(cls).failure


def test_source_fingerprints_match_live_functions():
    text = textwrap.dedent(inspect.getsource(Base))
    prints = source_fingerprints(text)
    assert prints["Base.forward"] == fingerprint(Base.forward)
    assert prints["Base.helper"] == fingerprint(Base.helper)
    assert prints["Base.forward"] != prints["Base.helper"]


def _attention(cls=reference.Attention):
    return cls(32, rope=reference.RoPE2D(100.0), num_heads=2, qkv_bias=True).eval()


def test_unused_helpers_do_not_decide():
    """A reference Attention subclass adding an _init_weights and an unused helper is still the
    reference's forward: accepted as known code."""

    class Attention(reference.Attention):
        def _init_weights(self):
            nn.init.zeros_(self.proj.weight)

        def unused(self):
            return self.temperature

    model = nn.Sequential(_attention(Attention))
    fastpatch.patch_model(model)
    # reference's forward is not an upstream fingerprint: the subclass goes through the probe.
    assert model.fastpatch_report.accepted_by["0"] == fastpatch.patching.PROBED


def _temperature_attention():
    class Attention(reference.Attention):
        def forward(self, x, xpos):
            return super().forward(x, xpos) / self.temperature

    attn = _attention(Attention)
    attn.temperature = 1.0
    return attn


def test_left_alone_warns_once_with_classes_and_cost():
    model = nn.Sequential(_temperature_attention(), _temperature_attention(), _attention())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastpatch.patch_model(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "left alone 2 (2 Attention)" in messages[0]
    assert "2 of 3 attention modules not accelerated" in messages[0]
    assert "temperature" in str(model.fastpatch_report)
    assert model.fastpatch_report.summary() in messages[0]


def test_nothing_left_alone_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpatch.patch_model(nn.Sequential(_attention(), _attention()))


def test_no_attention_accelerated_says_so():
    model = nn.Sequential(_temperature_attention())
    with pytest.warns(UserWarning, match="no attention accelerated: expect little speedup"):
        fastpatch.patch_model(model)


def test_strict_raises_and_leaves_the_model_unpatched():
    first, fork = _attention(), _temperature_attention()
    model = nn.Sequential(first, fork)
    with pytest.raises(PatchRefusedError, match="temperature"):
        fastpatch.patch_model(model, strict=True)
    assert model[0] is first and model[1] is fork and not fastpatch.is_patched(model)
    assert "fastpatch_report" not in model.__dict__


def test_probe_leaves_rng_and_caches_alone():
    attn = _attention(type("Attention", (reference.Attention,), {}))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    patched = fastpatch.patch_model(nn.Sequential(attn))
    assert patched.fastpatch_report.accepted_by["0"] == fastpatch.patching.PROBED
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p is q for p, q in zip(patched.parameters(), attn.parameters()))


def test_changed_init_weights_keeps_upstream_code_known(upstream):
    """Upstream's PatchEmbedDust3R with another _init_weights (never run by forward) is known code."""

    class PatchEmbedDust3R(upstream.patch_embed.PatchEmbedDust3R):
        def _init_weights(self):
            nn.init.zeros_(self.proj.weight)

        def describe(self):
            return self.temperature

    model = nn.Sequential(PatchEmbedDust3R(64, 16, 3, 32))
    fastpatch.patch_model(model)
    assert model.fastpatch_report.accepted_by == {"0": fastpatch.patching.KNOWN}


def test_an_override_calling_upstream_through_super_is_not_known_code(upstream):
    """Both the override and upstream's forward it calls must be known versions."""

    class Attention(upstream.blocks.Attention):
        def forward(self, x, xpos):
            return super().forward(x, xpos) * 2

    attn = Attention(32, rope=upstream.rope.RoPE2D(100.0), num_heads=2).eval()
    x, pos = torch.randn(1, 6, 32), torch.cartesian_prod(torch.arange(2), torch.arange(3))[None]
    with torch.no_grad():
        expected = attn(x, pos)
    with pytest.warns(UserWarning, match="left alone 1"):
        patched = fastpatch.patch_model(nn.Sequential(attn))
    assert "forward is not a known upstream version" in dict(patched.fastpatch_report.left_alone)["0"]
    with torch.no_grad():
        assert relative_error(patched[0](x, pos), expected) <= TOLERANCES[torch.float32].forward


def test_a_public_version_known_to_differ_is_refused_without_probe(monkeypatch):
    """KNOWN_DIFFERENT names public versions a tensor probe cannot tell apart (e.g. a forward that
    also takes lists of views): refused with that reason."""
    from fastpatch.patching import known_code

    class Attention(reference.Attention):
        def forward(self, x, xpos):
            return super().forward(x, xpos)

    monkeypatch.setitem(known_code.KNOWN_DIFFERENT, fingerprint(Attention.forward), "also takes lists of views")
    with pytest.warns(UserWarning):
        patched = fastpatch.patch_model(nn.Sequential(_attention(Attention)))
    assert dict(patched.fastpatch_report.left_alone)["0"] == "Attention: also takes lists of views"
