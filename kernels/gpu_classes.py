"""GPU capability classes: the one mapping from a device's compute capability to the config tables' rows.

Both launch-config tables (:mod:`.rope_attention_configs`, :mod:`.patch_embed_configs`) hold one
row per class, keyed by the class's number (80, 86, 90, 100, 120). A class groups the GPUs whose
limits decide a launch config -- shared memory per block, registers, which tensor-core
instructions Triton emits -- so that one row fits all of them:

=========  =====================  ========================  =========================  =====
class      compute capability     GPUs (examples)           shared memory per block    wgmma
=========  =====================  ========================  =========================  =====
``80``     8.0, 8.7               A100, A30, Jetson Orin    163 KB                     no
``86``     8.6, 8.9, and others   RTX 30xx/40xx, A10, L4    99 KB                      no
``90``     9.x                    H100, H200, GH200         227 KB                     yes
``100``    10.x                   B200, GB200, B300         227 KB                     no (tcgen05)
``120``    12.x                   RTX 50xx, RTX PRO 6000    99 KB                      no
=========  =====================  ========================  =========================  =====

Capabilities no class names (pre-Ampere, 11.x, a future major) get class ``86``: its rows need
the least (99 KB, the ``mma.sync`` tensor cores every GPU since sm_80 has). The Triton interpreter
(capability ``None``) runs the ``80`` rows. ``docs/gpu-classes.md`` lists what the compile tests
check per class. Plain data: no triton import.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["GpuClass", "GPU_CLASSES", "CAPABILITY_CLASSES", "INTERPRETER_CLASS", "capability_class"]

KB = 1024


@dataclass(frozen=True)
class GpuClass:
    """What the config rows of one class must respect.

    Attributes:
        key: the tables' key (80, 86, 90, 100, 120).
        capability: the ``(major, minor)`` the compile tests build this class's rows for.
        gpus: example GPUs, for the docs.
        shared_memory_per_block: the opt-in maximum of shared memory one program may use, bytes.
        tensor_cores: the tensor-core instruction Triton emits for fp16/bf16 ``tl.dot`` on this
            class: ``"mma.sync"`` (Ampere's, on every class), ``"wgmma"`` (Hopper only) or
            ``"tcgen05"`` (datacenter Blackwell's).
    """

    key: int
    capability: Tuple[int, int]
    gpus: str
    shared_memory_per_block: int
    tensor_cores: str

    @property
    def wgmma(self) -> bool:
        """Whether the architecture has Hopper's warpgroup MMA (``wgmma``): sm_90 only."""
        return self.tensor_cores == "wgmma"


GPU_CLASSES: Dict[int, GpuClass] = {
    80: GpuClass(80, (8, 0), "A100, A30, Jetson Orin (8.7)", 163 * KB, "mma.sync"),
    86: GpuClass(86, (8, 6), "RTX 30xx (8.6), RTX 40xx / L4 / L40 (8.9), A10", 99 * KB, "mma.sync"),
    90: GpuClass(90, (9, 0), "H100, H200, GH200", 227 * KB, "wgmma"),
    100: GpuClass(100, (10, 0), "B200, GB200, B300", 227 * KB, "tcgen05"),
    120: GpuClass(120, (12, 0), "RTX 50xx, RTX PRO 6000 Blackwell", 99 * KB, "mma.sync"),
}
CAPABILITY_CLASSES: Tuple[int, ...] = tuple(GPU_CLASSES)
#: The class whose rows the Triton interpreter runs (capability ``None``).
INTERPRETER_CLASS = 80

_BY_CAPABILITY = {(8, 0): 80, (8, 7): 80, (8, 6): 86, (8, 9): 86}
_BY_MAJOR = {9: 90, 10: 100, 12: 120}


def capability_class(capability: Optional[Tuple[int, int]]) -> int:
    """The class of a ``(major, minor)`` compute capability (``torch.cuda.get_device_capability``);
    ``None`` (the interpreter) gives :data:`INTERPRETER_CLASS`, an unlisted capability ``86``."""
    if capability is None:
        return INTERPRETER_CLASS
    major, minor = capability
    return _BY_CAPABILITY.get((major, minor)) or _BY_MAJOR.get(major, 86)
