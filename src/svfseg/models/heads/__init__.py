"""Few-shot heads; importing this package registers them ("baseline", "pfenet")."""

from svfseg.models.heads.baseline import ASPPBaseline
from svfseg.models.heads.pfenet import PFENet

__all__ = ["ASPPBaseline", "PFENet"]
