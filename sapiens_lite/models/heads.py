"""Dense heads: a backbone feature map [B, C, gh, gw] -> a dense output [B, K, gh * up, gw * up].

    head = build_head(HeadConfig("sapiens"), in_channels=1024, num_keypoints=308)
    heatmaps = head(backbone.forward_features(x))      # [B, 1024, 64, 48] -> [B, 308, 256, 192]

The interface (`DenseHead`) is small: `forward(feats)` on the backbone's feature map, `out_channels`
(K: keypoints here; classes for segmentation logits, 1 for depth) and `upsample`, the output size over
the feature-map size. With the 16x16 patches of our ViTs the output stride in input pixels is
`patch_size / upsample`: 4 for the pose heads (heatmaps at 1/4 of the crop).

How a segmentation or depth head plugs in: a module with the same three members, built from its own
small config dataclass, next to these ones; its model class holds `backbone` + `head` like `PoseModel`
(sapiens_lite/models/pose.py) and computes `head(backbone.forward_features(x))`. A head that wants
several levels (DPT / UPerNet style) takes the list of maps of
`backbone.forward_intermediates(x, indices=[...], norm=True, intermediates_only=True)`, each
[B, C, gh, gw], instead of one map.

The pose heads (`HeadConfig.kind`), each with the key names of the checkpoints it loads, after the
`head.` prefix:

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

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn as nn

POSE_UPSAMPLE = 4  # every pose head turns the 1/16 feature map into 1/4 heatmaps
DEFAULT_CHANNELS = {"sapiens": 768, "vitpose": 256, "simple": None}


@runtime_checkable
class DenseHead(Protocol):
    """Backbone feature map [B, C, gh, gw] -> dense output [B, out_channels, gh * upsample, gw * upsample]."""

    out_channels: int
    """K: keypoint heatmaps, segmentation classes, 1 for depth."""
    upsample: int
    """Output size over the feature-map size (output stride = backbone patch size / upsample)."""

    def __call__(self, feats: torch.Tensor) -> torch.Tensor: ...


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


class SapiensHead(nn.Module):
    """Sapiens HeatmapHead: [B, C, gh, gw] features -> [B, K, 4gh, 4gw] heatmaps."""

    upsample = POSE_UPSAMPLE

    def __init__(self, in_channels: int, num_keypoints: int, channels: int = 768):
        super().__init__()
        self.out_channels = num_keypoints
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
        x = self.deconv_layers(x)  # [B, C, 4gh, 4gw]
        x = self.conv_layers(x)
        return self.final_layer(x)  # [B, K, 4gh, 4gw]


class VitPoseClassicHead(nn.Module):
    """ViTPose classic decoder: two deconv + BatchNorm + ReLU blocks, then a 1x1 conv."""

    upsample = POSE_UPSAMPLE

    def __init__(self, in_channels: int, num_keypoints: int, channels: int = 256):
        super().__init__()
        self.out_channels = num_keypoints
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
        x = self.relu1(self.batchnorm1(self.deconv1(x)))  # [B, C, 2gh, 2gw]
        x = self.relu2(self.batchnorm2(self.deconv2(x)))  # [B, C, 4gh, 4gw]
        return self.conv(x)  # [B, K, 4gh, 4gw]


class VitPoseSimpleHead(nn.Module):
    """ViTPose simple decoder: ReLU, bilinear x4 upsampling, a 3x3 conv."""

    upsample = POSE_UPSAMPLE

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        self.out_channels = num_keypoints
        self.activation = nn.ReLU()
        self.upsampling = nn.Upsample(scale_factor=POSE_UPSAMPLE, mode="bilinear", align_corners=False)
        self.conv = nn.Conv2d(in_channels, num_keypoints, kernel_size=3, stride=1, padding=1)
        _init_head(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.upsampling(self.activation(x)))  # [B, K, 4gh, 4gw]


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
    """The pose head (a `DenseHead`) of kind `cfg.kind`: in_channels features -> num_keypoints heatmaps."""
    builders = {
        "sapiens": lambda: SapiensHead(in_channels, num_keypoints, cfg.width),
        "vitpose": lambda: VitPoseClassicHead(in_channels, num_keypoints, cfg.width),
        "simple": lambda: VitPoseSimpleHead(in_channels, num_keypoints),
    }
    return builders[cfg.kind]()


# Key of the last layer's weight [K, C, k, k] for each head kind (after the `head.` prefix).
FINAL_LAYER_KEYS = {"sapiens": "final_layer.weight", "vitpose": "conv.weight", "simple": "conv.weight"}
