"""Top-down pose fine-tuning on the shared training engine (the same `Engine` as MAE pretraining).

    cfg = load_config(FinetuneConfig, ["configs/finetune/tiny_cpu_coco17.yaml"])
    metrics = train(cfg)      # run_dir/final/ is a PoseModel folder for `sapiens eval` and the Hub

In run order: build the `PoseModel` and load the starting weights (`init_model`), the top-down dataset
and a resumable loader, the loss, AdamW groups with layer-wise lr decay, then `Engine.fit` with a hook
that evaluates OKS AP every `eval.every_steps` and keeps the best model (save_pretrained into best/).
At the end: a final evaluation and `save_pretrained` into final/.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from finetune.config import FinetuneConfig, InitConfig
from sapiens_lite.errors import UserError
from sapiens_lite.keypoints import canonical_name, get_scheme
from sapiens_lite.models.pose import PoseConfig, PoseModel
from sapiens_lite.training.data import ResumableLoader

log = logging.getLogger(__name__)

_PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


# ---- starting weights -----------------------------------------------------------------------------


def _read_model_type(folder: Path) -> str | None:
    f = folder / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None


def resolve_init(init: InitConfig) -> tuple[str, str]:
    """(kind, path) with kind in run_dir / backbone / pose / pth; `auto` decided from what `path` is."""
    path = Path(init.path)
    if init.kind != "auto":
        return init.kind, init.path
    if path.is_file():
        if path.suffix in _PTH_SUFFIXES:
            return "pth", init.path
        raise UserError(f"init.path {init.path}: a file, but not a .pth/.pt/.bin checkpoint")
    if path.is_dir():
        mt = _read_model_type(path)
        if mt == "pose":
            return "pose", init.path
        if mt == "vit":
            return "backbone", init.path
        if (path / "backbone" / "config.json").is_file():
            return "run_dir", init.path
        raise UserError(
            f"init.path {init.path}: a folder with neither a pose/vit config.json nor an exported backbone/ "
            "(run `sapiens export-backbone` on a pretraining run first)"
        )
    if path.is_absolute() or init.path.startswith(".") or init.path.count("/") != 1:
        raise UserError(f"init.path {init.path}: no such file or folder (and not a Hub repo id org/name)")
    # org/name: a Hub repo holding a pose model or a backbone.
    return "hub", init.path


def _load_converted_backbone(model: PoseModel, conv) -> None:
    """Fit a converted backbone to ours (cls token dropped, position grid resampled) and load it strictly."""
    from sapiens_lite.convert import adapt_to

    model.backbone.load_state_dict(adapt_to(conv, model.config.backbone), strict=True)


def _load_vit(model: PoseModel, vit, source: str) -> None:
    """Load one of our `VisionTransformer`s (another grid or cls layout allowed) into the backbone."""
    from sapiens_lite.convert import Converted, Hints

    c = vit.config.resolved()
    grid = tuple((s + 2 * c.patch_padding - c.patch_size) // c.patch_size + 1 for s in c.img_size)
    hints = Hints(
        embed_dim=c.embed_dim, depth=c.depth, patch_size=c.patch_size, grid=grid, cls_token=c.cls_token
    )
    _load_converted_backbone(model, Converted(source=source, backbone=vit.state_dict(), hints=hints))


def _check_head(found_k: int, expected: PoseConfig, source: str) -> None:
    k = get_scheme(expected.scheme).num_keypoints
    if found_k != k:
        raise UserError(
            f"{source}: the checkpoint's head predicts {found_k} keypoints, expected {k} "
            f"(model.scheme={expected.scheme}); set model.scheme to match or init.load_head=false"
        )


def init_model(model: PoseModel, init: InitConfig) -> str:
    """Load the starting weights named by `init` into `model`; returns a one-line description."""
    if not init.path:
        return "random initialisation"
    kind, path = resolve_init(init)
    if kind == "run_dir":
        kind, path = "backbone", str(Path(path) / "backbone")
    if kind in ("pose", "hub") and (kind == "pose" or _hub_model_type(path, init.revision) == "pose"):
        src = PoseModel.from_pretrained(path, revision=init.revision)
        if init.load_head:
            _check_head(src.scheme.num_keypoints, model.config, path)
            _load_head(model, src.head.state_dict(), path)
        _load_vit(model, src.backbone, path)
        return f"pose checkpoint {path}" + (" (backbone + head)" if init.load_head else " (backbone)")
    if kind in ("backbone", "hub"):
        from sapiens_lite.models.vit import VisionTransformer

        vit = VisionTransformer.from_pretrained(path, revision=init.revision)
        _load_vit(model, vit, path)
        return f"backbone {path}"
    assert kind == "pth", kind
    from sapiens_lite.convert import convert_state_dict
    from sapiens_lite.convert.safe_load import load_checkpoint_file

    conv = convert_state_dict(load_checkpoint_file(path))
    with_head = conv.head is not None and init.load_head
    if with_head:
        _check_head(conv.hints.head.num_keypoints, model.config, path)
        _load_head(model, conv.head, path)
    _load_converted_backbone(model, conv)
    return f"{conv.source} checkpoint {path} (backbone{' + head' if with_head else ''})"


def _load_head(model: PoseModel, sd: dict, source: str) -> None:
    try:
        model.head.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # another head kind or width: name the file and both sides
        first = str(e).strip().splitlines()
        raise UserError(
            f"{source}: its pose head does not fit model.head (kind={model.config.head.kind}, "
            f"channels={model.config.head.width}): {first[1].strip() if len(first) > 1 else first[0]}; "
            "set model.head to match or init.load_head=false"
        ) from None


def _hub_model_type(repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub import hf_hub_download

    try:
        f = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as e:  # offline, unknown repo, no access: say which and why
        raise UserError(
            f"init.path {repo_id}: cannot read config.json from the Hub ({type(e).__name__}: {e})"
        ) from None
    return json.loads(Path(f).read_text()).get("model_type")


def load_pose_checkpoint(
    path: str,
    *,
    expected_scheme: str | None = None,
    model_cfg: PoseConfig | None = None,
    revision: str | None = None,
) -> PoseModel:
    """A `PoseModel` from a folder / Hub id, or a Sapiens pose `.pth` (built from `model_cfg` when
    given, else from the checkpoint's own shapes, the scheme from its head's K).

    With `expected_scheme`, a head for another number of keypoints is a UserError naming the file,
    the expected and the found K.
    """
    p = Path(path)
    if p.is_file() and p.suffix in _PTH_SUFFIXES:
        if model_cfg is not None:  # the config says what to build; the checkpoint must fit it
            model = PoseModel(model_cfg)
            init_model(model, InitConfig(path=path, kind="pth"))
            return model
        from sapiens_lite.convert import build_pose_model, convert_state_dict
        from sapiens_lite.convert.safe_load import load_checkpoint_file

        model = build_pose_model(convert_state_dict(load_checkpoint_file(path)))  # scheme from the head's K
        _check_scheme(model, expected_scheme, path)
        return model
    if not p.exists() and (p.is_absolute() or path.startswith(".") or path.count("/") != 1):
        raise UserError(f"{path}: checkpoint not found")
    model = PoseModel.from_pretrained(path, revision=revision)
    _check_scheme(model, expected_scheme, path)
    return model


def _check_scheme(model: PoseModel, expected_scheme: str | None, path: str) -> None:
    if expected_scheme is not None and canonical_name(model.config.scheme) != canonical_name(expected_scheme):
        expected_k = get_scheme(expected_scheme).num_keypoints
        raise UserError(
            f"{path}: the checkpoint's head predicts {model.scheme.num_keypoints} keypoints ({model.config.scheme}), "
            f"expected {expected_k} (model.scheme={expected_scheme})"
        )


# ---- the run ---------------------------------------------------------------------------------------


def _check_paths(cfg: FinetuneConfig) -> None:
    d = cfg.data
    if not (d.train_ann or d.train_shards):
        raise UserError("data.train_ann (or data.train_shards) is required")
    for key in ("train_ann", "val_ann"):
        v = getattr(d, key)
        if v and not Path(v).is_file():
            raise UserError(f"data.{key}: {v} not found")
    for key in ("train_images", "val_images"):
        v = getattr(d, key)
        if v and not Path(v).is_dir():
            raise UserError(f"data.{key}: {v} is not a folder")
    if cfg.eval.every_steps and not d.val_ann:
        raise UserError("eval.every_steps > 0 needs data.val_ann")


class EvalHook:
    """Engine hook: OKS AP on the val set every `every` steps (rank 0; the others wait).

    Each result is appended to run_dir/eval.jsonl; the best AP so far is saved with save_pretrained
    into run_dir/best (with its metrics.json).
    """

    def __init__(self, cfg: FinetuneConfig, every: int):
        self.cfg = cfg
        self.every = every
        # A resumed run keeps the best AP of its earlier part (best/metrics.json), not just its own.
        best_file = Path(cfg.engine.run_dir) / "best" / "metrics.json"
        self.best = json.loads(best_file.read_text())["AP"] if best_file.is_file() else -1.0
        self.history: list[dict] = []

    def __call__(self, engine, step: int, last_batch, metrics: dict) -> None:
        self.evaluate(engine, step)

    def evaluate(self, engine, step: int) -> dict:
        from finetune.evaluate import evaluate_model
        from sapiens_lite.training.dist import barrier

        model = engine.module
        was_training = model.training
        model.eval()
        m: dict = {}
        if engine.is_main:
            m = evaluate_model(
                model,
                self.cfg.data.val_ann,
                self.cfg.data.val_images,
                self.cfg.eval,
                device=engine.device,
                num_workers=self.cfg.data.num_workers,
                progress=False,
            )
            m = {"step": step, **m}
            self.history.append(m)
            run_dir = Path(self.cfg.engine.run_dir)
            with open(run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            print(f"[eval] step {step}: AP {m['AP']:.4f}  AR {m['AR']:.4f}", flush=True)
            if m["AP"] > self.best:
                self.best = m["AP"]
                _save_model(model, run_dir / "best", m)
        barrier()
        model.train(was_training)
        return m


def _save_model(model: PoseModel, folder: Path, metrics: dict | None) -> None:
    model.save_pretrained(folder)
    if metrics:
        tmp = folder / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp, folder / "metrics.json")


def train(cfg: FinetuneConfig) -> dict:
    """Fine-tune per `cfg`; returns the final val metrics (empty without a val set).

    Rerunning with the same engine.run_dir resumes exactly from its latest checkpoint.
    """
    _check_paths(cfg)  # user mistakes surface before DeepSpeed is even imported

    from sapiens_lite.training.dist import set_ds_accelerator_env

    set_ds_accelerator_env()  # cpu when no GPU is visible; must precede `import deepspeed`
    import deepspeed

    from finetune.data import TopDownDataset, build_pose_stream
    from finetune.losses import build_loss
    from sapiens_lite.flops import forward_flops
    from sapiens_lite.training.engine import Engine
    from sapiens_lite.training.optim import param_groups, vit_layer_id

    def build_model() -> PoseModel:
        model = PoseModel(cfg.model)
        print(f"[finetune] init: {init_model(model, cfg.init)}", flush=True)
        return model

    model = build_model()
    # Layer-wise lr decay over the backbone blocks (MAE lr_decay); the head is the last "layer" (scale 1).
    groups = param_groups(
        model,
        cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay,
        num_layers=cfg.model.backbone.resolved().depth,
        layer_id_fn=vit_layer_id,
    )
    engine = Engine(
        deepspeed,
        model,
        cfg.engine,
        cfg.optim,
        param_groups=groups,
        config_to_save=cfg,
        flops_per_sample=forward_flops(cfg.model.backbone, cfg.model.input_size),
    )
    engine.resume()
    if cfg.data.train_shards:
        import webdataset

        loader = build_pose_stream(webdataset, cfg, rank=engine.rank, world_size=engine.world_size)
    else:
        dataset = TopDownDataset.from_config(cfg, split="train")
        if dataset.skipped:
            print(f"[finetune] {cfg.data.train_ann}: skipped {dict(dataset.skipped)}", flush=True)
        loader = ResumableLoader(
            dataset,
            cfg.engine.micro_batch_size,
            rank=engine.rank,
            world_size=engine.world_size,
            seed=cfg.engine.seed,
            num_workers=cfg.data.num_workers,
            pin_memory=engine.device.type == "cuda",
        )
    loss_fn = build_loss(cfg.loss)

    def step_fn(model, batch):
        heatmaps = model(batch["img"])  # [B, K, h, w]
        return loss_fn(heatmaps, batch["heatmaps"], batch["target_weight"]), {}

    hook = EvalHook(cfg, cfg.eval.every_steps) if cfg.data.val_ann else None
    summary = engine.fit(loader, step_fn, hooks=[hook] if hook is not None and hook.every else [])
    print(f"[finetune] {summary['steps']} steps, final loss {summary['final_loss']}", flush=True)

    final: dict = {}
    if hook is not None:
        done = hook.history and hook.history[-1]["step"] == engine.step  # the hook just evaluated this step
        final = hook.history[-1] if done else hook.evaluate(engine, engine.step)
    if engine.is_main:
        out = Path(cfg.engine.run_dir) / "final"
        _save_model(engine.module, out, final)
        print(f"[finetune] final model: {out}", flush=True)
    return final
