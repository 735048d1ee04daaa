"""Carry fitted maps to the Jacobian-lens format of TransformerLens, and read Jacobian lenses as maps.

``python -m njtc_solve.export --format jacobian-lens --shortcuts jtc.safetensors --out jtc-jlens``
writes ``lens.pt`` (and ``njtc.json``, this project's mark), which TransformerLens 3.x loads with
``JacobianLens.from_pretrained("jtc-jlens", model=bridge)``. The format is one ``torch.save`` dict::

    {"J": {l: Tensor[d, d]}, "n_prompts": int, "source_layers": [l, ...], "d_model": d,
     "metadata": {...}}                      # metadata: optional, additive (TransformerLens)

``J[l]`` maps the output of block ``l`` to the last block's output before the final norm, as
``J @ h`` (no bias), read through the final norm and unembedding. Our layer ``l ≥ 1`` is the
output of block ``l - 1``, so our map from layer ``l`` is ``J[l - 1] = Wᵀ``; layer 0 has no place.
Exported are linear maps to the last layer without a bias or normalisation (full, narrow,
residual; ``--no-intercept``). :func:`read_jacobian_lens` reads such a file (ours,
TransformerLens's or a published one) as full maps (method ``jacobian-lens``), for
``evaluate --jacobian-lens`` and ``lens --jacobian-lens``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch import nn

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.outputs import FolderKind, atomic_folder, check_finite
from njtc_solve.maps.compatibility import check_compatible
from njtc_solve.maps.lens_files import check_lens_output, check_recorded_model, check_tensor, load_torch
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

__all__ = ["FILENAME", "JACOBIAN_LENS_FILES", "METHOD", "check_exportable", "check_output_folder",
           "export_jacobian_lens", "find_lens_file", "jacobians", "read_jacobian_lens"]

METHOD = "jacobian-lens"
FILENAME = "lens.pt"  # JacobianLens.from_pretrained's default file inside a folder
SIDECAR = "njtc.json"  # the mark that this project wrote the folder (read without loading the lens)
JACOBIAN_LENS_FILES = (FILENAME, SIDECAR)  # what an export writes
MARKER = "njtc-jacobian-lens"
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# an export folder: its njtc.json marks the files this project wrote there
JACOBIAN_LENS_KIND = FolderKind("a Jacobian lens", SIDECAR, lambda c: c.get("format") == MARKER,
                                JACOBIAN_LENS_FILES, shared=True)


def jacobians(shortcuts: Shortcuts) -> dict[int, torch.Tensor]:
    """The format's ``J`` of ``shortcuts``: ``{l - 1: Wᵀ}`` for each map from layer ``l ≥ 1``, float32.

    Raises
    ------
    NJTCError
        For a map with a bias, behind a normalisation or the identity; for maps from layer 0 alone.

    Examples
    --------
    >>> import torch
    >>> w = torch.arange(9.0).reshape(3, 3)
    >>> sc = Shortcuts("jtc", {0: ShortcutMap(weight=w), 2: ShortcutMap(weight=w)}, 3, fit_intercept=False)
    >>> J = jacobians(sc)
    >>> sorted(J), bool(torch.equal(J[1], w.T))
    ([1], True)
    """
    out = {}
    for layer, m in sorted(shortcuts.maps.items()):
        if m.normalize != "none":
            raise NJTCError(f"the map of layer {layer} sits behind a {m.normalize} norm, which the Jacobian-lens "
                            "format (one linear map J per layer) cannot hold; export maps fitted with normalize none")
        if m.bias is not None and bool((m.bias != 0).any()):
            raise NJTCError(f"the map of layer {layer} has a bias, which the Jacobian-lens format (J·h, no bias) "
                            "cannot hold; fit without an intercept (`fit_intercept=False`) to export it")
        if m.weight is not None:
            weight = m.weight.detach().cpu()
        elif m.U is not None:
            weight = m.U.detach().cpu() @ m.V.detach().cpu()
        else:
            raise NJTCError(f"the map of layer {layer} is the identity: the logit lens, J = I; there is nothing to "
                            "export")
        weight = weight.to(torch.float32)
        if m.residual:
            weight = weight + torch.eye(weight.shape[0], dtype=torch.float32)
        if layer >= 1:  # our layer l is the output of block l - 1
            out[layer - 1] = weight.T.contiguous()
    if not out:
        raise NJTCError(f"shortcuts {shortcuts.name} have maps from layer 0 only (the embeddings), which the "
                        "Jacobian-lens format (block outputs 0..L-2) has no place for")
    return out


def check_exportable(shortcuts: Shortcuts) -> dict[int, torch.Tensor]:
    """Refuse maps the Jacobian-lens format cannot hold; their ``J`` (:func:`jacobians`) when it can.

    The maps must target the last layer and be linear without a bias. Needs no model.
    """
    check_compatible(shortcuts)
    if shortcuts.method == "identity":
        raise NJTCError("the identity is the logit lens (J = I); there is nothing to export")
    return jacobians(shortcuts)


def check_output_folder(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an export folder that cannot be written, holds a lens (without ``overwrite``) or foreign files."""
    return check_lens_output(out, overwrite, FILENAME, JACOBIAN_LENS_KIND)


def export_jacobian_lens(shortcuts: Shortcuts | str | Path, out: str | Path, *, model: nn.Module | None = None,
                         overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``shortcuts`` as a Jacobian-lens folder (``lens.pt``) that TransformerLens loads.

    Parameters
    ----------
    shortcuts : path or Shortcuts
        Linear maps to the last layer without a bias.
    out : path
        The folder (created; its parent must exist).
    model : transformers causal LM, optional
        The model the maps were fitted on: checked, and its name recorded.
    overwrite : bool
        Replace a lens exported before.
    dtype : torch.dtype
        Storage dtype of ``J``: float32 (read back bit-exact), float16 or bfloat16.

    Returns
    -------
    Path

    Examples
    --------
    >>> from njtc_solve import fit_shortcuts
    >>> [jtc] = fit_shortcuts("activations.h5", method="jtc", ranks=None, fit_intercept=False, progress=False)
    >>> folder = export_jacobian_lens(jtc, "jtc-jlens", model=model)
    >>> sorted(p.name for p in folder.iterdir())
    ['lens.pt', 'njtc.json']
    >>> payload = torch.load(folder / "lens.pt", weights_only=True)
    >>> payload["source_layers"], payload["d_model"], payload["J"][0].dtype
    ([0, 1], 32, torch.float32)
    """
    if dtype not in STORAGE_DTYPES:
        raise NJTCError(f"`dtype` must be float32, float16 or bfloat16, not {dtype}")
    shortcuts = shortcuts if isinstance(shortcuts, Shortcuts) else Shortcuts.load(shortcuts)
    out = check_output_folder(out, overwrite=overwrite)
    J = check_exportable(shortcuts)  # before anything is written
    d = next(iter(J.values())).shape[0]
    name = ""
    if model is not None:
        check_compatible(shortcuts, model)
        name = str(getattr(model.config, "name_or_path", "") or "")
    ours = {"format": MARKER, "format_version": 1, "method": shortcuts.method, "name": shortcuts.name,
            "model": name, "model_sha256": shortcuts.model_sha256, "head_sha256": shortcuts.head_sha256,
            "layers": sorted(shortcuts.maps), "exported_layers": [j + 1 for j in sorted(J)],
            "target_layer": shortcuts.target_layer, "rank": shortcuts.rank, "residual": shortcuts.residual,
            "provenance": json.dumps(shortcuts.provenance), "stats": json.dumps(shortcuts.stats)}
    metadata = {"target_layer": shortcuts.target_layer - 1,  # the last block, in the format's numbering
                "estimator": f"njtc_solve:{shortcuts.method}", "njtc": ours}
    # n_prompts 0: least-squares fits over rows, not a mean over prompts
    check_finite({f"J[{j}]": m for j, m in J.items()}, out / FILENAME, dtype)  # float16 overflows past 65504
    payload = {"J": {j: m.to(dtype) for j, m in sorted(J.items())}, "n_prompts": 0,
               "source_layers": sorted(J), "d_model": d, "metadata": metadata}
    with atomic_folder(out, JACOBIAN_LENS_KIND) as tmp:
        (tmp / SIDECAR).write_text(json.dumps({k: ours[k] for k in ("format", "method", "name", "model",
                                                                      "model_sha256", "exported_layers")},
                                              indent=1) + "\n")
        torch.save(payload, tmp / FILENAME)
    return out


def find_lens_file(path: str | Path) -> Path:
    """The lens file of ``path``: the file itself, or a folder's ``lens.pt`` (else its one ``*.pt``).

    Raises
    ------
    NJTCError
        A missing path, or a folder with no ``lens.pt`` and not exactly one ``.pt`` file.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise NJTCError(f"Jacobian lens {path} not found")
    if (path / FILENAME).is_file():
        return path / FILENAME
    candidates = sorted(p for p in path.glob("*.pt") if p.is_file())
    if len(candidates) != 1:
        raise NJTCError(f"{path} is not a Jacobian-lens folder (it needs {FILENAME}"
                        + (f"; it has {len(candidates)} .pt files" if candidates else "") + ")")
    return candidates[0]


def _unreadable(path: Path, problem: str) -> NJTCError:
    return NJTCError(f"{path} is not a Jacobian lens this library reads: {problem}")


def _load_payload(file: Path) -> dict:
    """The checked ``torch.load`` of a lens file: ``J`` square finite float matrices of width ``d_model``."""
    payload = load_torch(file, partial(_unreadable, file), "it")
    if not isinstance(payload, dict) or not isinstance(payload.get("J"), dict):
        found = sorted(map(str, payload))[:6] if isinstance(payload, dict) else type(payload).__name__
        raise _unreadable(file, f"no 'J' dict of matrices (found {found})")
    d = payload.get("d_model")
    if type(d) is not int or d < 1:
        raise _unreadable(file, "d_model is not a positive integer")
    if not payload["J"]:
        raise _unreadable(file, "J holds no layer")
    for layer, matrix in payload["J"].items():
        if type(layer) is not int or layer < 0:
            raise _unreadable(file, f"J has key {layer!r}, not a layer number")
        check_tensor(matrix, f"J[{layer}]", (d, d), partial(_unreadable, file), " from d_model")
    layers = payload.get("source_layers", sorted(payload["J"]))
    if not isinstance(layers, (list, tuple)) or sorted(layers) != sorted(payload["J"]):
        raise _unreadable(file, f"source_layers {layers!r} disagree with J's layers {sorted(payload['J'])}")
    n_prompts = payload.get("n_prompts", 0)
    if type(n_prompts) is not int or n_prompts < 0:
        raise _unreadable(file, "n_prompts is not a non-negative integer")
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _unreadable(file, f"metadata is a {type(metadata).__name__}, not a dict")
    if "target_layer" in metadata and type(metadata["target_layer"]) is not int:
        raise _unreadable(file, "metadata's target_layer is not an integer")
    if not isinstance(metadata.get("njtc", {}), dict):
        raise _unreadable(file, "metadata's njtc entry is not a dict")
    payload["metadata"] = metadata
    return payload


def _own_record(file: Path, metadata: dict) -> dict:
    """What an export of this project recorded (``metadata["njtc"]``), checked; ``{}`` for other lenses."""
    ours = metadata.get("njtc", {})
    if ours.get("format") != MARKER:
        return {}
    try:
        provenance = json.loads(ours.get("provenance", "{}"))
        stats = json.loads(ours.get("stats", "{}"))
    except (TypeError, ValueError):
        raise _unreadable(file, "its njtc record's provenance or stats is not JSON") from None
    if not isinstance(provenance, dict) or not isinstance(stats, dict) or not isinstance(
            ours.get("model_sha256", ""), str):
        raise _unreadable(file, "its njtc record is damaged")
    return {**ours, "provenance": provenance, "stats": stats}


def read_jacobian_lens(path: str | Path, *, head: Head | None = None, n_layers: int | None = None,
                       model_sha256: str = "") -> Shortcuts:
    """Read a Jacobian-lens file or folder as full maps ``h · J[j]ᵀ`` from layer ``j + 1`` (method
    ``jacobian-lens``).

    Parameters
    ----------
    path : path
        A ``.pt`` lens file, or a folder holding ``lens.pt`` (or one ``*.pt``).
    head : Head, optional
        The head the lens will be read through: of width ``d_model``.
    n_layers : int, optional
        That model's layer count ``L``: the lens's layers must be block outputs ``0..L-2`` and
        its target block ``L - 1``. Without it the target is the recorded one, else one past the
        last block of the lens.
    model_sha256 : str
        The weights' hash of that model, recorded in the maps; an export's other hash is refused.

    Returns
    -------
    Shortcuts
        One float32 full map per lens layer; a lens this project exported gets its provenance back.

    Raises
    ------
    NJTCError
        A missing, truncated or foreign file, a wrong shape, a non-finite entry, layers outside
        the model, another model's hash or width.

    Examples
    --------
    >>> import torch
    >>> w = torch.randn(32, 32)
    >>> sc = Shortcuts("jtc", {1: ShortcutMap(weight=w), 2: ShortcutMap(weight=w)}, 3, fit_intercept=False)
    >>> back = read_jacobian_lens(export_jacobian_lens(sc, "jlens"), n_layers=3)
    >>> back.name, sorted(back.maps), bool(torch.equal(back.maps[1].weight, w))
    ('jacobian-lens', [1, 2], True)
    """
    file = find_lens_file(path)
    payload = _load_payload(file)
    d, metadata = payload["d_model"], payload["metadata"]
    ours = _own_record(file, metadata)
    if head is not None and head.d_model != d:
        raise NJTCError(f"the Jacobian lens {file} has width {d}; the model's is {head.d_model}")
    # the format's convention (the published lenses record none): the model's last block
    last_block = metadata.get("target_layer", max(payload["J"]) + 1 if n_layers is None else n_layers - 1)
    if n_layers is not None:
        outside = sorted(j for j in payload["J"] if j >= n_layers - 1)
        if outside:
            raise NJTCError(f"the Jacobian lens {file} has block outputs {outside}, outside the model's source blocks "
                            f"0..{n_layers - 2}: another model's lens")
        if last_block != n_layers - 1:
            raise NJTCError(f"the Jacobian lens {file} targets block {last_block}, not the model's last block "
                            f"({n_layers - 1})")
    if max(payload["J"]) >= last_block:
        raise _unreadable(file, f"layer {max(payload['J'])} is not below its target block {last_block}")
    recorded = ours.get("model_sha256", "")
    check_recorded_model(recorded, model_sha256, f"the Jacobian lens in {file}")
    maps = {j + 1: ShortcutMap(weight=matrix.to(torch.float32).T.contiguous())
            for j, matrix in sorted(payload["J"].items())}
    provenance = dict(ours.get("provenance", {}))
    provenance.update({"jacobian_lens": str(path), "base_model": ours.get("model") or metadata.get("model_name")})
    return Shortcuts(METHOD, maps, last_block + 1, model_sha256=model_sha256 or recorded, fit_intercept=False,
                     label=METHOD, provenance=provenance,
                     stats={"n_layers": n_layers if n_layers is not None else last_block + 1})
