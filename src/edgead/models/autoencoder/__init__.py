"""Convolutional autoencoder baseline: reconstruct normal images, score the reconstruction error."""

from edgead.models.autoencoder.model import ConvAutoencoder, Reconstruction, ReconstructionError

__all__ = ["ConvAutoencoder", "Reconstruction", "ReconstructionError"]
