"""Validate a whole Pascal-layout dataset root and report every problem (the `prepare --check` pass)."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from tqdm import tqdm

from svfseg.data.benchmark import Benchmark
from svfseg.data.index import _scan_one
from svfseg.data.io import DataError, decoder_complaints, exif_orientation, read_image

__all__ = ["check_dataset"]

SPLITS = ("train", "val")


def _parse_lines(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    pairs, problems, seen = [], [], {}
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        f = line.split()
        if not f:
            continue
        if len(f) != 2:
            problems.append(f"{path}:{lineno}: expected '<image> <label>' (2 fields), found {len(f)}: {line!r}")
        elif f[0] in seen:
            problems.append(f"{path}:{lineno}: image {f[0]} already listed at line {seen[f[0]]}")
        else:
            seen[f[0]] = lineno
            pairs.append((f[0], f[1]))
    if not pairs and not problems:
        problems.append(f"{path}: expected '<image> <label>' lines, found an empty list")
    return pairs, problems


def _check_one(args):
    hw, counts, problems = _scan_one(args)
    root, img_rel = args[0], args[1]
    img = Path(root) / img_rel
    rotated = False
    if img.is_file():
        try:
            read_image(img)  # full decode by the reader training uses: truncated, too large, undecodable
            said = decoder_complaints(img)  # damage inside a complete file (a zeroed block)
            if said:
                problems.append(f"{img}: expected a decodable image, found damaged data (decoder: {said[:160]})")
            rotated = exif_orientation(img) != 1
        except DataError as e:
            problems.append(str(e))  # it names the file, what was expected and what was found
        except OSError as e:
            problems.append(f"{img}: expected a decodable image, found {e}")
    return counts, problems, rotated


def _empty_class_problems(bench: Benchmark, split: str, records, min_pixels: int) -> list[str]:
    out, meta = [], bench.classes
    for fold in range(bench.num_folds):
        sp = bench.split(fold)
        if split == "train":
            kept = [c for c in records if not any(k in sp.novel for k in c)]
            classes, what = sp.base, "base class in the † training pool"
        else:
            kept, classes, what = records, sp.novel, "novel class in val"
        for c in classes:
            n = sum(1 for cnt in kept if cnt.get(c, 0) >= min_pixels)
            if n < 2:
                name = f" ({meta.names[c - 1]})" if meta is not None else ""
                out.append(f"{split} fold {fold}: {what} {c}{name} has {n} image(s) with >= {min_pixels} px "
                           f"(data.min_pixels); episodes need at least 2")
    return out


def check_dataset(root, benchmark: str, *, convention: str = "interleaved", min_pixels: int | None = None,
                  workers: int | None = None, progress: bool = True, notes: list[str] | None = None) -> list[str]:
    """Check every list line, image and label of ``root`` and report all problems (empty list = valid).

    Checks: list files present and well formed; every image present and fully decodable (not
    truncated); every label present, single-channel, of its image's size, with values in
    0..num_classes or 255; every class of every fold keeps >= 2 images after filtering; for
    ``benchmark="custom"``, a valid ``dataset.yaml``. Images with an EXIF rotation are listed in
    ``notes`` (they are read rotated, as shown; their labels must match the rotated image).
    """
    from svfseg.data.build import benchmark_min_pixels

    root = Path(root)
    if not root.is_dir():
        return [f"{root}: expected a dataset root folder, found none"]
    try:
        bench = Benchmark.resolve(benchmark, root, convention)
    except DataError as e:
        return [str(e)]
    n_cls = bench.num_classes
    if min_pixels is None:
        try:
            min_pixels = benchmark_min_pixels(bench)
        except DataError as e:
            return [str(e)]
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    problems: list[str] = []
    for split in SPLITS:
        lf = next((p for p in (root / f"{split}.txt", root / "lists" / f"{split}.txt") if p.is_file()), None)
        if lf is None:
            problems.append(f"{root}: expected a list file {split}.txt, found none")
            continue
        pairs, probs = _parse_lines(lf)
        problems += probs
        jobs = [(str(root), a, b, n_cls) for a, b in pairs]
        bar = dict(total=len(jobs), desc=f"checking {split}", unit="img", disable=not progress, delay=1.0)
        if workers > 1 and len(jobs) >= 256:
            with multiprocessing.get_context().Pool(workers) as pool:
                results = list(tqdm(pool.imap(_check_one, jobs, chunksize=32), **bar))
        else:
            results = [_check_one(j) for j in tqdm(jobs, **bar)]
        for _, probs, _ in results:
            problems += probs
        rotated = [a for (a, _), (_, _, r) in zip(pairs, results) if r]
        if rotated and notes is not None:
            notes.append(f"{lf}: {len(rotated)} image(s) carry an EXIF rotation, e.g. {rotated[:3]}; every command "
                         f"reads them rotated as they are shown (labels never rotate), so their labels must be "
                         f"drawn on the rotated image")
        problems += _empty_class_problems(bench, split, [c for c, _, _ in results], min_pixels)
    return problems
