"""bench/pairs.py against dust3r's own code (mini-dust3r): the pair list of ``make_pairs`` and the
result of ``inference`` (same batches, so bit-identical outputs) on a tiny upstream model (its
``inference`` type-checks the model's class); and bench/report.py's pairs/s table."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.pairs import (PREDICTION_KEYS, complete_symmetrized_pairs, prediction_tensors, scene_images,
                         synthetic_scene, upstream_style_inference)
from upstream import perturb_

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(img_size=(32, 48), patch_size=8, enc_embed_dim=64, enc_depth=1, enc_num_heads=2, dec_embed_dim=32,
            dec_depth=2, dec_num_heads=2, pos_embed="RoPE100")


def _assert_identical(actual, expected, what="result"):
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{what}: {list(actual)} != {list(expected)}"
        for key in expected:
            _assert_identical(actual[key], expected[key], f"{what}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_identical(a, e, f"{what}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, what
        assert actual.device == expected.device and torch.equal(actual, expected), what
    else:
        assert actual == expected, what


def test_scene_images_are_load_images_dicts():
    images = scene_images([(32, 48), (48, 32)], seed=3)
    assert [sorted(image) for image in images] == [["idx", "img", "instance", "true_shape"]] * 2
    assert images[1]["img"].shape == (1, 3, 48, 32) and images[1]["instance"] == "1" and images[1]["idx"] == 1
    assert images[1]["true_shape"].dtype == np.int32 and images[1]["true_shape"].tolist() == [[48, 32]]
    assert all(image["img"].abs().max() <= 1 for image in images)
    assert torch.equal(scene_images([(32, 48)], seed=3)[0]["img"], images[0]["img"])
    assert not torch.equal(images[0]["img"][..., :32, :32], images[1]["img"][..., :32, :32])


@pytest.mark.parametrize("n_images", [1, 2, 4, 5])
def test_complete_symmetrized_pairs_match_make_pairs(upstream, n_images):
    images = synthetic_scene(n_images, 32, 48)
    expected = upstream.image_pairs.make_pairs(images, scene_graph="complete", symmetrize=True)
    actual = complete_symmetrized_pairs(images)
    assert [(a["idx"], b["idx"]) for a, b in actual] == [(a["idx"], b["idx"]) for a, b in expected]
    assert all(a is c and b is d for (a, b), (c, d) in zip(actual, expected))
    assert len(actual) == n_images * (n_images - 1)


@pytest.mark.parametrize("sizes, batch_size", [
    ([(32, 48)] * 4, 5),  # 12 pairs: batches of 5, 5, 2
    ([(32, 48)] * 3, 1),
    ([(32, 48), (48, 32), (32, 48)], 4),  # mixed sizes: batch size forced to 1, per-pair lists
])
def test_upstream_style_inference_equals_dust3r_inference(upstream, sizes, batch_size):
    torch.manual_seed(0)
    model = upstream.model.AsymmetricCroCo3DStereo(head_type="linear", output_mode="pts3d", **TINY)
    model = perturb_(model).eval()
    pairs = complete_symmetrized_pairs(scene_images(sizes))
    expected = upstream.inference.inference(pairs, model, "cpu", batch_size=batch_size, verbose=False)
    actual = upstream_style_inference(pairs, model, "cpu", batch_size=batch_size)
    _assert_identical(actual, expected)
    tensors = prediction_tensors(actual)
    mixed = len(set(sizes)) > 1
    assert len(tensors) == len(PREDICTION_KEYS) * (len(pairs) if mixed else 1)
    assert tensors[0].shape == ((32, 48, 3) if mixed else (len(pairs), 32, 48, 3))


def test_report_shows_pairs_per_second_and_ratio_vs_upstream_loop(tmp_path):
    def row(provider, median_s, **info):
        info.update(case="scene4-forward-224x224-b2-float32-cpu", provider=provider, device="cpu", dtype="float32",
                    flops=1e12, rounds=2, images=4, pairs=12, batch=2, pairs_per_s=12 / median_s,
                    ms_per_round=[median_s * 1e3] * 2)
        return {"stats": {"median": median_s}, "extra_info": info}

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"datetime": "2026-11-26", "commit_info": {"id": "abc"}, "benchmarks": [
        row("fastpatch", 2.0, upstream_loop_ms_per_round=[5000.0, 6000.0], max_rel_error_vs_upstream_loop=3e-6,
            error_baseline="upstream_loop"),
        row("eager", 8.0, eager_ms_per_round=[8000.0, 8000.0], max_rel_error_vs_eager=0.0),
        row("upstream_loop", 6.0, eager_ms_per_round=[9000.0, 9000.0], max_rel_error_vs_eager=2e-6),
    ]}))
    subprocess.run([sys.executable, "-m", "bench.report", str(results), "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    lines = (tmp_path / "report.md").read_text().splitlines()
    table = lines[lines.index("## Scene inference (pairs/s)"):]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table if line.startswith("| scene4")]
    # provider, images, pairs, batch, pairs/s, x vs upstream loop (5.5 / 2), x vs eager (9 / 6), error (vs baseline)
    assert [r[1:] for r in rows] == [
        ["eager", "4", "12", "2", "1.500", "", "1.00", "0.0e+00 (vs eager)"],
        ["upstream_loop", "4", "12", "2", "2.000", "", "1.50", "2.0e-06 (vs eager)"],
        ["fastpatch", "4", "12", "2", "6.000", "2.75", "", "3.0e-06 (vs upstream_loop)"],
    ]
    [main_row] = [line for line in lines[:lines.index("## Scene inference (pairs/s)")] if "| fastpatch |" in line]
    assert "3.0e-06 (vs upstream_loop)" in main_row
