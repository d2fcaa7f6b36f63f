"""What :func:`~fastpatch.patch_model` did, in detail (``print(model.fastpatch_report)``) and in one line."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["PatchReport", "PatchRefusedError"]

_ATTENTION_ROLES = ("Attention", "CrossAttention", "VGGTAttention", "FlashAttentionRope")


class PatchRefusedError(RuntimeError):
    """``patch_model(..., strict=True)`` found modules named like upstream classes it cannot replace."""


@dataclass
class PatchReport:
    """What :func:`~fastpatch.patch_model` did.

    Attributes:
        replaced: role (upstream class name) -> paths of the modules replaced.
        accepted_by: path -> how the replaced module was accepted: ``"known code"``,
            ``"verified by probe"`` or ``"trusted"``.
        left_alone: ``(path, "Role: reason")`` for each module named like an upstream class (or
            deriving from one) that was left alone. The root module's path is ``"<root>"``.
        left_alone_types: path -> ``"module.QualName"`` of the class left alone there.
    """

    replaced: Dict[str, List[str]] = field(default_factory=dict)
    accepted_by: Dict[str, str] = field(default_factory=dict)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)
    left_alone_types: Dict[str, str] = field(default_factory=dict)

    @property
    def num_replaced(self) -> int:
        return sum(len(paths) for paths in self.replaced.values())

    def left_alone_classes(self) -> Counter:
        """Role -> how many modules of that role were left alone."""
        return Counter(reason.split(":", 1)[0] for _, reason in self.left_alone)

    def cost(self) -> str:
        """What leaving those modules alone costs in speed, in a few words ("" if nothing was left)."""
        left = self.left_alone_classes()
        if not left:
            return ""
        parts = []
        attention_left = sum(left[r] for r in _ATTENTION_ROLES)
        attention_total = attention_left + sum(len(self.replaced.get(r, ())) for r in _ATTENTION_ROLES)
        if attention_total and attention_left == attention_total:
            parts.append("no attention accelerated: expect little speedup")
        elif attention_left:
            parts.append(f"{attention_left} of {attention_total} attention modules not accelerated: "
                         f"expect less speedup")
        if left["PatchEmbedDust3R"] or left["ManyAR_PatchEmbed"]:
            parts.append("patch embedding not accelerated")
        return "; ".join(parts) or "only block shells or RoPE modules outside attention: little speed lost"

    def summary(self) -> str:
        """One line: how many modules were replaced (per role, and how they were accepted) and left alone."""
        per_role = ", ".join(f"{len(p)} {role}" for role, p in sorted(self.replaced.items()))
        hows = Counter(self.accepted_by.values())
        text = f"fastpatch replaced {self.num_replaced} modules"
        if per_role:
            text += f" ({per_role}; " + ", ".join(f"{n} {how}" for how, n in sorted(hows.items())) + ")"
        if self.left_alone:
            left = ", ".join(f"{n} {role}" for role, n in sorted(self.left_alone_classes().items()))
            text += f"; left alone {len(self.left_alone)} ({left}): {self.cost()}"
        return text

    def __str__(self) -> str:
        lines = [self.summary()]
        for role, paths in sorted(self.replaced.items()):
            for path in paths:
                lines.append(f"  replaced   {path} ({role}, {self.accepted_by.get(path, '?')})")
        for path, reason in self.left_alone:
            lines.append(f"  left alone {path} ({reason})")
        return "\n".join(lines)
