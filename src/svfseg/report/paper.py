"""The SVF paper's reported mIoU (%) (Sun et al., NeurIPS 2022), for `svfseg report` to print beside ours.

Means over the 4 folds; † (the BAM data protocol: training images with a test-fold class
removed) for every row except the original PFENet paper's. Per-fold numbers exist only where the
paper gives them.
"""
from __future__ import annotations

from typing import Optional

# (benchmark, backbone, method, svf) -> {"1shot": mean, "5shot": mean, "folds_1shot": (f0, f1, f2, f3)}
PAPER: dict[tuple[str, str, str, bool], dict] = {
    ("pascal", "vgg16", "baseline", False): {"1shot": 60.15, "5shot": 65.44},
    ("pascal", "vgg16", "baseline", True): {"1shot": 62.89, "5shot": 68.34},
    ("pascal", "vgg16", "pfenet", False): {"1shot": 63.35, "5shot": 69.36},
    ("pascal", "vgg16", "pfenet", True): {"1shot": 64.33, "5shot": 69.80},
    ("pascal", "vgg16", "bam", False): {"1shot": 64.41, "5shot": 68.76},
    ("pascal", "vgg16", "bam", True): {"1shot": 64.87, "5shot": 69.11},
    ("pascal", "resnet50", "baseline", False): {"1shot": 65.07, "5shot": 69.41},
    ("pascal", "resnet50", "baseline", True): {"1shot": 67.14, "5shot": 71.42},
    ("pascal", "resnet50", "pfenet", False): {"1shot": 66.35, "5shot": 71.20},
    ("pascal", "resnet50", "pfenet", True): {"1shot": 68.15, "5shot": 71.82,
                                             "folds_1shot": (69.27, 73.55, 67.49, 62.30)},
    ("pascal", "resnet50", "bam", False): {"1shot": 67.81, "5shot": 70.91},
    ("pascal", "resnet50", "bam", True): {"1shot": 68.95, "5shot": 72.28,
                                          "folds_1shot": (69.38, 74.51, 68.80, 63.09)},
    ("coco", "vgg16", "baseline", False): {"1shot": 37.43, "5shot": 45.81},
    ("coco", "vgg16", "baseline", True): {"1shot": 38.26, "5shot": 47.16},
    ("coco", "vgg16", "pfenet", False): {"1shot": 41.97, "5shot": 48.36},
    ("coco", "vgg16", "pfenet", True): {"1shot": 42.24, "5shot": 49.49},
    ("coco", "vgg16", "bam", False): {"1shot": 43.50, "5shot": 49.34},
    ("coco", "vgg16", "bam", True): {"1shot": 43.76, "5shot": 49.07},
    ("coco", "resnet50", "baseline", False): {"1shot": 41.84, "5shot": 51.93},
    ("coco", "resnet50", "baseline", True): {"1shot": 43.72, "5shot": 52.89},
    ("coco", "resnet50", "pfenet", False): {"1shot": 46.05, "5shot": 54.17},
    ("coco", "resnet50", "pfenet", True): {"1shot": 48.02, "5shot": 54.38},
    ("coco", "resnet50", "bam", False): {"1shot": 46.23, "5shot": 51.16},
    ("coco", "resnet50", "bam", True): {"1shot": 48.47, "5shot": 53.87},
}

def paper_backbone(name: str) -> str:
    """Our backbone name -> the paper's family ("resnet50_deep" -> "resnet50", "vgg16_bn" -> "vgg16")."""
    for family in ("resnet101", "resnet50", "vgg16", "efficientnet_lite0"):
        if name.startswith(family):
            return family
    return name


def paper_result(benchmark: str, backbone: str, method: str, svf: bool, shot: int,
                 fold: Optional[int] = None) -> Optional[float]:
    """The paper's mIoU (%) for a setting (a fold's value where reported, else the 4-fold mean), or None."""
    row = PAPER.get((benchmark, paper_backbone(backbone), method, bool(svf)))
    if row is None:
        return None
    if fold is not None:
        folds = row.get(f"folds_{shot}shot")
        return None if folds is None else folds[fold]
    return row.get(f"{shot}shot")
