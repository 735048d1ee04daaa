"""What the tuned-lens and Jacobian-lens folders share: the export folder's check and the reading of torch files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import FolderKind, check_folder_output

__all__ = ["check_lens_output", "check_recorded_model", "check_tensor", "load_torch"]


def check_lens_output(out, overwrite: bool, weights: str, kind: FolderKind) -> Path:
    """Refuse an export folder that cannot be written, that holds a lens exported before (without
    ``overwrite``), or whose files this project did not write."""
    out = Path(out)
    if not overwrite and (out / weights).is_file() and kind.is_own(out):
        raise NJTCError(f"{out} already holds a lens; pass `overwrite=True` to replace it")
    return check_folder_output(out, "`out`", kind.names, kind)


def load_torch(file: Path, unreadable: Callable[[str], NJTCError], what: str):
    """``torch.load(file, weights_only=True)`` on the CPU; an unreadable file is refused as ``what``."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: a truncated or foreign file
        raise unreadable(f"{what} cannot be read ({type(err).__name__})") from None


def check_tensor(value, name: str, shape: tuple, unreadable: Callable[[str], NJTCError], source: str = "") -> None:
    """Refuse ``value`` unless it is a finite floating-point tensor of ``shape`` (``source``: where it comes from)."""
    if not isinstance(value, torch.Tensor):
        raise unreadable(f"{name} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != shape:
        raise unreadable(f"{name} has shape {tuple(value.shape)}, expected {shape}{source}")
    if not value.is_floating_point() or not torch.isfinite(value).all():
        raise unreadable(f"{name} is not finite floating point")


def check_recorded_model(recorded: str, model_sha256: str, lens: str) -> None:
    """Refuse a lens whose export recorded another model's weights' hash than ``model_sha256``."""
    if recorded and model_sha256 and recorded != model_sha256:
        raise NJTCError(f"{lens} was fitted on another model (model_sha256 differs)")
