"""`sapiens pretrain`: MAE pretraining with the shared DeepSpeed engine.

    sapiens pretrain --config configs/pretrain/tiny_cpu.yaml engine.total_steps=300
    torchrun --nproc_per_node 8 $(which sapiens) pretrain --config configs/pretrain/sapiens_0.3b.yaml
    deepspeed --hostfile hosts $(which sapiens) pretrain --config configs/pretrain/sapiens_1b.yaml

The trainer shape of `sapiens_train.recipe`: config -> `validate` (data sources, the init checkpoint,
batch sizes: every user mistake before any process group or model exists) -> `build_model` (the MAE,
optionally started from a checkpoint) -> the engine (DeepSpeed, resume) -> `build_data` -> hooks ->
`Engine.fit` -> `finish` (the encoder exported as run_dir/backbone). Every `viz.every` steps a PNG of original / masked / reconstruction is written to
run_dir/viz/. The engine logs loss, lr, img/s and MFU (model FLOPs from `mae_forward_flops`: the
encoder on the visible 25% of the tokens, the decoder on all of them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.config import PretrainConfig
from pretrain.mae import MaskedAutoencoder, load_pretrained, mae_forward_flops
from sapiens_lite.errors import ConfigError, UserError
from sapiens_train.engine import Engine, EveryN, global_batch_size
from sapiens_train.recipe import epochs_line, print_plan, world_size_from_env
from sapiens_train.stream import resolve_shards

VIZ_DIR = "viz"


# ---- validation: before any work ----


def data_urls(cfg: PretrainConfig):
    """What `build_stream` reads: the index.json, else the shard list; None for synthetic data."""
    if cfg.data.index and cfg.data.shards:
        raise ConfigError("set data.index or data.shards, not both")
    if cfg.data.index:
        return cfg.data.index
    if cfg.data.shards:
        return list(cfg.data.shards)
    if cfg.data.synthetic:
        return None
    raise ConfigError(
        "no training data: data.shards is empty and data.index is unset "
        "(pack images with `sapiens data pack`, or set data.synthetic=N for a demo on drawn people)"
    )


def validate(cfg: PretrainConfig) -> dict:
    """Check what a user can get wrong, before any process group, model or worker exists.

    Returns what it had to load anyway: {"shards": [...] or None, "init": state dict or None}.
    """
    world = world_size_from_env()
    gbs = global_batch_size(cfg.engine, world)  # UserError naming the three factors
    out: dict[str, Any] = {"shards": None, "init": None, "global_batch_size": gbs}

    urls = data_urls(cfg)
    if urls is not None:
        shards = resolve_shards(urls)  # UserError: missing file, empty list, no samples
        n = sum(s.num_samples for s in shards)
        if n < cfg.engine.micro_batch_size * world:
            raise UserError(
                f"the data holds {n} samples, fewer than one global micro-batch "
                f"(engine.micro_batch_size={cfg.engine.micro_batch_size} x {world} ranks)"
            )
        out["shards"] = shards
    elif cfg.data.synthetic < cfg.engine.micro_batch_size * world:
        raise ConfigError(
            f"data.synthetic={cfg.data.synthetic} images are fewer than one global micro-batch "
            f"(engine.micro_batch_size={cfg.engine.micro_batch_size} x {world} ranks)"
        )

    if cfg.init.checkpoint:
        out["init"] = _load_init(cfg)
    return out


def _load_init(cfg: PretrainConfig) -> dict:
    """Read the init checkpoint and check that it fits the encoder, without building the model."""
    from sapiens_lite.convert import check_fits, convert_state_dict, load_checkpoint_file

    path = Path(cfg.init.checkpoint)
    if not path.is_file():
        raise UserError(f"init.checkpoint: {path} does not exist")
    try:
        sd = load_checkpoint_file(path)
    except UserError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"init.checkpoint: cannot read {path} ({type(e).__name__}: {e})") from None
    conv = convert_state_dict(sd, source=cfg.init.source)
    check_fits(conv, cfg.model.encoder, checkpoint=f"init.checkpoint {path}", target="model.encoder")
    return sd


# ---- model and data ----


def build_model(cfg: PretrainConfig, init_state: dict | None = None) -> MaskedAutoencoder:
    model = MaskedAutoencoder(cfg.model)
    if init_state is not None:
        report = load_pretrained(model, init_state, source=cfg.init.source)
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"[pretrain] init from {cfg.init.checkpoint} ({report['source']}): {len(report['encoder'])} encoder "
                f"and {len(report['decoder'])} decoder tensors loaded, {len(report['kept'])} kept",
                flush=True,
            )
    return model


def _transform(cfg: PretrainConfig):
    from sapiens_train.transforms import MAETransform, MAETransformConfig

    return MAETransform(
        MAETransformConfig(
            size=cfg.data.img_size, scale=cfg.data.crop_scale, hflip=0.5 if cfg.data.hflip else 0.0
        )
    )


class SyntheticImages(torch.utils.data.Dataset):
    """`n` procedurally drawn people (sapiens_train.synth), encoded once, augmented per access.

    For demos and smoke tests without packed shards. Augmentation seeds come from torch's RNG,
    which the engine seeds per rank, so runs are reproducible.
    """

    def __init__(self, n: int, img_size: tuple[int, int], transform, seed: int = 0):
        import cv2

        from sapiens_train.synth import render_sample

        h, w = img_size
        render = (max(h, 128), max(w, 96))  # draw at least 128x96, crop/resize down to img_size
        self.images = []
        for i in range(n):
            img, _ = render_sample(seed, i, render, people=(1, 2))
            ok, buf = cv2.imencode(".png", img[:, :, ::-1])  # lossless; RGB -> BGR for OpenCV
            assert ok
            self.images.append(buf.tobytes())
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        return self.transform(self.images[i], seed)  # [3, H, W]


def build_data(cfg: PretrainConfig, engine, shards):
    """This rank's micro-batches [B, 3, H, W] (normalised), resumable through the engine."""
    if shards is None:
        from sapiens_train.loader import ResumableLoader

        dataset = SyntheticImages(
            cfg.data.synthetic, cfg.data.img_size, _transform(cfg), seed=cfg.engine.seed
        )
        return ResumableLoader(
            dataset,
            cfg.engine.micro_batch_size,
            rank=engine.rank,
            world_size=engine.world_size,
            shuffle=True,
            seed=cfg.engine.seed,
            num_workers=cfg.data.num_workers,
        )
    from sapiens_train.stream import build_stream
    from sapiens_train.transforms import MAEDecode

    return build_stream(
        data_urls(cfg),
        decode=MAEDecode(_transform(cfg)),
        batch_size=cfg.engine.micro_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.engine.seed,
        rank=engine.rank,
        world_size=engine.world_size,
        mode="epoch",
        shuffle_buffer=cfg.data.shuffle_buffer,
        pin_memory=engine.device.type == "cuda",
    )


def step_fn(model, imgs: torch.Tensor):
    """One forward pass; the engine does backward and the optimizer step."""
    loss, _, mask = model(imgs)
    return loss, {}


# ---- reconstruction pictures ----


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """[3, H, W] normalised -> [H, W, 3] uint8 RGB."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    img = (x.float().cpu() * s + m).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def reconstruction_grid(model: MaskedAutoencoder, imgs: torch.Tensor, pred, mask, mean, std) -> np.ndarray:
    """Rows of (original, masked, reconstruction with the visible patches pasted back)."""
    from sapiens_lite.visualize import image_grid

    masked, recon = model.reconstruct(imgs.float(), pred.float(), mask.float())
    rows = [
        [_to_uint8(a, mean, std), _to_uint8(b, mean, std), _to_uint8(c, mean, std)]
        for a, b, c in zip(imgs, masked, recon)
    ]
    return image_grid(rows, labels=["image", "masked 75%", "reconstruction"])


def save_reconstructions(cfg: PretrainConfig):
    """A hook writing run_dir/viz/step_XXXXXXXX.png; every rank runs the forward (ZeRO-3 gathers weights)."""
    from sapiens_train.transforms import IMAGENET_MEAN, IMAGENET_STD

    def hook(engine, step: int, batch, metrics) -> None:
        imgs = batch[: cfg.viz.num_images]
        engine.ds.eval()
        autocast = torch.autocast(
            engine.device.type, dtype=torch.bfloat16, enabled=cfg.engine.precision == "bf16"
        )
        with torch.no_grad(), autocast:
            _, pred, mask = engine.ds(imgs)
        if not engine.is_main:
            return
        import cv2

        # reconstruct() reads no weights (patchify / unpatchify): the module's ZeRO-3 partitions are enough.
        grid = reconstruction_grid(engine.module, imgs, pred, mask, IMAGENET_MEAN, IMAGENET_STD)
        out = Path(cfg.engine.run_dir) / VIZ_DIR / f"step_{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.stem + ".tmp.png")
        cv2.imwrite(str(tmp), grid[:, :, ::-1])
        os.replace(tmp, out)

    return hook


# ---- the command ----


def describe_data(cfg: PretrainConfig, checked: dict) -> str:
    """The data plan `--dry-run` prints: where the images come from and how many epochs the run makes."""
    gbs = global_batch_size(cfg.engine, world_size_from_env())
    if checked["shards"] is None:
        source = f"data.synthetic: {cfg.data.synthetic} procedurally drawn people"
        n = cfg.data.synthetic
    else:
        shards = checked["shards"]
        n = sum(s.num_samples for s in shards)
        source = f"{len(shards)} shards ({shards[0].url} ...)"
    crop = f"random resized crops {cfg.data.img_size[0]}x{cfg.data.img_size[1]}, scale {cfg.data.crop_scale}"
    return f"{source}; {crop}; {cfg.data.num_workers} loader workers\n" + epochs_line(
        n, gbs, cfg.engine.total_steps
    )


def main(cfg: PretrainConfig, *, resume: bool = True, dry_run: bool = False) -> dict:
    """`sapiens pretrain`: validate, then print the plan (`dry_run`) or train; returns the summary."""
    checked = validate(cfg)  # every user error surfaces here, before any work
    if dry_run:
        return print_plan(
            cfg,
            architecture=lambda: MaskedAutoencoder(cfg.model),
            param_groups=None,
            data_plan=describe_data(cfg, checked),
        )
    _, summary = train(cfg, checked, resume=resume)
    return summary


def train(cfg: PretrainConfig, checked: dict | None = None, *, resume: bool = True) -> tuple[Engine, dict]:
    """Build, train and export; returns (engine, summary) (summary: steps, final_loss, img_per_s, ...)."""
    checked = checked if checked is not None else validate(cfg)
    engine = Engine(
        lambda: build_model(cfg, checked["init"]),
        cfg.engine,
        cfg.optim,
        flops_per_sample=mae_forward_flops(cfg.model),
        config_to_save=cfg,
        resume=resume,  # the checkpoint is verified before DeepSpeed starts
    )
    data = build_data(cfg, engine, checked["shards"])
    hooks = [EveryN(cfg.viz.every, save_reconstructions(cfg))] if cfg.viz.every > 0 else []
    summary = engine.fit(data, step_fn, hooks=hooks)
    finish(cfg, engine, summary)
    return engine, summary


def finish(cfg: PretrainConfig, engine: Engine, summary: dict) -> None:
    """The finished run also holds its encoder as a backbone folder (what `sapiens export-backbone` writes),
    so `sapiens finetune init.path=<this run dir>` starts from it directly. The final checkpoint is on disk
    for every rank once fit returns; rank 0 consolidates it, the others wait."""
    from sapiens_train.dist import barrier

    backbone_dir = Path(cfg.engine.run_dir) / "backbone"
    if engine.is_main:
        if cfg.engine.checkpoint_every:
            from pretrain.export import export_backbone

            export_backbone(cfg.engine.run_dir, backbone_dir)
            saved = f"checkpoints in {engine.ckpt_dir}; backbone in {backbone_dir}"
        else:
            saved = "nothing saved (engine.checkpoint_every=0)"
        print(
            f"[pretrain] done: {summary['steps']} steps, final loss {summary['final_loss']}, "
            f"{summary['img_per_s'] or 0:.1f} img/s; {saved}",
            flush=True,
        )
    barrier()
