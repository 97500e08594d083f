"""Few-shot heads; importing this package registers them ("baseline", "pfenet", "bam_base", "bam")."""

from svfseg.models.heads.bam import BAM
from svfseg.models.heads.baseline import ASPPBaseline, ASPPMetaLearner
from svfseg.models.heads.pfenet import PFENet
from svfseg.models.heads.pspnet import PSPNet

__all__ = ["ASPPBaseline", "ASPPMetaLearner", "BAM", "PFENet", "PSPNet"]
