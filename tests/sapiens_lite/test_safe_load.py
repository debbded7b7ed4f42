"""`load_checkpoint_file` reads weights without executing pickled code.

Contract: `.pth`/`.pt`/`.bin` always go through `torch.load(weights_only=True)`; an mmengine-style
`meta` (classes of a package that is not installed, numpy arrays/dtypes/scalars) loads with the
unknown objects replaced by inert placeholders; a file whose pickle would run code either loads with
that object neutralised or raises `UserError` -- the code never runs. Unreadable files -> `UserError`
naming the file.
"""

from __future__ import annotations

import argparse
import builtins
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sapiens_lite.convert.safe_load import Inert, load_checkpoint_file
from sapiens_lite.errors import UserError

FAKE_MODULES = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")


def _history_buffer_init(self):
    self._log_history = np.arange(4, dtype=np.float64)
    self._count_history = np.ones(4, dtype=np.int64)
    self.max_length = 1000000


# Stand-in for mmengine.logging.history_buffer.HistoryBuffer, defined in (and pickled under) that module name.
HistoryBuffer = type(
    "HistoryBuffer", (), {"__module__": "mmengine.logging.history_buffer", "__init__": _history_buffer_init}
)


def _save_with_fake_mmengine(obj, path, monkeypatch):
    """torch.save while a fake `mmengine.logging.history_buffer` module exists (as when Sapiens saved it)."""
    assert importlib.util.find_spec("mmengine") is None, "the test needs mmengine NOT installed"
    with monkeypatch.context() as m:
        for name in FAKE_MODULES:
            m.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
        torch.save(obj, path)
    assert "mmengine" not in sys.modules


def test_mmengine_meta_loads_without_mmengine(tmp_path, monkeypatch):
    weights = {"backbone.pos_embed": torch.randn(1, 12, 8), "head.final_layer.bias": torch.randn(17)}
    meta = {
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}},
        "epoch": 210,
        "dataset_meta": {"flip_indices": np.array([0, 2, 1]), "sigmas": np.float32(0.025)},
        "dtype": np.dtype("float32"),
        "seed": np.int64(42),
    }
    path = tmp_path / "sapiens_pose.pth"
    _save_with_fake_mmengine({"state_dict": weights, "meta": meta}, path, monkeypatch)

    ckpt = load_checkpoint_file(path)

    assert "mmengine" not in sys.modules
    for k, v in weights.items():
        torch.testing.assert_close(ckpt["state_dict"][k], v)
    hb = ckpt["meta"]["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(hb, Inert) and hb.qualname == "mmengine.logging.history_buffer.HistoryBuffer"
    np.testing.assert_array_equal(hb.state["_log_history"], np.arange(4, dtype=np.float64))
    np.testing.assert_array_equal(ckpt["meta"]["dataset_meta"]["flip_indices"], [0, 2, 1])
    assert ckpt["meta"]["dataset_meta"]["sigmas"] == np.float32(0.025)
    assert ckpt["meta"]["dtype"] == np.dtype("float32") and ckpt["meta"]["seed"] == 42
    # the allow-list was for that one load only
    with pytest.raises(Exception, match="HistoryBuffer"):
        torch.load(path, weights_only=True)


def test_argparse_namespace_of_mae_checkpoints_is_inert(tmp_path):
    path = tmp_path / "mae.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-3), "epoch": 799}, path)
    ckpt = load_checkpoint_file(path)
    assert isinstance(ckpt["args"], Inert) and ckpt["args"].qualname == "argparse.Namespace"
    torch.testing.assert_close(ckpt["model"]["w"], torch.ones(2))


class _OsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _BuiltinsExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_os_system_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": _OsSystem(marker)}, path)
    with pytest.raises(UserError, match="evil.pth.*(posix|nt|os)"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_exec_payload_is_neutralised(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": _BuiltinsExec(marker)}, path)
    ckpt = load_checkpoint_file(path)
    assert not marker.exists()
    assert isinstance(ckpt["meta"], Inert) and ckpt["meta"].qualname == "builtins.exec"
    torch.testing.assert_close(ckpt["state_dict"]["w"], torch.ones(1))


def test_always_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    torch.save({"w": torch.ones(1)}, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint_file(path)
    assert calls == [True]


def test_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(3.0)}, path)
    torch.testing.assert_close(load_checkpoint_file(path)["a"], torch.arange(3.0))


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.pth", b"this is not a checkpoint" * 10),
        ("empty.pt", b""),
        ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
    ],
)
def test_corrupt_file_is_a_user_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=name):
        load_checkpoint_file(path)


def test_truncated_zip_is_a_user_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(UserError, match="cut.pth"):
        load_checkpoint_file(path)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(UserError, match="nope.pth: no such checkpoint file"):
        load_checkpoint_file(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UserError, match="w.npz: unknown checkpoint file type"):
        load_checkpoint_file(tmp_path / "w.npz")
