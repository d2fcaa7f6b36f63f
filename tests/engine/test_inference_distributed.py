"""fastpatch.inference under torch.distributed: 2 CPU processes over gloo against one process.

The scene is two groups of three images (portrait and landscape mixed), each group's complete
symmetrised graph: 12 pairs, so with contiguous shards rank 0's pairs use images 0-2 only and
rank 1's images 3-5 only. Every rank must return the single-process result, in order.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpatch
from modes import cpu_ci_only
from test_inference import LANDSCAPE, PORTRAIT, _count, _images, _model, assert_same_result, one_thread  # noqa: F401
from upstream import load_upstream

WORLD_SIZE = 2


def _pairs(upstream):
    images = _images([LANDSCAPE, PORTRAIT, LANDSCAPE, PORTRAIT, PORTRAIT, LANDSCAPE])
    make_pairs = upstream.image_pairs.make_pairs
    return make_pairs(images[:3], scene_graph="complete", symmetrize=True) + \
        make_pairs(images[3:], scene_graph="complete", symmetrize=True)


def _worker(rank: int, world_size: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        with load_upstream() as upstream:
            model = _model(upstream)
            pairs = _pairs(upstream)
            encoded = _count(model, "_encode_image")
            result = fastpatch.inference(pairs, model, "cpu", batch_size=2, verbose=False)
            sharded_encodes = sum(encoded)

            encoded.clear()
            alone = fastpatch.inference(pairs, model, "cpu", batch_size=2, verbose=False, distributed=False)
            alone_encodes = sum(encoded)

            try:  # ranks that disagree on the pairs must all raise, not hang or mix results
                fastpatch.inference(pairs[:len(pairs) - rank], model, "cpu", verbose=False)
                mismatch = None
            except RuntimeError as exc:
                mismatch = str(exc)
        torch.save(dict(result=result, alone=alone, sharded_encodes=sharded_encodes, alone_encodes=alone_encodes,
                        mismatch=mismatch), f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still uses it (that aborts the process)
    finally:
        dist.destroy_process_group()


@cpu_ci_only
def test_two_gloo_ranks_return_the_single_process_result(tmp_path, upstream):
    mp.spawn(_worker, args=(WORLD_SIZE, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    model = _model(upstream)
    expected = fastpatch.inference(_pairs(upstream), model, "cpu", batch_size=2, verbose=False)
    for rank in range(WORLD_SIZE):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert_same_result(out["result"], expected)
        assert_same_result(out["alone"], expected)
        assert out["sharded_encodes"] == 3  # only the images of this rank's own pairs
        assert out["alone_encodes"] == 6  # distributed=False: the whole scene on this rank
        assert "same pairs on every rank" in out["mismatch"]
