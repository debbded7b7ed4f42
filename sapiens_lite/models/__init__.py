"""Models: the plain ViT backbone (`vit.py`) and, built on it, the pose model (`pose.py`)."""

from sapiens_lite.models.vit import ARCHS, VisionTransformer, ViTConfig, build_vit

__all__ = ["ARCHS", "ViTConfig", "VisionTransformer", "build_vit"]
