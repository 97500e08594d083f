"""`svfseg prepare`: VOC+SBD, COCO 2014 or plain folders -> a Pascal-layout root (images, class-id PNGs, lists).

Every output is first written to a temporary folder beside ``--out`` and renamed into place only
when complete, so an interrupted or failed run leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from svfseg.data.sources import coco as coco_src
from svfseg.data.sources import voc as voc_src
from svfseg.data.check import check_dataset
from svfseg.data.index import load_class_index
from svfseg.data.io import (DataError, atomic_dir, list_record, read_list, write_label, write_list,
                             write_list_sources, wxh)
from svfseg.data.splits import num_classes

__all__ = ["prepare_pascal", "prepare_coco", "check_dataset", "add_prepare_arguments", "run_prepare"]

log = logging.getLogger(__name__)
LABEL_DIR = "SegmentationClassAug"


def _workers(workers: int | None) -> int:
    return min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)


def _run_jobs(fn, jobs, workers: int, desc: str):
    bar = dict(total=len(jobs), desc=desc, unit="img")
    if workers > 1 and len(jobs) >= 64:
        with multiprocessing.get_context().Pool(workers) as pool:
            return list(tqdm(pool.imap(fn, jobs, chunksize=16), **bar))
    return [fn(j) for j in tqdm(jobs, **bar)]


def _place_images(src: Path, dst: Path, names: list[str], copy: bool) -> None:
    """Link the source image folder (default) or copy the listed images."""
    if not copy:
        dst.symlink_to(src.resolve(), target_is_directory=True)
        return
    dst.mkdir()
    for n in tqdm(names, desc=f"copying {dst.name}", unit="img"):
        s = src / n
        if not s.is_file():
            raise DataError(f"{s}: expected an image, found no file")
        shutil.copy2(s, dst / n)


def _pascal_label_job(args) -> str | None:
    voc, sbd, image_id, out = args
    try:
        label = voc_src.voc_or_sbd_label(Path(voc), Path(sbd) if sbd else None, image_id)
        img = Path(voc) / "JPEGImages" / f"{image_id}.jpg"
        with Image.open(img) as im:
            w, h = im.size
        if label.shape != (h, w):
            return f"{image_id}: label {wxh(label.shape)} differs from image {img} {w}x{h} (width x height)"
        write_label(Path(out) / f"{image_id}.png", label)
    except (DataError, OSError) as e:
        return str(e)
    return None


def _warn_count(what: str, found: int, expected: int | None) -> None:
    if expected is None or found == expected:
        log.info("%s: %d images", what, found)
    else:
        log.warning("%s: %d images, the standard list has %d", what, found, expected)


def _ids_from_list(path: Path) -> list[str]:
    ids = []
    for img, lbl in read_list(path):
        stem = Path(img).stem
        if img != f"JPEGImages/{stem}.jpg" or lbl != f"{LABEL_DIR}/{stem}.png":
            raise DataError(f"{path}: expected lines 'JPEGImages/<id>.jpg {LABEL_DIR}/<id>.png' (PFENet/BAM), "
                            f"found '{img} {lbl}'")
        ids.append(stem)
    return ids


def prepare_pascal(voc, sbd, out, *, sbd_val: bool = False, train_list=None, val_list=None,
                   copy_images: bool = False, workers: int | None = None) -> Path:
    """Build a Pascal-5i root from VOC2012 and SBD.

    Labels: VOC ``SegmentationClass`` PNG (palette indices, 255 boundaries kept) when present, else
    the SBD ``GTcls.Segmentation``. Lists: see :func:`svfseg.data.sources.voc.pascal_lists`, or the given
    PFENet/BAM list files taken as they are.

    Args:
        voc: VOC2012 (or VOCdevkit) folder. sbd: SBD folder, or None for VOC-only lists.
        out: output root (must not exist).
        sbd_val: also train on SBD val (the 10,582-image "trainaug" list).
        train_list, val_list: existing list files to use instead.
        copy_images: copy images instead of linking the JPEGImages folder.
        workers: processes.

    Returns:
        The output root.
    """
    voc = voc_src.find_voc(voc)
    sbd = voc_src.find_sbd(sbd) if sbd else None
    train, val, kind = voc_src.pascal_lists(voc, sbd, sbd_val=sbd_val)
    sources = {}
    if train_list is not None:
        train, kind = _ids_from_list(Path(train_list)), "given"
        sources["train"] = list_record(train_list, len(train))
    if val_list is not None:
        val = _ids_from_list(Path(val_list))
        sources["val"] = list_record(val_list, len(val))
    _warn_count("val list", len(val), voc_src.KNOWN_COUNTS["val"])
    _warn_count(f"train list ({kind})", len(train), voc_src.KNOWN_COUNTS.get(kind))
    ids = sorted(set(train) | set(val))
    with atomic_dir(out) as tmp:
        (tmp / LABEL_DIR).mkdir()
        jobs = [(str(voc), str(sbd) if sbd else None, i, str(tmp / LABEL_DIR)) for i in ids]
        errors = [e for e in _run_jobs(_pascal_label_job, jobs, _workers(workers), "writing labels") if e]
        if errors:
            raise DataError(f"{len(errors)} label(s) could not be made:\n  " + "\n  ".join(errors[:20]))
        _place_images(voc / "JPEGImages", tmp / "JPEGImages", [f"{i}.jpg" for i in ids], copy_images)
        for split, lst in (("train", train), ("val", val)):
            write_list(tmp / f"{split}.txt", [(f"JPEGImages/{i}.jpg", f"{LABEL_DIR}/{i}.png") for i in lst])
            load_class_index(tmp, split, num_classes("pascal"), workers=workers, cache_as=out)
        write_list_sources(tmp, sources)
    log.info("wrote %s", out)
    return Path(out)


def _coco_label_job(args) -> str | None:
    image, anns, cat_map, path = args
    try:
        write_label(path, coco_src.coco_mask(image, anns, cat_map))
    except (DataError, OSError, ValueError, KeyError, TypeError) as e:
        return f"{image.get('file_name')}: {e}"
    return None


def _coco_images_in_list(path: Path, images: list[dict], ann: Path) -> list[dict]:
    """The images of a PFENet/BAM COCO list file (``<folder>/<file name> <label path>`` per line), in its order."""
    by_name = {im["file_name"]: im for im in images}
    out = []
    for entry, (img, _) in enumerate(read_list(path), 1):
        name = Path(img).name
        if name not in by_name:
            raise DataError(f"{path}: entry {entry}: expected an image of {ann.name}, found {img!r} (is the list "
                            f"for the other split?)")
        out.append(by_name[name])
    return out


def prepare_coco(coco, out, *, train_list=None, val_list=None, copy_images: bool = False,
                 workers: int | None = None) -> Path:
    """Build a COCO-20i root from COCO 2014 (``train2014/``, ``val2014/``, ``annotations/instances_*2014.json``).

    Every image of the json is listed (also those without annotations), sorted by file name; or, with
    ``train_list`` / ``val_list`` (PFENet's and BAM's ``lists/coco/*_data_list.txt``), the images of that
    file in its order, so that the upstream test protocols walk the same queries in the same order
    (``list_sources.json`` in the root records the file). Ids are contiguous 1..80 in category-id order;
    overlaps and ``iscrowd`` are resolved as :mod:`svfseg.data.sources.coco` documents.
    """
    coco = Path(coco)
    given = {"train": train_list, "val": val_list}
    sources = {}
    with atomic_dir(out) as tmp:
        (tmp / LABEL_DIR).mkdir()
        for split in ("train", "val"):
            folder = f"{split}2014"
            ann = coco / "annotations" / f"instances_{folder}.json"
            if not (coco / folder).is_dir():
                raise DataError(f"{coco / folder}: expected the COCO {folder} image folder, found none")
            images, anns, cat_map = coco_src.load_coco_annotations(ann)
            if len(cat_map) != num_classes("coco"):
                raise DataError(f"{ann}: expected 80 categories, found {len(cat_map)}")
            if given[split] is not None:
                images = _coco_images_in_list(Path(given[split]), images, ann)
                sources[split] = list_record(given[split], len(images))
            jobs = [(im, anns.get(im["id"], []), cat_map, str(tmp / LABEL_DIR / f"{Path(im['file_name']).stem}.png"))
                    for im in images]
            errors = [e for e in _run_jobs(_coco_label_job, jobs, _workers(workers), f"{split} masks") if e]
            if errors:
                raise DataError(f"{ann}: {len(errors)} mask(s) could not be made:\n  " + "\n  ".join(errors[:20]))
            _place_images(coco / folder, tmp / folder, [im["file_name"] for im in images], copy_images)
            write_list(tmp / f"{split}.txt", [(f"{folder}/{im['file_name']}",
                                               f"{LABEL_DIR}/{Path(im['file_name']).stem}.png") for im in images])
            _warn_count(f"{split} list", len(images), None if given[split] else coco_src.KNOWN_COUNTS[split])
            load_class_index(tmp, split, num_classes("coco"), workers=workers, cache_as=out)
        write_list_sources(tmp, sources)
    log.info("wrote %s", out)
    return Path(out)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``svfseg prepare`` arguments to ``parser``."""
    parser.add_argument("benchmark", choices=("pascal", "coco", "synthetic", "custom"),
                        help="dataset to prepare or check (custom: your own folders of images and masks)")
    parser.add_argument("--out", type=Path, help="output root (must not exist; written atomically)")
    parser.add_argument("--check", type=Path, metavar="ROOT",
                        help="validate an existing root instead and report every problem")
    parser.add_argument("--voc", type=Path, help="pascal: VOC2012 (or VOCdevkit) folder")
    parser.add_argument("--sbd", type=Path, help="pascal: SBD folder (dataset/cls/*.mat, train.txt, val.txt)")
    parser.add_argument("--sbd-val", action="store_true", help="pascal: also train on SBD val (trainaug list)")
    parser.add_argument("--train-list", type=Path,
                        help="pascal/coco: use this PFENet/BAM train list as it is (its images, in its order)")
    parser.add_argument("--val-list", type=Path,
                        help="pascal/coco: use this PFENet/BAM val list as it is (its images, in its order: "
                             "--protocol bam/pfenet then walk upstream's queries in upstream's order)")
    parser.add_argument("--coco", type=Path, help="coco: folder with train2014/, val2014/, annotations/")
    parser.add_argument("--copy-images", action="store_true", help="copy images instead of linking the folder")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores, at most 8)")
    parser.add_argument("--images", type=Path, help="custom: folder of images")
    parser.add_argument("--masks", type=Path,
                        help="custom: folder of <image name>.png masks (0 background, 1..C classes, 255 ignore)")
    parser.add_argument("--class-names", type=Path, help="custom: text file, one class name per line (id 1 first)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="custom: share of images in val.txt")
    parser.add_argument("--folds", type=int, help="custom: fold count (consecutive class blocks; default min(4, C))")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: generator seed; custom: train/val split seed")
    parser.add_argument("--size", type=int, default=160, help="synthetic: longer image side")
    parser.add_argument("--n-train", type=int, default=2000, help="synthetic: training images")
    parser.add_argument("--n-val", type=int, default=500, help="synthetic: validation images")
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``svfseg prepare``; returns the exit status (0 ok, 1 data problems, 2 usage error)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.check is not None:
            notes: list[str] = []
            problems = check_dataset(args.check, args.benchmark, workers=args.workers, notes=notes)
            for n in notes:
                log.warning("%s", n)
            for p in problems:
                log.error("%s", p)
            log.info("%s: %s", args.check, f"{len(problems)} problem(s)" if problems else "no problems found")
            return 1 if problems else 0
        if args.out is None:
            log.error("prepare %s: --out is required (or --check ROOT)", args.benchmark)
            return 2
        if args.benchmark == "pascal":
            if args.voc is None:
                log.error("prepare pascal: --voc is required (and usually --sbd)")
                return 2
            prepare_pascal(args.voc, args.sbd, args.out, sbd_val=args.sbd_val, train_list=args.train_list,
                           val_list=args.val_list, copy_images=args.copy_images, workers=args.workers)
        elif args.benchmark == "coco":
            if args.coco is None:
                log.error("prepare coco: --coco is required")
                return 2
            prepare_coco(args.coco, args.out, train_list=args.train_list, val_list=args.val_list,
                         copy_images=args.copy_images, workers=args.workers)
        elif args.benchmark == "custom":
            if args.images is None or args.masks is None:
                log.error("prepare custom: --images DIR and --masks DIR are required")
                return 2
            from svfseg.data.custom import prepare_custom

            prepare_custom(args.images, args.masks, args.out, class_names=args.class_names,
                           val_fraction=args.val_fraction, folds=args.folds, seed=args.seed,
                           copy_images=args.copy_images, workers=args.workers)
        else:
            from svfseg.data.synthetic import generate_synthetic

            generate_synthetic(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, size=args.size,
                               workers=args.workers)
            load_class_index(args.out, "train", num_classes("synthetic"), workers=args.workers)  # warm the cache
            load_class_index(args.out, "val", num_classes("synthetic"), workers=args.workers)
    except DataError as e:
        log.error("%s", e)
        return 1
    return 0
