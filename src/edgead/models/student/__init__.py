"""Knowledge distillation into a compact student (EfficientAD family): model.py ships, train.py trains."""

from edgead.models.student.model import FeatureAutoencoder, PatchDescriptionNet, Student, TeacherStudent

__all__ = ["FeatureAutoencoder", "PatchDescriptionNet", "Student", "TeacherStudent"]
