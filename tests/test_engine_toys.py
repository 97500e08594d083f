"""Tiny few-shot model and episode datasets for the engine tests (no test functions here)."""
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from svfseg.config import load_config
from svfseg.models.outputs import FewShotOutput


class ToyFewShot(nn.Module):
    """Query conv features compared with a masked-average support prototype; optional dropout."""

    def __init__(self, dropout: float = 0.2, nan_at_call: int = 0):
        super().__init__()
        self.backbone = nn.Conv2d(3, 6, 3, padding=1)
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Conv2d(13, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(dropout),
                                  nn.Conv2d(8, 2, 1))
        self.aux = nn.Conv2d(13, 2, 1)
        self.nan_at_call, self.calls = nan_at_call, 0

    def forward(self, q, s, sm):
        self.calls += 1
        fq = self.backbone(q)
        b, k = s.shape[:2]
        fs = self.backbone(s.flatten(0, 1)).unflatten(0, (b, k))
        m = (sm == 1).float().unsqueeze(2)
        proto = (fs * m).sum((1, 3, 4)) / m.sum((1, 3, 4)).clamp(min=1)
        sim = torch.cosine_similarity(fq, proto[..., None, None], dim=1).unsqueeze(1)
        x = torch.cat([fq, proto[..., None, None].expand_as(fq), sim], 1)
        logits = self.head(x)
        if self.nan_at_call and self.calls == self.nan_at_call:
            logits = logits * float("nan")
        if self.training:
            return FewShotOutput(logits, (self.aux(x),))
        return logits

    def parameter_groups(self):
        return [{"name": "head", "params": [p for p in self.parameters() if p.requires_grad]}]

    def describe(self):
        return {"name": "toy", "backbone": "conv3", "num_classes": 2}


def _episode(rng, size, shot):
    def mask():
        m = np.zeros((size, size), np.int64)
        y, x = rng.integers(0, size // 2, 2)
        m[y:y + size // 2, x:x + size // 2] = 1
        m[rng.random((size, size)) < 0.05] = 255
        return m

    q_mask = mask()
    q_img = (rng.normal(size=(3, size, size)) + 2 * (q_mask == 1)).astype(np.float32)
    s_masks = np.stack([mask() for _ in range(shot)])
    s_imgs = (rng.normal(size=(shot, 3, size, size)) + 2 * (s_masks == 1)[:, None]).astype(np.float32)
    return q_img, q_mask, s_imgs, s_masks


class ToyTrain(Dataset):
    """Random episodes from ``default_rng([seed, epoch, i])``."""

    def __init__(self, n=16, size=16, shot=1, seed=0):
        self.n, self.size, self.shot, self.seed, self.epoch = n, size, shot, seed, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        q, qm, s, sm = _episode(np.random.default_rng([self.seed, self.epoch, i]), self.size, self.shot)
        return {"query_img": torch.from_numpy(q), "query_mask": torch.from_numpy(qm),
                "support_imgs": torch.from_numpy(s), "support_masks": torch.from_numpy(sm),
                "class_id": 1 + i % 2, "query_name": f"q{i}", "support_names": [f"s{i}"] * self.shot}


class ToyEval(Dataset):
    """Fixed episodes with an original label size larger than the (padded) test input."""

    def __init__(self, n=10, size=16, shot=1):
        self.items = []
        for i in range(n):
            q, qm, s, sm = _episode(np.random.default_rng([99, i]), size, shot)
            h, w = size, size - 4  # valid region inside the padded input
            orig = torch.from_numpy(np.kron(qm[:h, :w], np.ones((2, 2), np.int64)))  # 2x larger original label
            self.items.append({"query_img": torch.from_numpy(q), "query_mask": torch.from_numpy(qm),
                               "support_imgs": torch.from_numpy(s), "support_masks": torch.from_numpy(sm),
                               "class_id": 1 + i % 2, "query_name": f"v{i}", "support_names": ["x"] * shot,
                               "query_label_orig": orig, "query_valid_hw": (h, w)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def toy_config(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path}", "name=toy", "device=cpu", "data.workers=0",
                              "train.epochs=3", "train.batch_size=4", "train.steps_per_epoch=4",
                              "train.progress=false", "train.tensorboard=false", "train.log_every=2",
                              "optim.lr=0.01", "optim.lr_mult={head: 10}", "model.regime=frozen", *extra])
