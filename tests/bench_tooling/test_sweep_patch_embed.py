"""bench/sweep_patch_embed.py and the patch-embedding launchers' ``override_config``.

The sweep runs at a tiny shape (1 image of 32x32, 64 channels) in float32 with one extra candidate
(``quick``): both steps must produce checked, ranked rows and a cuDNN comparison, and a candidate
whose numbers are wrong must be reported and never chosen.
"""
import pytest
import torch

from bench import sweep_patch_embed
from fastpatch.kernels.patch_embed_configs import PatchEmbedConfig, patch_embed_config
from fastpatch.launchers import patch_embed as launchers
from fastpatch.testing import TOLERANCES
from fastpatch_dev.aot import recorded_launches

TINY = {"tiny": (1, 32, 32, 64)}


def _forward_launch():
    img = torch.empty(1, 3, 32, 32)
    weight, bias = torch.empty(64, 3, 16, 16), torch.empty(64)
    with recorded_launches([launchers.patch_embed_fwd_kernel]) as launches:
        launchers.patch_embed_forward(img, weight, bias, 16)
    [(_, arguments, options)] = launches
    return (arguments["BLOCK_M"], arguments["BLOCK_N"], arguments["BLOCK_K"], options["num_warps"],
            options["num_stages"])


def test_override_config_launches_the_given_config_and_restores_the_table():
    table = patch_embed_config(64, torch.float32, None)
    custom = PatchEmbedConfig(block_m=16, block_n=128, block_k=64, num_warps=2, num_stages=5)
    with launchers.override_config(custom, torch.device("cpu"), torch.float32, 64):
        assert _forward_launch() == tuple(custom)
        with launchers.override_config(table, torch.device("cpu"), torch.float32, 64):  # nested
            assert _forward_launch() == tuple(table)
        assert _forward_launch() == tuple(custom)
    assert _forward_launch() == tuple(table)
    with launchers.override_config(custom, torch.device("cpu"), torch.float32, 128):  # another width: no effect
        assert _forward_launch() == tuple(table)


@pytest.mark.parametrize("config,message", [
    (PatchEmbedConfig(64, 64, 24, 4, 3), "block_k must be a power of two"),
    (PatchEmbedConfig(64, 64, 32, 5, 3), "num_warps"),
])
def test_override_config_rejects_bad_configs(config, message):
    with pytest.raises(ValueError, match=message):
        with launchers.override_config(config, torch.device("cpu"), torch.float32, 64):
            pass


def test_sweep_ranks_checked_candidates_and_never_picks_a_wrong_one(tmp_path, device, monkeypatch):
    """The table's forward is made wrong: it must be flagged, and the other candidate chosen."""
    table = sweep_patch_embed.table_config("fp32", 64, device)
    real_forward = sweep_patch_embed.patch_embed_forward

    def forward_wrong_with_the_table_config(img, weight, bias, patch):
        tokens, pos = real_forward(img, weight, bias, patch)
        given = launchers._OVERRIDES.active()
        if not given or table in given.values():
            tokens = tokens * 1.01
        return tokens, pos

    monkeypatch.setattr(sweep_patch_embed, "patch_embed_forward", forward_wrong_with_the_table_config)
    document = sweep_patch_embed.run(str(tmp_path), ["fp32"], TINY, device, quick=True, log=lambda line: None)

    rows = document["rows"]
    assert [(r["step"], r["config"] == table._asdict()) for r in rows] == [
        ("forward", True), ("forward", False), ("backward", True), ("backward", False)]
    assert rows[0]["status"].startswith("wrong")
    for row in rows[1:]:
        assert row["status"] == "ok", row
        assert max(row["error"].values()) <= TOLERANCES[torch.float32].backward
    assert document["chosen"]["fp32"]["forward"] != table._asdict()
    [forward, backward] = document["comparisons"]
    for comparison in (forward, backward):
        ratios = comparison["ratio"]["tiny"]
        assert ratios["best_vs_cudnn"] > 0 and ratios["table_vs_cudnn"] > 0 and ratios["cudnn_ms"]
    report = sweep_patch_embed.markdown(document)
    assert "## fp32 forward" in report and "## fp32 backward" in report
    assert f"1 candidate(s) not ranked: {sweep_patch_embed._describe(rows[0])}: wrong" in report


def test_shapes_of_one_sweep_share_an_embedding_width(tmp_path, device):
    with pytest.raises(ValueError, match="share an embedding width"):
        sweep_patch_embed.run(str(tmp_path), ["fp32"], {"a": (1, 32, 32, 64), "b": (1, 32, 32, 128)}, device)
