"""Typed config of `sapiens pretrain`: defaults here, differences in configs/pretrain/*.yaml.

    cfg = load_config(PretrainConfig, ["configs/pretrain/sapiens_0.3b.yaml"], ["engine.total_steps=100"])

Sections: model (the MAE), data (shards and augmentation), engine and optim (the shared training
engine; MAE optimizer defaults: blr 1.5e-4 per 256 samples, betas (0.9, 0.95), weight decay 0.05,
cosine after a linear warmup), viz (reconstruction pictures) and init (a checkpoint to start from).
`data.img_size` is the one place the training resolution is set: `model.encoder.img_size` follows it
(setting both to different sizes is an error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pretrain.mae import MAEConfig
from sapiens_train.config import EngineConfig, OptimConfig


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)
    """Webdataset shard paths/urls; brace patterns like `data/train-{000000..000099}.tar` are expanded."""
    index: str | None = None
    """An `index.json` written by `sapiens data pack`; its shards are used (after `shards`, if both are set)."""
    img_size: tuple[int, int] = (1024, 768)
    """(H, W) of the training crops; the encoder's size follows it. Sapiens: 1024x768 (a 64x48 grid)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Area fraction range of the random resized crop (MAE / Sapiens: 0.2 - 1.0)."""
    hflip: bool = True
    num_workers: int = 4
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer (webdataset)."""
    synthetic: int = 0
    """If > 0 and no shards are given: train on this many procedurally drawn people (demos, smoke tests)."""

    def __post_init__(self):
        self.img_size = tuple(self.img_size)
        if len(self.img_size) != 2 or any(s < 16 or s % 16 for s in self.img_size):
            raise ValueError(f"img_size must be (H, W), multiples of 16, got {self.img_size}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.synthetic < 0:
            raise ValueError(f"synthetic must be >= 0, got {self.synthetic}")


@dataclass
class VizConfig:
    every: int = 1000
    """Write a PNG grid (original / masked / reconstruction) every this many optimizer steps; 0 = never."""
    num_images: int = 4


@dataclass
class InitConfig:
    checkpoint: str | None = None
    """Start the encoder (and the decoder, if the file has one) from any checkpoint `sapiens convert` reads."""
    source: str | None = None
    """Checkpoint format if it cannot be recognised from its keys (see `sapiens convert --help`)."""


def _mae_optim() -> OptimConfig:
    # MAE / Sapiens: blr 1.5e-4 (lr = blr * batch / 256), AdamW (0.9, 0.95), wd 0.05, warmup + cosine.
    return OptimConfig(blr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, schedule="cosine", warmup_steps=100)


def _pretrain_engine() -> EngineConfig:
    return EngineConfig(run_dir="runs/pretrain")


@dataclass
class PretrainConfig:
    model: MAEConfig = field(default_factory=MAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=_pretrain_engine)
    optim: OptimConfig = field(default_factory=_mae_optim)
    viz: VizConfig = field(default_factory=VizConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self):
        if self.optim.warmup_steps >= self.engine.total_steps:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be < engine.total_steps ({self.engine.total_steps})"
            )

    def finalize(self, explicit: frozenset[str]) -> PretrainConfig:
        """`model.encoder.img_size` follows `data.img_size` (the encoder's sin-cos grid is made for the crops);
        a config that sets both to different sizes is an error."""
        enc = self.model.encoder
        if tuple(enc.img_size) == self.data.img_size:
            return self
        if "model.encoder.img_size" in explicit:
            raise ValueError(
                f"model.encoder.img_size {list(enc.img_size)} differs from data.img_size {list(self.data.img_size)}; "
                "set data.img_size only (the encoder follows it)"
            )
        encoder = dataclasses.replace(enc, img_size=self.data.img_size)
        return dataclasses.replace(self, model=dataclasses.replace(self.model, encoder=encoder))
