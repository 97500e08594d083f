"""Few-shot heads; importing this package registers them ("baseline", "pfenet")."""

from svfseg.models.heads.baseline import ASPPBaseline
from svfseg.models.heads.pfenet import PFENet
from svfseg.models.heads.pspnet import PSPNet  # noqa: E402  ("bam_base")
from svfseg.models.heads.bam import BAM  # noqa: E402  ("bam")

__all__ = ["ASPPBaseline", "PFENet"]
