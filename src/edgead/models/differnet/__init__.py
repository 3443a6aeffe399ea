"""DifferNet / DifferSqueezeNet: a normalizing flow on multi-scale pooled features. model.py ships, train.py trains."""

from edgead.models.differnet.model import DifferNet, MultiScalePooled

__all__ = ["DifferNet", "MultiScalePooled"]
