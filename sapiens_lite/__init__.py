"""sapiens_lite: the torch-level core of the sapiens toolkit.

Models (ViT backbones, pose models), checkpoint I/O (safetensors, the Hub, foreign checkpoints),
keypoint schemes, the heatmap codec and inference. It never imports the training packages
(`pretrain`, `finetune`) nor their heavy dependencies (DeepSpeed, webdataset, pycocotools).
"""

__version__ = "0.1.0"
