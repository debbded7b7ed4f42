"""Foreign checkpoints -> our timm-keyed models.

    from sapiens_lite.convert import load_checkpoint_file, convert_state_dict, build_backbone
    conv = convert_state_dict(load_checkpoint_file("sapiens_0.3b_epoch_1600_clean.pth"))
    backbone = build_backbone(conv, img_size=(1024, 768), cls_token=False)

`core.py` holds the entry point and the table of sources; one file per source holds its key map.
`safe_load.py` reads `.pth` files without executing pickled code.
"""

from sapiens_lite.convert.common import CheckpointKeyError, Converted, Hints
from sapiens_lite.convert.core import (
    SOURCES,
    adapt_to,
    build_backbone,
    build_pose_model,
    convert_state_dict,
    detect_source,
    unwrap,
)
from sapiens_lite.convert.safe_load import load_checkpoint_file

__all__ = [
    "SOURCES",
    "CheckpointKeyError",
    "Converted",
    "Hints",
    "adapt_to",
    "build_backbone",
    "build_pose_model",
    "convert_state_dict",
    "detect_source",
    "load_checkpoint_file",
    "unwrap",
]
