"""IoU accumulation against hand-computed values, 255 handling, FB-IoU, merging."""
import math

import pytest
import torch

from svfseg.metrics import ConfusionMatrix, IoUAccumulator, episode_counts
from svfseg.results import summarize_runs


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_episode_counts_by_hand_with_ignore():
    pred = t([[1, 1, 0],
              [0, 1, 0]])
    gt = t([[1, 0, 255],
            [1, 1, 0]])
    # valid pixels: all but (0,2). fg: pred {(0,0),(0,1),(1,1)}, gt {(0,0),(1,0),(1,1)}
    # inter_fg = 2 ((0,0),(1,1)); union_fg = 4. bg: pred {(1,0),(1,2)}, gt {(0,1),(1,2)}
    # inter_bg = 1; union_bg = 3.
    assert episode_counts(pred, gt).tolist() == [2, 4, 1, 3]


def test_ignored_pixels_never_count_even_if_predicted():
    pred = t([[1, 1]])
    gt = t([[255, 255]])
    assert episode_counts(pred, gt).tolist() == [0, 0, 0, 0]


def test_miou_sums_over_episodes_not_mean_of_episodes():
    acc = IoUAccumulator(class_ids=(1, 2))
    # class 1, episode A: inter 1, union 1 (IoU 1.0); episode B: inter 0, union 3 (IoU 0).
    acc.update(t([[1, 0, 0]]), t([[1, 0, 0]]), 1)
    acc.update(t([[1, 1, 0]]), t([[0, 0, 1]]), 1)
    # class 2: inter 1, union 2.
    acc.update(t([[1, 1]]), t([[1, 0]]), 2)
    r = acc.compute()
    assert r["per_class"][1] == pytest.approx(1 / 4)   # (1+0)/(1+3), not mean(1, 0) = 0.5
    assert r["per_class"][2] == pytest.approx(1 / 2)
    assert r["miou"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    # FB: fg inter 1+0+1 = 2, fg union 1+3+2 = 6; bg: A inter 2 union 2, B inter 0 union 3, C inter 0 union 1.
    assert r["fg_iou"] == pytest.approx(2 / 6)
    assert r["bg_iou"] == pytest.approx(2 / 6)
    assert r["fb_iou"] == pytest.approx(2 / 6)
    assert r["episodes"] == 3 and r["episodes_per_class"] == {1: 2, 2: 1}


def test_missing_class_is_nan_and_excluded_from_miou():
    acc = IoUAccumulator(class_ids=(3, 4))
    acc.update(t([[1]]), t([[1]]), 3)
    r = acc.compute()
    assert math.isnan(r["per_class"][4]) and r["missing_classes"] == [4]
    assert r["miou"] == 1.0


def test_empty_union_counts_zero_as_pfenet():
    # PFENet's test.py: iou = intersection / (union + 1e-10), so an empty union scores 0, not 1.
    acc = IoUAccumulator(class_ids=(1, 2))
    acc.update(t([[0, 0]]), t([[0, 255]]), 1)  # class 1: nothing predicted, nothing labelled
    acc.update(t([[1]]), t([[1]]), 2)
    r = acc.compute()
    assert r["per_class"] == {1: 0.0, 2: 1.0} and r["miou"] == 0.5
    only_bg = IoUAccumulator(class_ids=(1,))
    only_bg.update(t([[0, 0]]), t([[0, 0]]), 1)
    r = only_bg.compute()
    assert (r["fg_iou"], r["bg_iou"], r["fb_iou"]) == (0.0, 1.0, 0.5)
    cm = ConfusionMatrix(2)
    cm.update(t([[0, 0]]), t([[0, 0]]))
    assert cm.compute()["fb_iou"] == 0.5  # the empty foreground union counts 0 here too


def test_unknown_class_and_shape_mismatch_raise():
    acc = IoUAccumulator(class_ids=(1,))
    with pytest.raises(KeyError, match="class 7"):
        acc.update(t([[1]]), t([[1]]), 7)
    with pytest.raises(ValueError, match="shape"):
        acc.update(t([[1, 0]]), t([[1]]), 1)


def test_merge_equals_single_accumulator():
    g = torch.Generator().manual_seed(0)
    whole, a, b = (IoUAccumulator(class_ids=(1, 2, 3)) for _ in range(3))
    for i in range(10):
        pred = torch.randint(0, 2, (5, 6), generator=g)
        gt = torch.randint(0, 3, (5, 6), generator=g)
        gt[gt == 2] = 255
        cid = 1 + i % 3
        whole.update(pred, gt, cid)
        (a if i % 2 else b).update(pred, gt, cid)
    a.merge(b)
    assert torch.equal(a.as_tensor(), whole.as_tensor())
    assert a.compute() == whole.compute()


def test_summarize_runs():
    s = summarize_runs([0.5, 0.7])  # the sample std (n-1), as every results table
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.02 ** 0.5) and s["best"] == 0.7
