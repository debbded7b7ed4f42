"""sapiens_lite: run human-centric ViT models.

Models (ViT backbones, pose models and their heads), checkpoint I/O (safetensors, the Hub, foreign
checkpoints), keypoint schemes, the heatmap codec, top-down geometry, prediction and drawing. It never
imports the training packages (`sapiens_train`, `pretrain`, `finetune`) nor their heavy dependencies
(DeepSpeed, webdataset, pycocotools), so `pip install sapiens-toolkit` alone predicts and converts.

    from sapiens_lite import load_model, PoseEstimator
    model = load_model("org/repo-or-folder-or-file.pth")   # the class its config.json names
    people = PoseEstimator.from_pretrained("org/repo")("photo.jpg")   # keypoints per person
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `load_model` / `PoseEstimator` without importing torch and the models when only
    # `sapiens_lite.__version__` is wanted.
    if name == "load_model":
        from sapiens_lite.loading import load_model

        return load_model
    if name == "PoseEstimator":
        from sapiens_lite.estimator import PoseEstimator

        return PoseEstimator
    raise AttributeError(f"module 'sapiens_lite' has no attribute {name!r}")
