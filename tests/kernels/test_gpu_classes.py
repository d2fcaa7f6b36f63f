"""The one capability-class mapping (kernels/gpu_classes.py) and the two config tables keyed by it."""
import re
from pathlib import Path

import pytest
import torch

from fastpatch.kernels.gpu_classes import CAPABILITY_CLASSES, GPU_CLASSES, INTERPRETER_CLASS, capability_class
from fastpatch.kernels.patch_embed_configs import PATCH_EMBED_CONFIGS, patch_embed_config
from fastpatch.kernels.rope_attention_configs import ROPE_ATTENTION_CONFIGS, rope_attention_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("capability, expected", [
    (None, 80), ((8, 0), 80), ((8, 7), 80), ((8, 6), 86), ((8, 9), 86), ((9, 0), 90), ((10, 0), 100), ((10, 3), 100),
    ((12, 0), 120), ((12, 1), 120), ((7, 5), 86), ((11, 0), 86), ((13, 0), 86),
])
def test_capability_classes(capability, expected):
    """sm_100 and sm_120 have classes of their own (they got the sm_80 attention rows and the Hopper
    patch-embedding rows before); unknown capabilities get the 99 KB, mma.sync class."""
    assert capability_class(capability) == expected


def test_every_class_has_a_row_for_every_key_in_both_tables():
    """Both tables have the same shape: (class, op facts...) keys, every class with the same op facts."""
    for table in (ROPE_ATTENTION_CONFIGS, PATCH_EMBED_CONFIGS):
        by_class = {c: {key[1:] for key in table if key[0] == c} for c in CAPABILITY_CLASSES}
        assert set(key[0] for key in table) == set(CAPABILITY_CLASSES)
        assert all(facts == by_class[80] for facts in by_class.values())


def test_both_ops_look_up_the_same_class():
    """The lookups take a (major, minor) capability and go through capability_class: no op maps on its own."""
    for capability in [None, (8, 6), (9, 0), (10, 0), (12, 0)]:
        cls = capability_class(capability)
        assert rope_attention_config(64, torch.bfloat16, capability) is ROPE_ATTENTION_CONFIGS[(cls, 64, torch.bfloat16,
                                                                                                "ieee")]
        assert patch_embed_config(1024, torch.bfloat16, capability) is PATCH_EMBED_CONFIGS[(cls, torch.bfloat16, True)]


def test_sm80_and_sm90_rows_are_unchanged():
    """The refactor kept what A100, Hopper and the interpreter run."""
    assert INTERPRETER_CLASS == 80
    assert tuple(patch_embed_config(1024, torch.bfloat16, (9, 0))) == (128, 128, 64, 8, 3)
    assert tuple(patch_embed_config(1024, torch.bfloat16, (8, 0))) == (128, 128, 32, 8, 3)
    assert tuple(patch_embed_config(64, torch.float32, None)) == (64, 64, 32, 4, 3)
    for key, config in ROPE_ATTENTION_CONFIGS.items():
        if key[0] == 90:
            assert ROPE_ATTENTION_CONFIGS[(80, *key[1:])] == config


def test_consumer_rows_fit_their_shared_memory_and_avoid_hopper_tiles():
    """sm_86/89 and sm_120: 99 KB per block and no wgmma: the patch embedding's 64-deep Hopper tiles are not used."""
    for cls in (86, 120):
        assert GPU_CLASSES[cls].shared_memory_per_block == 99 * 1024 and not GPU_CLASSES[cls].wgmma
        assert all(config.block_k == 32 for key, config in PATCH_EMBED_CONFIGS.items() if key[0] == cls)
    assert [c for c, gpu in GPU_CLASSES.items() if gpu.wgmma] == [90]


def test_docs_list_every_class_with_its_limits():
    """docs/gpu-classes.md has one table row per class, with its shared memory and wgmma."""
    text = (ROOT / "docs" / "gpu-classes.md").read_text()
    for cls, gpu in GPU_CLASSES.items():
        row = re.search(rf"^\| `{cls}` \|.*$", text, flags=re.M)
        assert row, f"no row for class {cls}"
        assert f"{gpu.shared_memory_per_block // 1024} KB" in row.group(0)
        assert ("| yes |" if gpu.wgmma else "| no") in row.group(0)
