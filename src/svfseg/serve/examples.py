"""One-click examples for the page: a support and a query of one novel class, taken from a checkpoint's own data."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

MIN_FRACTION = 0.02  # the object covers at least 2% of the image: a visible example, not a sliver
SCAN = 200  # label files read per data root at most (startup stays fast on a full Pascal root)


@dataclass(frozen=True)
class Example:
    """A support image with its 0/255 mask, and a query with its ground truth, as files in the server's folder."""

    label: str
    support: Path
    support_mask: Path
    query: Path
    ground_truth: Path


def _novel_and_names(checkpoint: str):
    from svfseg.engine.resolved import resolve_benchmark
    from svfseg.engine.model import checkpoint_config

    cfg = checkpoint_config(checkpoint)
    bench = resolve_benchmark(cfg)
    return cfg, list(bench.split(cfg.fold).novel), bench.class_names


def _write_mask(fg: np.ndarray, path: Path) -> Path:
    Image.fromarray(fg.astype(np.uint8) * 255, mode="L").save(path)
    return path


def examples_for(checkpoint: str, out_dir: Path, *, count: int = 3) -> list[Example]:
    """Up to ``count`` examples, one per novel class of the checkpoint's fold, from its data root's val split.

    Each pairs the first two val images where the class covers at least :data:`MIN_FRACTION` of
    the pixels. The data root is the one in the checkpoint's config (relative to the working
    folder, as `svfseg train` stored it); none when it is not there.
    """
    from svfseg.data.io import list_path, read_label, read_list

    cfg, novel, names = _novel_and_names(checkpoint)
    root = Path(cfg.data.root)
    if not root.is_dir():
        return []
    found: dict[int, list[tuple[Path, np.ndarray]]] = {c: [] for c in novel}
    for img_rel, lab_rel in read_list(list_path(root, "val"))[:SCAN]:
        label = read_label(root / lab_rel)
        for c in novel:
            fg = label == c
            if len(found[c]) < 2 and fg.mean() >= MIN_FRACTION:
                found[c].append((root / img_rel, fg))
        if sum(len(v) == 2 for v in found.values()) >= count:
            break
    out = []
    for c in novel:
        if len(found[c]) < 2 or len(out) >= count:
            continue
        (s_img, s_fg), (q_img, q_fg) = found[c]
        folder = out_dir / f"{cfg.data.benchmark}-fold{cfg.fold}-class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        support = folder / f"support{s_img.suffix}"
        query = folder / f"query{q_img.suffix}"
        shutil.copyfile(s_img, support)
        shutil.copyfile(q_img, query)
        out.append(Example(f"{names[c - 1]} ({root.name}, fold {cfg.fold})", support,
                           _write_mask(s_fg, folder / "support_mask.png"), query,
                           _write_mask(q_fg, folder / "query_mask.png")))
    return out


def demo_examples(checkpoints: Sequence[str], out_dir: Path, *, count: int = 3) -> list[Example]:
    """Examples from the data of the served checkpoints (each data root and fold once); [] when none is here.

    Nothing here stops the server: a root that cannot be read is one warning in the log.
    """
    from svfseg.engine.model import checkpoint_config

    out, seen = [], set()
    for ck in checkpoints:
        try:
            cfg = checkpoint_config(ck)  # which root and fold, before their classes are read
            key = (str(Path(cfg.data.root).resolve()), cfg.fold, cfg.data.benchmark)
            if key in seen:
                continue
            seen.add(key)
            out += examples_for(ck, out_dir, count=count)
        except Exception as e:  # noqa: BLE001 - examples are a convenience; the page works without them
            logger.warning("no examples from %s: %s", ck, (str(e).splitlines() or [type(e).__name__])[0])
    return out[:count]
