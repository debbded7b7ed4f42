"""Foreign checkpoints -> our timm-keyed models.

    from sapiens_lite.convert import build_model, read_checkpoint
    conv = read_checkpoint("sapiens_0.3b_epoch_1600_clean.pth")   # or a transformers folder, or "org/name"
    backbone = build_model(conv, img_size=(1024, 768), cls_token=False)

`read.py` reads files, transformers-style folders and Hub repos (and their config.json); `core.py`
holds the table of sources, `convert_state_dict` and the model builders; one file per source holds
its key map. `safe_load.py` reads `.pth` files without executing pickled code.
"""

from sapiens_lite.convert.common import CheckpointKeyError, Converted, HeadHints, Hints
from sapiens_lite.convert.core import (
    SOURCES,
    adapt_to,
    build_backbone,
    build_model,
    build_pose_model,
    check_fits,
    convert_state_dict,
    detect_source,
    unwrap,
)
from sapiens_lite.convert.read import is_foreign_folder, read_checkpoint
from sapiens_lite.convert.safe_load import load_checkpoint_file

__all__ = [
    "SOURCES",
    "CheckpointKeyError",
    "Converted",
    "HeadHints",
    "Hints",
    "adapt_to",
    "build_backbone",
    "build_model",
    "build_pose_model",
    "check_fits",
    "convert_state_dict",
    "detect_source",
    "is_foreign_folder",
    "load_checkpoint_file",
    "read_checkpoint",
    "unwrap",
]
