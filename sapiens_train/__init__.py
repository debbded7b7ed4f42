"""The training machinery every trainer shares: one DeepSpeed engine, checkpoints, schedules, logs,
the streaming (webdataset) and map-style loaders, shard packing, the procedural people, COCO readers.

    from sapiens_train.engine import Engine
    engine = Engine(build_model, cfg.engine, cfg.optim, param_groups=groups_fn, config_to_save=cfg, resume=True)
    summary = engine.fit(loader, step_fn, hooks=[...])

DeepSpeed and webdataset are imported where they are used, like any library. DeepSpeed fixes its
accelerator when it is first imported: `sapiens_train.dist`, imported before it, sets `DS_ACCELERATOR=cpu`
on a machine whose torch sees no GPU. Importing this package loads nothing (no torch, no recipe); the
modules are imported on demand, so `sapiens data --help` stays instant.
"""
