"""Swap fastpatch's modules into DUSt3R / MASt3R / CroCo models, and back.

Two ways in, after Liger-Kernel's ``apply_*`` functions:

* :func:`patch_model` walks an already-built model and replaces every module named like an
  upstream class (``PatchEmbedDust3R``, ``ManyAR_PatchEmbed``, ``Attention``, ``CrossAttention``,
  ``Block``, ``DecoderBlock``, ``RoPE2D`` / ``cuRoPE2D``) whose function fastpatch provably
  computes. The replacement *adopts* the original's state: the very same ``Parameter`` objects,
  buffers, child modules, device, dtype and train/eval mode (no copy, so optimizer state stays
  valid and the ``state_dict`` is unchanged). :func:`unpatch_model` puts the original objects back.
* :func:`patch_dust3r` rebinds those class names (but ``Block`` / ``DecoderBlock``) inside the
  upstream Python modules already imported, so models built afterwards get fastpatch modules;
  :func:`unpatch_dust3r` restores them.

Never a different function: tools built on dust3r subclass or copy these classes under the same
names (LayerScale blocks, qk-norm attention, attention-map readers, temperatures), so a class name
proves nothing. A module is replaced when its code is a known upstream version, or when it passes
behavioural probes against fastpatch's replacement, or when the user trusts its class; anything
else is left alone, visibly (a ``UserWarning``, or ``strict=True`` to raise). The files:

* :mod:`.roles`: the upstream classes and what fastpatch's forward relies on for each;
* :mod:`.fingerprints`, :mod:`.known_code`: hashes of the public upstream versions, with their origin;
* :mod:`.forward_code`: the methods a forward runs and the attributes it reads, from the source;
* :mod:`.structure`: the children and values an instance must have;
* :mod:`.probes`: the behavioural verification;
* :mod:`.recognise`: the decision (known code, verified by probe, trusted, or left alone);
* :mod:`.adoption`, :mod:`.report`, :mod:`.model_patching`, :mod:`.class_patching`: the patching itself.

dust3r itself is never imported here.
"""
from .class_patching import patch_dust3r, unpatch_dust3r
from .fingerprints import fingerprint, source_fingerprints
from .model_patching import is_patched, patch_model, unpatch_model
from .recognise import KNOWN, PROBED, TRUSTED
from .report import PatchRefusedError, PatchReport

__all__ = ["PatchReport", "PatchRefusedError", "patch_model", "unpatch_model", "patch_dust3r", "unpatch_dust3r",
           "is_patched", "fingerprint", "source_fingerprints", "KNOWN", "PROBED", "TRUSTED"]
