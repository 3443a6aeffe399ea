"""SimCLR baseline: contrastive pretraining of a compact CNN on the normal images, then kNN on its features."""

from edgead.models.simclr.model import ContrastiveEncoder, SimClr

__all__ = ["ContrastiveEncoder", "SimClr"]
