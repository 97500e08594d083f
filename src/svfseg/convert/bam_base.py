"""BAM's stage-1 PSPNet names (chunbolang/BAM model/PSPNet.py, model/PPM.py) for svfseg's ``bam_base`` model."""
from __future__ import annotations

from svfseg.convert.keymap import BACKBONE_RULES, KeyMap

#: The PSPNet registers its five stages twice, as ``layerN`` and inside ``encoder`` (a Sequential of
#: the same modules), so its state dict holds every backbone tensor under both names. The PPM's
#: bins are ``ppm.features.j`` (svfseg ``ppm.stages.j``); the classifier is named alike.
BAM_BASE = KeyMap(
    format="bam_base",
    model="bam_base",
    source="chunbolang/BAM model/PSPNet.py",
    rules=BACKBONE_RULES + ((r"ppm\.stages\.(.+)", r"ppm.features.\1"),),
    aliases=((r"layer([0-4])\.(.+)", r"encoder.\1.\2"),),
)
