"""The vectorised RLE check (study.eval.strict.rle_batch_ok) against the per-RLE one (study.data.rle), which
reads strings as pycocotools' rleFrString does: on valid masks and on randomly damaged strings, the batch
says "fine" exactly when every string passes alone."""
from __future__ import annotations

import numpy as np
import pytest

from study.data.rle import RLEError, check_segmentation
from study.eval.coco_ap import encode_mask
from study.eval import strict
from study.eval.strict import rle_batch_ok


def _alone_ok(counts: str, h: int, w: int) -> bool:
    try:
        check_segmentation({"size": [h, w], "counts": counts}, h, w)
        return True
    except RLEError:
        return False


@pytest.mark.parametrize("chunk", [1 << 20, 50])  # one chunk; a chunk every few strings
def test_rle_batch_check_agrees_with_the_per_rle_check(chunk, monkeypatch):
    monkeypatch.setattr(strict, "_CHUNK_CHARS", chunk)
    rng = np.random.default_rng(0)
    h, w = 37, 53
    strings = [encode_mask(rng.random((h, w)) < p)["counts"] for p in rng.random(40)]
    hw = np.full(len(strings), h * w)
    assert rle_batch_ok(strings, hw)
    assert all(_alone_ok(s, h, w) for s in strings)
    damaged = 0
    for _ in range(300):
        batch = list(strings[:12])
        k = int(rng.integers(12))
        s = batch[k]
        i = int(rng.integers(len(s)))
        op = rng.integers(4)
        batch[k] = (s[:i] + s[i + 1:] if op == 0 else s[:i] + chr(int(rng.integers(40, 120))) + s[i + 1:]
                    if op == 1 else s + chr(int(rng.integers(48, 112))) if op == 2 else s[:i])
        alone = all(_alone_ok(b, h, w) for b in batch)
        assert rle_batch_ok(batch, hw[:12]) == alone, (k, op, s, batch[k])
        damaged += not alone
    assert damaged > 200  # the damage is real most of the time
