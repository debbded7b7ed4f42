"""Models: the plain ViT backbone (`vit.py`), dense heads on its feature map (`heads.py`) and the pose
model built from the two (`pose.py`)."""

from sapiens_lite.models.vit import ARCHS, VisionTransformer, ViTConfig, build_vit

__all__ = ["ARCHS", "ViTConfig", "VisionTransformer", "build_vit"]
