"""Top-down pose model: a plain ViT backbone and a heatmap head.

    model = PoseModel(PoseConfig(backbone=ViTConfig("sapiens_0.3b", patch_padding=2), scheme="goliath308"))
    heatmaps = model(x)                    # x [B, 3, 1024, 768] normalised -> [B, 308, 256, 192]
    heatmaps = model.predict(x)            # same, averaged with the flipped image's heatmaps (flip test)
    keypoints, scores = decode_heatmaps(heatmaps, input_size=model.config.input_size)   # sapiens_lite.codec

The heads (`HeadConfig.kind`: sapiens, vitpose, simple) live in sapiens_lite/models/heads.py.

The keypoint scheme (`PoseConfig.scheme`) is a built-in name or the path of a scheme JSON file
(sapiens_lite.keypoints). `save_pretrained` writes a file scheme's full definition into config.json
and `from_pretrained` registers it from there, so the model loads anywhere without the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from sapiens_lite.codec import flip_heatmaps
from sapiens_lite.errors import UserError
from sapiens_lite.hub import CONFIG_NAME, HubMixin, read_checkpoint_config, resolve_checkpoint_folder
from sapiens_lite.keypoints import builtin_schemes, get_scheme, is_builtin, register_scheme
from sapiens_lite.models.heads import FINAL_LAYER_KEYS, POSE_UPSAMPLE, HeadConfig, build_head
from sapiens_lite.models.vit import VisionTransformer, ViTConfig

HEATMAP_STRIDE = 16 // POSE_UPSAMPLE  # heatmaps are 1/4 of the input: 16x16 patches upsampled 4x by the head
# config.json entry holding the full definition of a scheme that is not built in.
SCHEME_DEFINITION_KEY = "keypoint_scheme_definition"


@dataclass
class PoseConfig:
    backbone: ViTConfig = field(default_factory=ViTConfig)
    """The ViT; its img_size must equal input_size (Sapiens pose: patch_padding=2, no cls token)."""
    head: HeadConfig = field(default_factory=HeadConfig)
    scheme: str = "coco17"
    """Keypoint scheme, sets K: coco17, coco_wholebody133, goliath308, or a scheme JSON file (see keypoints)."""
    input_size: tuple[int, int] = (1024, 768)
    """(H, W) of the person crop; 256x192 for the small ViTPose models."""
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    """RGB mean on the 0..255 scale (ImageNet, as the Sapiens and ViTPose configs)."""
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    sigma: float = 6.0
    """Gaussian sigma of the UDP heatmap targets, in heatmap pixels: 6 at 1024x768 (Sapiens), 2 at 256x192."""
    flip_test: bool = True
    """predict() averages the heatmaps of the image and of its mirror image."""

    def __post_init__(self):
        self.input_size = tuple(self.input_size)
        if len(self.input_size) != 2 or any(s % 16 for s in self.input_size):
            raise ValueError(f"input_size must be (H, W), multiples of 16, got {self.input_size}")
        if tuple(self.backbone.img_size) != self.input_size:
            raise ValueError(
                f"backbone.img_size {tuple(self.backbone.img_size)} must equal input_size {self.input_size}"
            )
        if self.sigma <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        get_scheme(self.scheme)  # UserError listing the schemes if unknown, naming the field if a bad file

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(h, w) of the output heatmaps."""
        return (self.input_size[0] // HEATMAP_STRIDE, self.input_size[1] // HEATMAP_STRIDE)

    @property
    def num_keypoints(self) -> int:
        return get_scheme(self.scheme).num_keypoints


# ---- the model ----


class PoseModel(nn.Module, HubMixin):
    model_type = "pose"
    config_class = PoseConfig

    def __init__(self, cfg: PoseConfig):
        super().__init__()
        self.config = cfg
        self.scheme = get_scheme(cfg.scheme)
        self.backbone = VisionTransformer(cfg.backbone)
        self.head = build_head(cfg.head, self.backbone.embed_dim, self.scheme.num_keypoints)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] normalised crops -> heatmaps [B, K, H/4, W/4]."""
        # contiguous NCHW for the head: the token map is a transposed view, on which CPU bf16
        # deconvolutions run about 10x slower (measured)
        feats = self.backbone.forward_features(x).contiguous()  # [B, C, H/16, W/16]
        return self.head(feats)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, flip_test: bool | None = None) -> torch.Tensor:
        """Inference heatmaps [B, K, H/4, W/4]; with flip test (default: config.flip_test) the mean of
        the image's heatmaps and the mirror image's heatmaps mapped back (codec.flip_heatmaps)."""
        flip_test = self.config.flip_test if flip_test is None else flip_test
        if not flip_test:
            return self(images)
        both = self(torch.cat([images, images.flip(-1)], dim=0))  # one pass for both views: [2B, K, h, w]
        heatmaps, flipped = both.chunk(2, dim=0)
        return 0.5 * (heatmaps + flip_heatmaps(flipped, self.scheme.flip_index))

    # ---- checkpoints ----

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | None = None,
        **kwargs,
    ) -> PoseModel:
        """`HubMixin.from_pretrained` (same arguments), after registering the keypoint scheme definition
        that config.json carries for a scheme file (so the file itself is not needed)."""
        folder = resolve_checkpoint_folder(
            repo_id_or_path, revision=revision, cache_dir=cache_dir, token=token
        )
        info = read_checkpoint_config(folder, expected_model_type=cls.model_type)
        definition = info.get(SCHEME_DEFINITION_KEY)
        scheme = info["config"].get("scheme") if isinstance(info["config"], dict) else None
        if definition is not None and isinstance(scheme, str):
            register_scheme(scheme, definition, source=f"{folder / CONFIG_NAME}: {SCHEME_DEFINITION_KEY}")
        return super().from_pretrained(folder, **kwargs)

    def load_weights(
        self, state_dict: dict[str, torch.Tensor], source: str = "state dict", strict: bool = True
    ):
        """Load a (converted) state dict with `backbone.` + `head.` keys, first checking the head's K."""
        check_head_keypoints(state_dict, self.config, source)
        return self.load_state_dict(state_dict, strict=strict)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{k}" for k in self.backbone.no_weight_decay()}

    def hub_metadata(self) -> dict:
        cfg = self.config
        info = {
            "keypoint_scheme": self.scheme.name,
            "num_keypoints": self.scheme.num_keypoints,
            "input_size": list(cfg.input_size),
            "heatmap_size": list(cfg.heatmap_size),
            "mean": list(cfg.mean),
            "std": list(cfg.std),
        }
        if not is_builtin(cfg.scheme):  # a scheme file: the checkpoint must not depend on it
            info[SCHEME_DEFINITION_KEY] = self.scheme.to_dict()
        return info

    def model_card_body(self) -> str:
        cfg = self.config
        return (
            f"Top-down heatmap pose model: {self.scheme.num_keypoints} keypoints ({self.scheme.name}), "
            f"{cfg.head.kind} head, input {cfg.input_size[0]}x{cfg.input_size[1]} (H x W), "
            f"heatmaps {cfg.heatmap_size[0]}x{cfg.heatmap_size[1]}, UDP codec (sigma {cfg.sigma})."
        )


def head_num_keypoints(state_dict: dict[str, torch.Tensor], head_kind: str) -> int | None:
    """K predicted by the head in `state_dict` (`head.` keys), or None if its final layer is absent."""
    w = state_dict.get(f"head.{FINAL_LAYER_KEYS[head_kind]}")
    return None if w is None else int(w.shape[0])


def check_head_keypoints(state_dict: dict[str, torch.Tensor], cfg: PoseConfig, source: str) -> None:
    """UserError if the checkpoint's head predicts a different number of keypoints than `cfg.scheme`."""
    found = head_num_keypoints(state_dict, cfg.head.kind)
    expected = cfg.num_keypoints
    if found is not None and found != expected:
        builtin = ", ".join(f"{s.num_keypoints}: {s.name}" for s in builtin_schemes())
        raise UserError(
            f"{source}: the checkpoint's head predicts {found} keypoints but scheme {cfg.scheme!r} has "
            f"{expected}; pick the matching scheme ({builtin}, or a scheme JSON file with {found} keypoints)"
        )


def build_pose_model(arch: str = "vit_test", scheme: str = "coco17", **overrides) -> PoseModel:
    """`build_pose_model("sapiens_0.3b", "goliath308", input_size=(1024, 768))`: a Sapiens-style model.

    The backbone gets the Sapiens pose settings (no cls token, patch padding 2) and img_size = input_size;
    keywords are PoseConfig fields.
    """
    input_size = tuple(overrides.pop("input_size", (1024, 768)))
    backbone = ViTConfig(arch=arch, img_size=input_size, patch_padding=2, cls_token=False)
    return PoseModel(PoseConfig(backbone=backbone, scheme=scheme, input_size=input_size, **overrides))
