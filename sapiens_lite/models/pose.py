"""Top-down pose model: a plain ViT backbone and a heatmap head.

    model = PoseModel(PoseConfig(backbone=ViTConfig("sapiens_0.3b", patch_padding=2), scheme="goliath308"))
    heatmaps = model(x)                    # x [B, 3, 1024, 768] normalised -> [B, 308, 256, 192]
    heatmaps = model.predict(x)            # same, averaged with the flipped image's heatmaps (flip test)
    keypoints, scores = decode_heatmaps(heatmaps, input_size=model.config.input_size)   # sapiens_lite.codec

Heads (`HeadConfig.kind`), each with the key names of the checkpoints it loads, after the `head.` prefix:

- "sapiens": the Sapiens pose head (mmpose `HeatmapHead` with `use_silu=True`): two 4x4 stride-2
  deconvolutions without bias, two 1x1 convolutions, each followed by InstanceNorm2d (not affine, so
  no weights) and SiLU, then a 1x1 conv to K heatmaps. Keys `deconv_layers.{0,3}.weight`,
  `conv_layers.{0,3}.{weight,bias}`, `final_layer.{weight,bias}`: Sapiens `.pth` heads load strictly.
- "vitpose": the ViTPose classic decoder (two deconvolutions + BatchNorm + ReLU, 256 channels, a 1x1
  conv), keys as transformers' `VitPoseClassicDecoder` (`deconv1`, `batchnorm1`, `deconv2`, ...).
- "simple": the ViTPose simple decoder (ReLU, bilinear x4 upsampling, a 3x3 conv), keys as
  transformers' `VitPoseSimpleDecoder` (`conv`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from sapiens_lite.codec import flip_heatmaps
from sapiens_lite.errors import UserError
from sapiens_lite.hub import HubMixin
from sapiens_lite.keypoints import get_scheme
from sapiens_lite.models.vit import VisionTransformer, ViTConfig

HEATMAP_STRIDE = 4  # heatmaps are 1/4 of the input: 16x patches upsampled 4x by the head
DEFAULT_CHANNELS = {"sapiens": 768, "vitpose": 256, "simple": None}


@dataclass
class HeadConfig:
    kind: Literal["sapiens", "vitpose", "simple"] = "sapiens"
    """sapiens: deconv x2 + conv1x1 x2 (InstanceNorm + SiLU); vitpose: classic deconv x2 (BN + ReLU); simple: upsample + conv3x3."""
    channels: int | None = None
    """Width of the deconv/conv layers; None: 768 for sapiens (the Sapiens checkpoints), 256 for vitpose. Unused by simple."""

    def __post_init__(self):
        if self.kind not in DEFAULT_CHANNELS:
            raise ValueError(f"kind must be one of {', '.join(DEFAULT_CHANNELS)}, got {self.kind!r}")
        if self.channels is not None and self.channels <= 0:
            raise ValueError(f"channels must be positive, got {self.channels}")
        if self.kind == "simple" and self.channels is not None:
            raise ValueError("channels: the simple head has no hidden layers; leave channels unset")

    @property
    def width(self) -> int | None:
        return self.channels if self.channels is not None else DEFAULT_CHANNELS[self.kind]


@dataclass
class PoseConfig:
    backbone: ViTConfig = field(default_factory=ViTConfig)
    """The ViT; its img_size must equal input_size (Sapiens pose: patch_padding=2, no cls token)."""
    head: HeadConfig = field(default_factory=HeadConfig)
    scheme: str = "coco17"
    """Keypoint scheme (sapiens_lite.keypoints): coco17, coco_wholebody133 or goliath308; sets K."""
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
        get_scheme(self.scheme)  # UserError listing the schemes if unknown

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(h, w) of the output heatmaps."""
        return (self.input_size[0] // HEATMAP_STRIDE, self.input_size[1] // HEATMAP_STRIDE)

    @property
    def num_keypoints(self) -> int:
        return get_scheme(self.scheme).num_keypoints


# ---- heads ----


class SapiensHead(nn.Module):
    """Sapiens HeatmapHead: [B, C, h/4, w/4] features -> [B, K, h, w] heatmaps."""

    def __init__(self, in_channels: int, num_keypoints: int, channels: int = 768):
        super().__init__()
        # Index layout 0: conv, 1: InstanceNorm, 2: SiLU, 3: conv, ... matches the checkpoints' keys.
        self.deconv_layers = nn.Sequential(
            nn.ConvTranspose2d(
                in_channels, channels, kernel_size=4, stride=2, padding=1, output_padding=0, bias=False
            ),
            nn.InstanceNorm2d(channels),
            nn.SiLU(inplace=True),
            nn.ConvTranspose2d(
                channels, channels, kernel_size=4, stride=2, padding=1, output_padding=0, bias=False
            ),
            nn.InstanceNorm2d(channels),
            nn.SiLU(inplace=True),
        )
        self.conv_layers = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=1),
            nn.InstanceNorm2d(channels),
            nn.SiLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=1),
            nn.InstanceNorm2d(channels),
            nn.SiLU(inplace=True),
        )
        self.final_layer = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        _init_head(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.deconv_layers(x)  # [B, C, 4h, 4w]
        x = self.conv_layers(x)
        return self.final_layer(x)  # [B, K, 4h, 4w]


class VitPoseClassicHead(nn.Module):
    """ViTPose classic decoder: two deconv + BatchNorm + ReLU blocks, then a 1x1 conv."""

    def __init__(self, in_channels: int, num_keypoints: int, channels: int = 256):
        super().__init__()
        self.deconv1 = nn.ConvTranspose2d(
            in_channels, channels, kernel_size=4, stride=2, padding=1, bias=False
        )
        self.batchnorm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.deconv2 = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1, bias=False)
        self.batchnorm2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        _init_head(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.batchnorm1(self.deconv1(x)))  # [B, C, 2h, 2w]
        x = self.relu2(self.batchnorm2(self.deconv2(x)))  # [B, C, 4h, 4w]
        return self.conv(x)  # [B, K, 4h, 4w]


class VitPoseSimpleHead(nn.Module):
    """ViTPose simple decoder: ReLU, bilinear x4 upsampling, a 3x3 conv."""

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        self.activation = nn.ReLU()
        self.upsampling = nn.Upsample(scale_factor=HEATMAP_STRIDE, mode="bilinear", align_corners=False)
        self.conv = nn.Conv2d(in_channels, num_keypoints, kernel_size=3, stride=1, padding=1)
        _init_head(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.upsampling(self.activation(x)))  # [B, K, 4h, 4w]


def _init_head(head: nn.Module) -> None:
    """mmpose HeatmapHead init: conv/deconv weights N(0, 0.001), zero biases, norms at identity."""
    for m in head.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_head(cfg: HeadConfig, in_channels: int, num_keypoints: int) -> nn.Module:
    builders = {
        "sapiens": lambda: SapiensHead(in_channels, num_keypoints, cfg.width),
        "vitpose": lambda: VitPoseClassicHead(in_channels, num_keypoints, cfg.width),
        "simple": lambda: VitPoseSimpleHead(in_channels, num_keypoints),
    }
    return builders[cfg.kind]()


# Key of the last layer's weight [K, C, k, k] for each head kind (after the `head.` prefix).
FINAL_LAYER_KEYS = {"sapiens": "final_layer.weight", "vitpose": "conv.weight", "simple": "conv.weight"}


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
        feats = self.backbone.forward_features(x)  # [B, C, H/16, W/16]
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
        return {
            "keypoint_scheme": self.scheme.name,
            "num_keypoints": self.scheme.num_keypoints,
            "input_size": list(cfg.input_size),
            "heatmap_size": list(cfg.heatmap_size),
            "mean": list(cfg.mean),
            "std": list(cfg.std),
        }

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
        raise UserError(
            f"{source}: the checkpoint's head predicts {found} keypoints but scheme {cfg.scheme!r} has "
            f"{expected}; pick the matching scheme (17: coco17, 133: coco_wholebody133, 308: goliath308)"
        )


def build_pose_model(arch: str = "vit_test", scheme: str = "coco17", **overrides) -> PoseModel:
    """`build_pose_model("sapiens_0.3b", "goliath308", input_size=(1024, 768))`: a Sapiens-style model.

    The backbone gets the Sapiens pose settings (no cls token, patch padding 2) and img_size = input_size;
    keywords are PoseConfig fields.
    """
    input_size = tuple(overrides.pop("input_size", (1024, 768)))
    backbone = ViTConfig(arch=arch, img_size=input_size, patch_padding=2, cls_token=False)
    return PoseModel(PoseConfig(backbone=backbone, scheme=scheme, input_size=input_size, **overrides))


def with_input_size(cfg: PoseConfig, input_size: tuple[int, int], sigma: float | None = None) -> PoseConfig:
    """A copy of `cfg` for another crop size (backbone img_size follows)."""
    backbone = dataclasses.replace(cfg.backbone, img_size=tuple(input_size))
    return dataclasses.replace(
        cfg, backbone=backbone, input_size=tuple(input_size), sigma=cfg.sigma if sigma is None else sigma
    )
