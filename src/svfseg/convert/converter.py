"""An upstream PFENet / BAM checkpoint -> an svfseg model file that test, predict, serve, merge and training take."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from svfseg.convert.bam import BAM
from svfseg.convert.bam_base import BAM_BASE
from svfseg.convert.keymap import KeyMap
from svfseg.convert.pfenet import PFENET

logger = logging.getLogger(__name__)

#: ``svfseg convert --from`` -> how that upstream format names the svfseg model's tensors.
FORMATS: dict[str, KeyMap] = {k.format: k for k in (PFENET, BAM, BAM_BASE)}
#: The backbones upstream builds, and the suffix of svfseg's recipe for each (configs/<benchmark>/<model>_<suffix>.yaml).
RECIPE_SUFFIX = {"resnet50_deep": "resnet50", "resnet101_deep": "resnet101", "vgg16_bn": "vgg16"}
BENCHMARKS = ("pascal", "coco")
#: Classes of BAM's base learner (background + base classes) per benchmark (model/PSPNet.py: 16 / 61).
BASE_CLASSES = {16: "pascal", 61: "coco"}
#: Keys only one upstream format has: what a file of another format is recognised by.
SIGNATURES = {"pfenet": "alpha_conv.0.0.weight", "bam": "ASPP_meta.layer6_0.0.weight",
              "bam_base": "ppm.features.0.1.weight"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Converted:
    """What ``convert_checkpoint`` wrote."""

    out: Path
    model: str
    backbone: str
    benchmark: str
    fold: int
    shot: int
    tensors: int
    sha256: str
    inferred: tuple[str, ...]  # the settings read from the file rather than given


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def infer_backbone(state: dict) -> Optional[str]:
    """The upstream backbone a state dict holds (ResNet-50/101 with the deep stem, or VGG16-BN), None if neither."""
    if "layer1.0.conv1.weight" in state:
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("layer3.") and k.split(".")[1].isdigit()}
        return {6: "resnet50_deep", 23: "resnet101_deep"}.get(len(blocks))
    if "layer1.0.weight" in state and state["layer1.0.weight"].dim() == 4:
        return "vgg16_bn"
    return None


def infer_benchmark(fmt: str, state: dict) -> Optional[str]:
    """BAM files say their benchmark by the base learner's class count; PFENet files say nothing."""
    key = {"bam": "learner_base.1.4.weight", "bam_base": "cls.4.weight"}.get(fmt)
    return BASE_CLASSES.get(int(state[key].shape[0])) if key and key in state else None


def infer_kshot(state: dict) -> tuple[int, Optional[int]]:
    """BAM's K and its K-shot network width from ``kshot_rw`` (absent: 1-shot)."""
    if "kshot_rw.0.weight" in state:  # Conv2d(shot, kshot_trans_dim) -> ReLU -> Conv2d(kshot_trans_dim, shot)
        dim, shot = state["kshot_rw.0.weight"].shape[:2]
        return int(shot), int(dim)
    if "kshot_rw.weight" in state:  # kshot_trans_dim 0: one Conv2d(shot, shot)
        return int(state["kshot_rw.weight"].shape[0]), 0
    return 1, None


def _settle(name: str, given, found, how: str):
    """The value of a setting: the given one, checked against what the file says; else the file's."""
    if given is not None and found is not None and given != found:
        raise ValueError(f"--{name} {given}: the file holds {how} {found}; drop --{name} or convert another file")
    return given if given is not None else found


def target_config(fmt: str, backbone: str, benchmark: str, fold: int, shot: int, head: dict):
    """The config of the converted model: svfseg's recipe for (model, backbone, benchmark), frozen backbone."""
    from svfseg.config import load_config

    recipe = CONFIGS / benchmark / f"{FORMATS[fmt].model}_{RECIPE_SUFFIX[backbone]}.yaml"
    overrides = [f"fold={fold}", f"shot={shot}", "model.regime=frozen", "model.weights=null",
                 *(f"model.head.{k}={v}" for k, v in head.items())]
    return load_config(recipe, overrides)


def convert_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, *, backbone: Optional[str] = None,
                       benchmark: Optional[str] = None, fold: int = 0, shot: Optional[int] = None,
                       overwrite: bool = False) -> Converted:
    """Convert an upstream checkpoint (PFENet, BAM stage 2 or BAM's stage-1 PSPNet) into an svfseg model file.

    The file is a merged export (the plain architecture, ``engine.model.MERGED_FORMAT``) with a
    ``converted_from`` record: the source file's name, sha256 and upstream format.

    Args:
        checkpoint: The upstream ``.pth`` (``{"state_dict": ...}``, a ``module.`` prefix is removed).
        fmt: ``pfenet`` | ``bam`` | ``bam_base``.
        out: The svfseg file to write (atomically).
        backbone: ``resnet50_deep`` | ``resnet101_deep`` | ``vgg16_bn``; None: read from the file's keys.
        benchmark: ``pascal`` | ``coco``; None: BAM's class count, else pascal.
        fold: The fold the file was trained for (upstream files do not record it).
        shot: K; None: BAM's ``kshot_rw``, else 1 (PFENet's weights serve any K).
        overwrite: Replace an existing ``out``.

    Raises:
        ValueError / CheckpointError: a damaged or foreign file, or settings it contradicts (one line).
        CheckpointMismatch: keys missing, unexpected or of another shape (one line listing them).
    """
    from svfseg.config import to_dict
    from svfseg.engine import checkpoint as ckpt
    from svfseg.engine.model import MERGED_FORMAT, build_model, describe
    from svfseg.engine.resolved import resolve_run
    from svfseg.models.backbones.weights import read_state_dict

    if fmt not in FORMATS:
        raise ValueError(f"convert: --from must be one of {sorted(FORMATS)}, found {fmt!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and (not overwrite or out.resolve() == checkpoint.resolve()):
        raise FileExistsError(f"convert: --out {out} exists; choose another file"
                              + ("" if out.resolve() == checkpoint.resolve() else " or pass --overwrite"))
    state = read_state_dict(checkpoint)
    keymap = FORMATS[fmt]
    other = [f for f, key in SIGNATURES.items() if key in state and f != fmt]
    if other and SIGNATURES[fmt] not in state:
        raise ValueError(f"{checkpoint}: expected a {fmt} checkpoint ({keymap.source}), found the keys of a "
                         f"{other[0]} checkpoint; convert it with --from {other[0]}")
    found_backbone = infer_backbone(state)
    if found_backbone is None and backbone is None:
        raise ValueError(f"{checkpoint}: expected the layer0..layer4 keys of a ResNet-50/101 (deep stem) or VGG16-BN "
                         f"backbone ({keymap.source}), found none (keys {sorted(state)[:5]})")
    backbone = _settle("backbone", backbone, found_backbone, "a backbone")
    if backbone not in RECIPE_SUFFIX:
        raise ValueError(f"convert: --backbone must be one of {sorted(RECIPE_SUFFIX)}, found {backbone!r}")
    benchmark = _settle("benchmark", benchmark, infer_benchmark(fmt, state), "the base classes of") or "pascal"
    if benchmark not in BENCHMARKS:
        raise ValueError(f"convert: --benchmark must be one of {list(BENCHMARKS)}, found {benchmark!r}")
    head = {}
    if fmt == "bam":
        file_shot, kshot_dim = infer_kshot(state)
        shot = _settle("shot", shot, file_shot, "the K-shot weights of K =")
        if kshot_dim is not None:
            head["kshot_dim"] = kshot_dim
    shot = 1 if shot is None else int(shot)
    cfg = target_config(fmt, backbone, benchmark, fold, shot, head)
    run = resolve_run(cfg)
    model = build_model(run, pretrained=False)
    where = f"{checkpoint} (--from {fmt}, {backbone}, {benchmark})"
    mapped = keymap.to_svfseg(state, model.state_dict(), where)
    ckpt.check_finite_weights(mapped, checkpoint)
    ckpt.load_model_state(model, mapped, checkpoint)
    digest = sha256_of(checkpoint)
    record = {"file": checkpoint.name, "sha256": digest, "format": fmt, "source": keymap.source,
              "tensors": len(state)}
    blob = {"format": MERGED_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
            "describe": describe(model, run), "converted_from": record, "source": str(checkpoint),
            "step": None}
    ckpt.save_atomic(blob, out, verify=True)
    logger.info("converted %s (%s, sha256 %s) -> %s", checkpoint, fmt, digest[:12], out)
    read = (("backbone",) if found_backbone else ()) + (("benchmark",) if infer_benchmark(fmt, state) else ()) \
        + (("shot",) if fmt == "bam" else ())
    return Converted(out, keymap.model, backbone, benchmark, fold, shot, len(mapped), digest, read)
