"""PFENet's names (dvlab-research/PFENet model/PFENet.py) for svfseg's ``pfenet`` model."""
from __future__ import annotations

from svfseg.convert.keymap import BACKBONE_RULES, KeyMap

#: Besides the backbone, only the two-conv blocks differ: svfseg nests each conv + ReLU
#: (``beta_conv.i.1.0``), PFENet lists conv, ReLU, conv, ReLU in one Sequential (``beta_conv.i.2``).
#: Every other head key (down_query/down_supp, init_merge, alpha_conv, inner_cls, res1, cls) is named alike.
PFENET = KeyMap(
    format="pfenet",
    model="pfenet",
    source="dvlab-research/PFENet model/PFENet.py",
    rules=BACKBONE_RULES + (
        (r"(beta_conv\.\d+|res2)\.0\.0\.(.+)", r"\1.0.\2"),
        (r"(beta_conv\.\d+|res2)\.1\.0\.(.+)", r"\1.2.\2"),
    ),
)
