"""Temporary hyperparameter sweep for the tiny CPU config (plain torch loop; not part of the project)."""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch

OUT = os.environ.get("OUT", "/tmp/out")
BASE = "configs/finetune/tiny_cpu_coco17.yaml"
DATA = ["data.train_ann=/tmp/d/train/annotations.json", "data.train_images=/tmp/d/train/images",
        "data.val_ann=/tmp/d/val/annotations.json", "data.val_images=/tmp/d/val/images", "data.num_workers=2"]
VARIANTS = {
    "DE": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]"],
    "DE_lr2e-3": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]", "optim.lr=2e-3"],
    "DE_lr5e-4": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]", "optim.lr=5e-4"],
    "DE_embed192": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]", "model.backbone.embed_dim=192", "model.backbone.num_heads=6"],
    "DE_mildaug": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=15", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.8,1.2]"],
    "DE_1200": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]", "engine.total_steps=1200"],
    "DE_300": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]", "engine.total_steps=300"],
    "DE_vp128": ["model.head.kind=vitpose", "model.head.channels=128", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]"],
    "DE_people1": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]", "data.train_ann=/tmp/d1/train/annotations.json", "data.train_images=/tmp/d1/train/images"],
    "DE_wd0": ["model.head.kind=vitpose", "model.head.channels=64", "data.augment.rotate_factor=0", "data.augment.half_body_prob=0", "data.augment.scale_range=[0.9,1.1]", "optim.weight_decay=0.0", "optim.warmup_steps=20"],
}

def run(name):
    from finetune.config import FinetuneConfig
    from finetune.data import TopDownDataset
    from finetune.evaluate import evaluate_model
    from finetune.losses import build_loss
    from sapiens_lite.config import load_config
    from sapiens_lite.models.pose import PoseModel
    from sapiens_lite.training.optim import param_groups
    from sapiens_lite.training.schedule import lr_at
    torch.manual_seed(0)
    cfg = load_config(FinetuneConfig, [BASE], DATA + VARIANTS[name])
    dev = torch.device("cuda")
    model = PoseModel(cfg.model).to(dev)
    groups = param_groups(model, cfg.optim.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
    ds = TopDownDataset.from_config(cfg)
    loss_fn = build_loss(cfg.loss)
    total = cfg.engine.total_steps
    step, epoch, res = 0, 0, []
    t0 = time.time()
    while step < total:
        ds.set_epoch(epoch)
        g = torch.Generator().manual_seed(epoch)
        dl = torch.utils.data.DataLoader(ds, batch_size=cfg.engine.micro_batch_size, shuffle=True, drop_last=True,
                                         num_workers=2, generator=g)
        for b in dl:
            lr = lr_at(step, cfg.optim, cfg.optim.lr, total)
            for gr in opt.param_groups:
                gr["lr"] = lr * gr.get("lr_scale", 1.0)
            out = model(b["img"].to(dev))
            loss = loss_fn(out, b["heatmaps"].to(dev), b["target_weight"].to(dev))
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
            step += 1
            if step % 300 == 0 or step == total:
                model.eval()
                m = evaluate_model(model, cfg.data.val_ann, cfg.data.val_images, cfg.eval, device=dev, progress=False)
                model.train()
                res.append({"step": step, "loss": float(loss), "AP": m["AP"], "AP50": m["AP50"], "PCK": m["PCK@0.05"], "t": time.time() - t0})
                print(name, res[-1], flush=True)
                json.dump(res, open(f"/tmp/res_{name}.json", "w"))
            if step >= total:
                break
        epoch += 1
    return name, res

if __name__ == "__main__" and len(sys.argv) > 1:
    torch.set_num_threads(1)
    name, res = run(sys.argv[1])
    json.dump(res, open(f"/tmp/res_{name}.json", "w"))
elif __name__ == "__main__":
    from sapiens_lite.data.synth import synthesize
    synthesize("/tmp/d/train", 1000, seed=0, size=(256, 192), scheme="coco17", people=(1, 2), workers=12, progress=False)
    synthesize("/tmp/d1/train", 1000, seed=0, size=(256, 192), scheme="coco17", people=(1, 1), workers=12, progress=False)
    synthesize("/tmp/d/val", 100, seed=1001, size=(256, 192), scheme="coco17", people=(1, 2), workers=12, progress=False)
    # untrained
    from finetune.config import FinetuneConfig
    from finetune.evaluate import evaluate_model
    from sapiens_lite.config import load_config
    from sapiens_lite.models.pose import PoseModel
    cfg = load_config(FinetuneConfig, [BASE], DATA)
    torch.manual_seed(0)
    m0 = evaluate_model(PoseModel(cfg.model).eval(), cfg.data.val_ann, cfg.data.val_images, cfg.eval, progress=False)
    print("untrained", m0["AP"], m0["PCK@0.05"], flush=True)
    import subprocess
    procs = {n: subprocess.Popen([sys.executable, __file__, n]) for n in VARIANTS}
    deadline = time.time() + float(os.environ.get("SWEEP_SECONDS", "330"))
    for p in procs.values():
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
    results = {}
    for n in VARIANTS:
        try:
            results[n] = json.load(open(f"/tmp/res_{n}.json"))
        except Exception as e:
            results[n] = str(e)
    json.dump({"untrained": m0, **results}, open(os.path.join(OUT, "sweep.json"), "w"), indent=1)
