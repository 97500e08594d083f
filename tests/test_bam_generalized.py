"""BAM's generalized setting (base + novel classes together): episodes, fusion rule, per-class accounting."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from svfseg.data import generate_synthetic
from svfseg.data.generalized import build_generalized_dataset
from svfseg.engine.tasks.generalized import evaluate_generalized
from svfseg.models.heads.bam import BAMParts, generalized_prediction


NB = 15  # synthetic fold 0: 15 base classes (6..20), novel 1..5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = generate_synthetic(tmp_path_factory.mktemp("gsyn") / "s", seed=2, n_train=4, n_val=60, size=64, workers=1)
    return build_generalized_dataset(root=root, benchmark="synthetic", fold=0, shot=1, seed=3, test_size=64)


def test_generalized_episodes_follow_bam_rules(dataset):
    index, eps = dataset.index, dataset.episodes
    pos = index.position()
    assert len(eps) == sum(1 for r in index.records if r.counts)  # every labelled val image once
    for ep in eps:
        counts = index.records[pos[ep.query]].counts
        assert ep.class_id in range(1, 6)
        if not set(counts) & set(range(6, 21)):
            assert ep.class_id in counts  # no base class: one of the novel classes it shows
        assert ep.query not in ep.supports and all(ep.class_id in index.records[pos[s]].counts for s in ep.supports)
    item = dataset[0]
    lbl = item["query_label_orig"]
    assert set(lbl.unique().tolist()) <= set(range(NB + 2)) | {255}
    assert item["support_masks"].eq(1).any()


def test_fusion_rule_by_hand():
    final = torch.tensor([[[[0.0, 0.0]], [[5.0, 0.5]]]])  # fg prob: 0.993 (novel), 0.62 (not sure)
    base = torch.zeros(1, NB + 1, 1, 2)
    base[0, 3, 0, 1] = 4.0
    assert generalized_prediction(final, base, tau=0.9).tolist() == [[[NB + 1, 3]]]
    assert generalized_prediction(final, base, tau=0.5).tolist() == [[[NB + 1, NB + 1]]]


class Oracle(nn.Module):
    """Predicts each episode's labels from the dataset (in episode order): base map and novel map."""

    def __init__(self, dataset, see_novel=True):
        super().__init__()
        self.labels = [dataset[i]["query_label_orig"] for i in range(len(dataset))]
        self.see_novel, self.calls = see_novel, 0

    # BAM's own fusion rule, as the model exposes it to the generalized evaluation.
    generalized_prediction = staticmethod(generalized_prediction)

    def forward_parts(self, q, s, m, class_ids=None):
        lbl = self.labels[self.calls]
        self.calls += 1
        full = torch.zeros(1, *q.shape[-2:], dtype=torch.long)
        full[0, : lbl.shape[0], : lbl.shape[1]] = torch.where(lbl == 255, 0, lbl)
        base = nn.functional.one_hot(torch.where(full <= NB, full, 0), NB + 1).permute(0, 3, 1, 2).float() * 10
        novel = (full == NB + 1).float() * 10 if self.see_novel else torch.zeros_like(full, dtype=torch.float)
        final = torch.stack([torch.zeros_like(novel), novel], 1)
        return BAMParts(final=final, meta=final, base=base, base_map=base[:, 1:].sum(1, keepdim=True),
                        psi=torch.zeros(1), shot_weights=torch.ones(1, 1))


def test_per_class_accounting_with_oracles(dataset):
    r = evaluate_generalized(Oracle(dataset), dataset, device=torch.device("cpu"))
    assert r["episodes"] == len(dataset)
    seen = [v for v in r["per_class"].values() if not math.isnan(v)]
    assert seen and all(v == pytest.approx(1.0) for v in seen)
    assert r["miou_novel"] == pytest.approx(1.0) and r["miou_total"] == pytest.approx(1.0)
    blind = evaluate_generalized(Oracle(dataset, see_novel=False), dataset, device=torch.device("cpu"))
    assert blind["miou_base"] == pytest.approx(1.0)  # base classes still perfect
    assert blind["miou_novel"] == 0.0  # every novel class that occurred was missed
