"""Load checkpoint files without executing pickled code.

    sd = load_checkpoint_file("sapiens_0.3b_coco_best_coco_AP_796.pth")   # {'state_dict': ..., 'meta': ...}

`.pth` / `.pt` / `.bin` go through `torch.load(weights_only=True)` ALWAYS: torch's restricted
unpickler rebuilds tensors and plain containers and refuses every other global. `.safetensors`
holds no code at all.

mmengine checkpoints (the Sapiens pose `.pth` files) carry a `meta` entry that pickles mmengine
objects (e.g. `mmengine.logging.history_buffer.HistoryBuffer`) and numpy arrays/scalars. We want
the weights without installing mmengine and without trusting the file, so before loading we list
the globals the pickle names (`torch.serialization.get_unsafe_globals_in_checkpoint`, a static scan)
and allow-list each of them for this one load:

- numpy's array/dtype/scalar rebuilders map to the real numpy functions (the ones torch's docs
  suggest allow-listing; they only build arrays);
- every other name maps to `Inert`, a class whose constructor only records its arguments. So a
  pickled `HistoryBuffer` becomes `Inert(qualname='mmengine....HistoryBuffer', ...)`, and a
  malicious `__reduce__` naming e.g. `subprocess.call` builds an `Inert` instead of running it.

torch additionally blocks the modules `os`, `sys`, `posix`, `nt` outright; a file naming them (the
classic `os.system` payload) fails to load, which we report as a `UserError`.
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from sapiens_lite.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)


class Inert:
    """Stands in for a pickled object of a class we don't import: records what the pickle said, does nothing."""

    qualname: str = "?"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"Inert({self.qualname})"


def _inert_class(qualname: str) -> type:
    """A fresh `Inert` subclass per pickled name, so `repr` and `.qualname` say what was replaced."""
    return type("Inert", (Inert,), {"qualname": qualname, "__module__": __name__})


def _numpy_globals() -> dict[str, Any]:
    """Pickle names of numpy's rebuilders (numpy 1 writes `numpy.core`, numpy 2 `numpy._core`) -> objects."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for pkg in ("numpy.core", "numpy._core"):
        out[f"{pkg}.multiarray._reconstruct"] = reconstruct
        out[f"{pkg}.multiarray.scalar"] = scalar
    # numpy >= 1.25 may pickle dtypes through their classes in `numpy.dtypes` (e.g. Float64DType).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            if name.endswith("DType"):
                out[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    return out


def _allow_list(path: Path) -> list[tuple[Any, str]]:
    """(object, pickle name) for every global in the file that torch does not allow by default."""
    if not hasattr(
        torch.serialization, "get_unsafe_globals_in_checkpoint"
    ):  # torch < 2.5: plain weights_only
        return []
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # legacy (pre-zip) torch.save format: no static scan, plain weights_only load
        return []
    numpy_ok = _numpy_globals()
    # All numpy entries, not only the named ones: BUILD checks the *type* of what a rebuilder returned
    # (e.g. `numpy.dtypes.Int64DType` for `numpy.dtype('int64')`), a name the pickle never mentions.
    return [(obj, n) for n, obj in numpy_ok.items()] + [
        (_inert_class(n), n) for n in sorted(names) if n not in numpy_ok
    ]


def load_checkpoint_file(path: str | Path) -> dict:
    """A checkpoint file -> its top-level dict (a state dict, or a container such as `{'state_dict', 'meta'}`).

    Raises `UserError` naming the file when it is missing, of an unknown kind, corrupt, or refused by
    the restricted unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path)
    if suffix not in TORCH_SUFFIXES:
        raise UserError(
            f"{path}: unknown checkpoint file type {suffix!r}; expected one of "
            f"{', '.join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)}"
        )
    try:
        allowed = _allow_list(path)
        with torch.serialization.safe_globals(allowed) if allowed else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        if not _is_zip(path):  # neither torch's zip format nor a readable legacy pickle
            raise UserError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None
        raise UserError(f"{path}: refused by the weights-only unpickler: {_first_line(e)}") from None
    except Exception as e:  # a damaged file can fail anywhere in the unpickler (EOFError, IndexError, ...)
        raise UserError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict at the top level, got {type(obj).__name__}")
    return obj


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _first_line(e: BaseException) -> str:
    """The informative line of an exception (torch's weights_only errors wrap it in boilerplate)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return (useful or lines or [type(e).__name__])[0]
