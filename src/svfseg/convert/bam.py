"""BAM's names (chunbolang/BAM model/BAM.py, model/ASPP.py, model/PPM.py) for svfseg's ``bam`` model."""
from __future__ import annotations

from svfseg.convert.keymap import BACKBONE_RULES, KeyMap

#: BAM's meta and base learners share the stage-1 backbone (``self.layer0 = PSPNet_.layer0``, ...);
#: svfseg keeps the base learner's own frozen copy (``base_learner.backbone``), which the meta
#: learner's SVF leaves untouched. The base learner's PPM and classifier are ``learner_base.0`` /
#: ``.1``; the ASPP branches are ``layer6_0`` (image pooling) to ``layer6_4``; the meta head is
#: suffixed ``_meta`` and lists its two-conv block flat (``res2_meta.2`` = svfseg ``res2.1.0``).
BAM = KeyMap(
    format="bam",
    model="bam",
    source="chunbolang/BAM model/BAM.py",
    copies=((r"base_learner\.(backbone\..+)", r"\1"),),
    rules=BACKBONE_RULES + (
        (r"base_learner\.ppm\.stages\.(.+)", r"learner_base.0.features.\1"),
        (r"base_learner\.cls\.(.+)", r"learner_base.1.\1"),
        (r"aspp\.image_pool\.(.+)", r"ASPP_meta.layer6_0.\1"),
        (r"aspp\.branches\.0\.(.+)", r"ASPP_meta.layer6_1.\1"),
        (r"aspp\.branches\.1\.(.+)", r"ASPP_meta.layer6_2.\1"),
        (r"aspp\.branches\.2\.(.+)", r"ASPP_meta.layer6_3.\1"),
        (r"aspp\.branches\.3\.(.+)", r"ASPP_meta.layer6_4.\1"),
        (r"res1\.(.+)", r"res1_meta.\1"),
        (r"res2\.0\.0\.(.+)", r"res2_meta.0.\1"),
        (r"res2\.1\.0\.(.+)", r"res2_meta.2.\1"),
        (r"cls\.(.+)", r"cls_meta.\1"),
    ),
)
