"""Shortcut maps as torch modules, and their safetensors files (docs/reference/file-formats.md).

A map predicts ``y = norm(x) @ W + bias`` (plus ``x`` when residual), ``W = U @ V`` for narrow
maps; ``norm`` is ``none``, ``batch`` (``(x - norm_mean) * norm_scale``), ``layer`` or ``rms``.
A file holds one method's maps for many source layers (format version 1), or one map shared by
every layer with each layer's batch standardisation (one jump, format version 2).
:class:`ShortcutMap` and :class:`Shortcuts` follow tuned-lens's ``Lens`` conventions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import atomic_output, check_finite, read_safetensors
from njtc_solve.core.head import Head

__all__ = ["FORMAT", "FORMAT_VERSION", "NORMALIZATIONS", "ONE_JUMP_MODES", "ONE_JUMP_VERSION", "ShortcutMap",
           "Shortcuts", "normalize_rows"]

NORMALIZATIONS = ("none", "batch", "layer", "rms")
ROW_NORM_EPS = 1e-5


def normalize_rows(x: torch.Tensor, kind: str, eps: float = ROW_NORM_EPS) -> torch.Tensor:
    """Per-token normalisation without affine parameters: ``"layer"``, ``"rms"`` or ``"none"``."""
    if kind in ("none", "batch"):  # batch standardisation is applied elsewhere
        return x
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    elif kind != "rms":
        raise NJTCError(f"unknown normalization {kind!r}; choose from {', '.join(NORMALIZATIONS)}")
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


FORMAT = "njtc-shortcuts"
FORMAT_VERSION = 1  # a file of per-layer maps
ONE_JUMP_VERSION = 2  # a file whose layers share one map, its tensors once
ONE_JUMP_MODES = ("pooled", "select")
# each map tensor and its shape: d the width, r the rank
_SHAPES = {"weight": "dd", "U": "dr", "V": "rd", "bias": "d", "norm_mean": "d", "norm_scale": "d"}
# the linear map: what training changes (the batch norm's statistics stay fixed), what one-jump layers share
_LINEAR = ("weight", "U", "V", "bias")
_TENSOR_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)\.(" + "|".join(_SHAPES) + ")")
_SHARED_NAME = re.compile(r"shared\.(" + "|".join(_LINEAR) + ")")


class ShortcutMap(nn.Module):
    """One source layer's map to the target layer (``forward(x)`` maps rows ``x``).

    Parameters
    ----------
    weight : Tensor, optional
        ``(d, d)`` full map.
    U, V : Tensor, optional
        ``(d, r)`` and ``(r, d)`` factors of a narrow map.
    bias, norm_mean, norm_scale : Tensor, optional
        ``(d,)`` intercept and the batch normalisation's mean and scale.
    normalize : {"none", "batch", "layer", "rms"}
    residual : bool
        Add the input to the mapped row.

    Without ``weight`` and ``U`` the map is the identity (the logit lens). The tensors are
    buffers; the map computes in their dtype.

    Examples
    --------
    >>> import torch
    >>> narrow = ShortcutMap(U=torch.ones(4, 1), V=torch.ones(1, 4), bias=torch.zeros(4))
    >>> narrow(torch.eye(4)[:1]), narrow.n_params
    (tensor([[1., 1., 1., 1.]]), 8)
    >>> sorted(narrow.state_dict()), sorted(n for n, _ in narrow.trainable().named_parameters())
    (['U', 'V', 'bias'], ['U', 'V', 'bias'])
    """

    def __init__(self, weight=None, U=None, V=None, bias=None, norm_mean=None, norm_scale=None,
                 normalize: str = "none", residual: bool = False):
        super().__init__()
        given = {"weight": weight, "U": U, "V": V, "bias": bias, "norm_mean": norm_mean, "norm_scale": norm_scale}
        for name, value in given.items():
            self.register_buffer(name, value)
        self.normalize, self.residual = normalize, bool(residual)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The map's six tensors by name (``None`` where absent), parameters or buffers alike."""
        return {name: getattr(self, name) for name in _SHAPES}

    @property
    def rank(self) -> int | None:
        """``r`` of a narrow map, ``None`` for a full map or the identity."""
        return None if self.U is None else self.U.shape[1]

    @property
    def n_params(self) -> int:
        """Parameters of the linear map (``d²`` full, ``2dr`` narrow; 0 for the identity)."""
        if self.weight is not None:
            return self.weight.numel()
        if self.U is not None:
            return self.U.numel() + self.V.numel()
        return 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the map computes in: its tensors' (float32 for the identity)."""
        return next((t.dtype for t in self.tensors().values() if t is not None), torch.float32)

    @property
    def width(self) -> int | None:
        """``d`` of the rows the map writes (``None`` for the identity without a bias)."""
        return next((int(t.shape[-1]) for t in (self.weight, self.V, self.bias, self.norm_mean) if t is not None), None)

    def extra_repr(self) -> str:
        kind = "full" if self.weight is not None else f"rank={self.rank}" if self.U is not None else "identity"
        return f"{kind}, normalize={self.normalize!r}, residual={self.residual}"

    def trainable(self) -> ShortcutMap:
        """A copy whose ``weight`` (or ``U`` and ``V``) and ``bias`` are parameters; refused for the identity."""
        if self.weight is None and self.U is None:
            raise NJTCError("the identity map has no parameters to train; start from a fitted map")
        copy = self.to_map(device=None)
        for name in _LINEAR:
            value = copy._buffers.pop(name)
            copy.register_parameter(name, None if value is None else nn.Parameter(value))
        return copy

    def to_map(self, device="cpu") -> ShortcutMap:
        """A detached copy with buffers only (what a shortcut file saves), on ``device`` (``None``: here)."""
        copy = lambda t: None if t is None else t.detach().to(device).clone()
        return ShortcutMap(**{k: copy(t) for k, t in self.tensors().items()}, normalize=self.normalize,
                           residual=self.residual)

    def _normalized(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(self.dtype)
        if self.normalize == "batch":
            return x, (x - self.norm_mean) * self.norm_scale
        return x, normalize_rows(x, self.normalize)

    def predict_with_logits(self, x, head: Head) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y_hat, head logits of y_hat)``; narrow non-residual maps take the low-rank route."""
        if self.U is None or self.residual:
            y = self.predict(x)
            return y, head.logits(y)
        _, z = self._normalized(x)
        a = z @ self.U
        y = a @ self.V if self.bias is None else a @ self.V + self.bias
        return y, head.low_rank_logits(a, self.V, self.bias, y)

    def forward(self, x) -> torch.Tensor:
        """Map source rows ``x`` (n, d) to estimates of the target layer (in the map's dtype)."""
        x, z = self._normalized(x)
        if self.weight is not None:
            y = z @ self.weight
        elif self.U is not None:
            y = (z @ self.U) @ self.V
        else:
            y = z.clone()  # identity ("logit lens")
        if self.bias is not None:
            y = y + self.bias
        return y + x if self.residual else y

    predict = forward


class _LayerMaps(nn.ModuleDict):
    """The maps of :class:`Shortcuts`, keyed by source layer (an int; state_dict names ``maps.{l}.*``)."""

    def __init__(self, maps=None):
        super().__init__()
        self.update(dict(sorted(dict(maps or {}).items())))

    def __setitem__(self, layer, m: ShortcutMap) -> None:
        super().__setitem__(str(int(layer)), m)

    def __getitem__(self, layer) -> ShortcutMap:
        return super().__getitem__(str(int(layer)))

    def __delitem__(self, layer) -> None:
        super().__delitem__(str(int(layer)))

    def __contains__(self, layer) -> bool:
        return isinstance(layer, (int, np.integer)) and str(int(layer)) in self._modules

    def __iter__(self):
        return (int(k) for k in self._modules)

    def keys(self):
        return list(self)

    def items(self):
        return [(int(k), m) for k, m in self._modules.items()]

    def values(self):
        return list(self._modules.values())

    def get(self, layer, default=None):
        return self[layer] if layer in self else default

    def update(self, maps) -> None:
        for layer, m in dict(maps).items():
            self[layer] = m


def _as_head(head) -> Head:
    """``head`` as a :class:`Head`: a Head, an activation store's or live source's, or a model's."""
    if isinstance(head, Head):
        return head
    if callable(getattr(head, "head", None)) and not isinstance(head, nn.Module):
        return head.head()  # ActivationStore, LiveSource
    if isinstance(head, nn.Module):
        return Head.from_model(head)
    raise NJTCError(f"head must be a Head, an ActivationStore or a model, not {type(head).__name__}")


class Shortcuts(nn.Module):
    """Maps of one method for many source layers, with their provenance.

    Parameters
    ----------
    method : str
    maps : dict of int to ShortcutMap
        By source layer.
    target_layer : int
        The layer every map estimates.
    model_sha256, rank, normalize, residual, fit_intercept, alpha, weight, stats, label, provenance
        What a shortcut file records (docs/reference/file-formats.md).
    head : Head, optional
        The head :meth:`forward` applies (not checked; :meth:`attach_head` checks).
    head_sha256 : str
        :meth:`Head.fingerprint` of the head the maps were fitted for (``""``: not recorded).
    head_description : dict
        :meth:`Head.describe` of that head.
    one_jump : {None, "pooled", "select"}
        Set when every layer shares one ``weight`` (or ``U``, ``V``) and ``bias``.

    Examples
    --------
    >>> from njtc_solve import ActivationStore, fit_shortcuts
    >>> [jtc] = fit_shortcuts("activations.h5", method="jtc", ranks=None, progress=False)
    >>> jtc.save("jtc.safetensors")
    >>> with ActivationStore("activations.h5") as store:
    ...     sc = Shortcuts.load("jtc.safetensors", head=store)
    ...     hidden_1 = torch.as_tensor(store.file["hidden/1"][:5])
    >>> sc.name, tuple(sc.transform_hidden(hidden_1, 1).shape), tuple(sc(hidden_1, 1).shape)
    ('jtc', (5, 32), (5, 300))
    """

    def __init__(self, method: str, maps: dict, target_layer: int, *, model_sha256: str = "", rank: int | None = None,
                 normalize: str = "none", residual: bool = False, fit_intercept: bool = True,
                 alpha: float | str = 0.0, weight: str = "none", stats: dict | None = None, label: str = "",
                 provenance: dict | None = None, head: Head | None = None, head_sha256: str = "",
                 head_description: dict | None = None, one_jump: str | None = None):
        super().__init__()
        self.one_jump = one_jump
        self.method, self.maps, self.target_layer, self.model_sha256 = method, maps, int(target_layer), model_sha256
        self.rank, self.normalize, self.residual, self.fit_intercept = rank, normalize, residual, fit_intercept
        self.alpha, self.weight, self.label = alpha, weight, label  # alpha "auto": chosen per layer by GCV
        self.stats, self.provenance = dict(stats or {}), dict(provenance or {})  # provenance: the fit store's
        self.head_sha256, self.head_description = head_sha256, dict(head_description or {})
        self.head = head

    def __setattr__(self, name, value):
        if name == "maps" and not isinstance(value, _LayerMaps):
            value = _LayerMaps(value)
        super().__setattr__(name, value)

    _RECORDED = ("method", "maps", "target_layer", "model_sha256", "rank", "normalize", "residual", "fit_intercept",
                 "alpha", "weight", "stats", "label", "provenance", "head", "head_sha256", "head_description",
                 "one_jump")

    def replace(self, **changes) -> Shortcuts:
        """A new :class:`Shortcuts` with this one's fields (sharing its maps) but ``changes``."""
        new = type(self)(**{**{k: getattr(self, k) for k in self._RECORDED}, **changes})
        new.head = new._on_maps_device(new.head)
        return new

    @classmethod
    def identity(cls, layers, target_layer: int, model_sha256: str = "") -> Shortcuts:
        """The logit lens: every layer's rows are read as if they were the last layer's."""
        return cls("identity", {int(l): ShortcutMap() for l in layers}, target_layer, model_sha256=model_sha256)

    @property
    def name(self) -> str:
        """Short label such as ``njtc-r32``, ``nnjtc-layer-r32``, ``jtc`` or ``njtc-r32-residual``."""
        if self.label:
            return self.label
        parts = [self.method]
        if self.method == "nnjtc":
            parts.append(self.normalize)
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.residual:
            parts.append("residual")
        if self.weight != "none":
            parts.append(f"w{self.weight}")
        if self.one_jump:
            parts.append("onejump" if self.one_jump == "pooled" else "onejump-select")
        return "-".join(parts)

    @property
    def total_params(self) -> int:
        """Every number the maps hold, each tensor once (a shared map once), biases and batch norm included."""
        seen = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t.numel()
                for m in self.maps.values() for t in m.tensors().values() if t is not None}  # views of one tensor: once
        return sum(seen.values())

    def extra_repr(self) -> str:
        return f"{self.name!r}, target_layer={self.target_layer}, head={'attached' if self.head else None}"

    def check_head(self, head) -> None:
        """Refuse another head than the one the maps were fitted for (an unrecorded head passes)."""
        if self.head_sha256 and self.head_sha256 != head.fingerprint():
            raise NJTCError(f"shortcuts {self.name} were fitted for another head (head_sha256 "
                            f"{self.head_sha256[:12]}…, this head's {head.fingerprint()[:12]}…: "
                            f"{json.dumps(head.describe())})")

    def attach_head(self, head) -> Shortcuts:
        """Attach the head :meth:`forward` applies (a Head, a store's or a model's), once checked.

        Raises
        ------
        NJTCError
            When ``head`` is another model's (:meth:`check_head`) or has another width than the maps.
        """
        head = _as_head(head)
        self.check_head(head)
        widths = {m.width for m in self.maps.values()} - {None}
        if widths - {head.d_model}:
            raise NJTCError(f"shortcuts {self.name} map to width {max(widths - {head.d_model})}; the head's is "
                            f"{head.d_model}")
        self.head = self._on_maps_device(head)
        return self

    def _on_maps_device(self, head: Head | None) -> Head | None:
        """``head`` on the device of the maps' tensors (as it is, for maps without tensors)."""
        device = next((t.device for t in self.buffers()), None) or next((t.device for t in self.parameters()), None)
        return head if head is None or device is None else head.to(device)

    def _apply(self, fn, *args, **kwargs):
        """``.to``, ``.cuda`` ... move the attached head with the maps; the head keeps its dtype (float32)."""
        super()._apply(fn, *args, **kwargs)
        if self.one_jump and self.maps:  # each layer's map moved its own copy of the shared tensors: tie them again
            first = self.maps.values()[0]
            for m in self.maps.values():
                for name in _LINEAR:
                    if name in m._buffers and name in first._buffers:
                        m._buffers[name] = first._buffers[name]
        if self.head is not None:
            moved = {f.name: fn(t).to(t.dtype) for f in dataclasses.fields(Head)
                     if isinstance(t := getattr(self.head, f.name), torch.Tensor)}
            self.head = dataclasses.replace(self.head, **moved)
        return self

    def _map(self, idx: int) -> ShortcutMap:
        if idx in self.maps:
            return self.maps[idx]
        if idx == self.target_layer:
            return ShortcutMap()  # the target layer needs no map
        raise NJTCError(f"{self.name} has no map for layer idx={idx} (it has {sorted(self.maps)})")

    def transform_hidden(self, h, idx: int) -> torch.Tensor:
        """Estimate the target layer's hidden states from hidden states ``h`` (..., d) of layer ``idx``."""
        h = torch.as_tensor(h if isinstance(h, torch.Tensor) else np.asarray(h))
        return self._map(idx)(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)

    def forward(self, h, idx: int) -> torch.Tensor:
        """Logits (..., vocab) of hidden states ``h`` (..., d) of layer ``idx``: its map, then the attached head."""
        if self.head is None:
            raise NJTCError(f"shortcuts {self.name} have no head to make logits with: "
                            "Shortcuts.load(path, head=store or model) or sc.attach_head(head)")
        h = torch.as_tensor(h if isinstance(h, torch.Tensor) else np.asarray(h))
        _, logits = self._map(idx).predict_with_logits(h.reshape(-1, h.shape[-1]), self.head)
        return logits.reshape(*h.shape[:-1], -1)

    def save(self, path) -> None:
        """Write the file atomically (temporary name, then rename); a one-jump file's shared map once."""
        f32 = lambda value: value.detach().to(torch.float32).contiguous().cpu()
        shared = self._shared_tensors() if self.one_jump else {}
        tensors = {f"shared.{key}": f32(value) for key, value in shared.items()}
        for layer, m in self.maps.items():
            for key, value in m.tensors().items():
                if value is not None and key not in shared:
                    tensors[f"layers.{layer}.{key}"] = f32(value)
        b = lambda v: "true" if v else "false"
        metadata = {
            "format": FORMAT, "format_version": str(ONE_JUMP_VERSION if self.one_jump else FORMAT_VERSION),
            "method": self.method,
            "rank": "none" if self.rank is None else str(self.rank), "normalize": self.normalize,
            "residual": b(self.residual), "fit_intercept": b(self.fit_intercept), "alpha": str(self.alpha),
            "weight": self.weight, "target_layer": str(self.target_layer), "model_sha256": self.model_sha256,
            "layers": json.dumps(sorted(self.maps)), "stats": json.dumps(self.stats), "label": self.label,
            "provenance": json.dumps(self.provenance), "head": json.dumps(self.head_description),
            "head_sha256": self.head_sha256, **({"one_jump": self.one_jump} if self.one_jump else {}),
        }
        check_finite(tensors, path)  # float32 as written
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def _shared_tensors(self) -> dict[str, torch.Tensor]:
        """The map every layer shares (``weight`` or ``U``, ``V``; ``bias``), refused where the layers' differ."""
        first = self.maps.values()[0].tensors()
        shared = {k: first[k] for k in _LINEAR if first[k] is not None}
        for layer, m in self.maps.items():
            own = m.tensors()
            if any(own[k] is None or not torch.equal(own[k], v) for k, v in shared.items()) or \
                    any(own[k] is not None for k in _LINEAR if k not in shared):
                raise NJTCError(f"shortcuts {self.name} are one_jump, but the map of layer {layer} differs from "
                                "the others: set `one_jump` None to save per-layer maps")
        return shared

    @classmethod
    def load(cls, path, head=None) -> Shortcuts:
        """Read a shortcut file, and attach ``head`` (a Head, a store or a model) when given.

        Raises
        ------
        NJTCError
            A missing, foreign, damaged or inconsistent file; a ``head`` of another model.
        """
        tensors, meta = read_safetensors(path, "shortcut", FORMAT)
        f, parts = _checked(path, tensors, meta)
        maps = {l: ShortcutMap(**p, normalize=f["normalize"], residual=f["residual"]) for l, p in parts.items()}
        sc = cls(maps=maps, **{k: v for k, v in f.items() if k != "layers"})
        return sc if head is None else sc.attach_head(head)

    def save_pretrained(self, folder, *, model: str = "", corpus: str = "", metrics=None, overwrite: bool = False):
        """Write a saved-maps folder (:func:`njtc_solve.maps.hub.save_pretrained`); returns its path."""
        from njtc_solve.maps import hub

        return hub.save_pretrained(self, folder, model=model, corpus=corpus, metrics=metrics, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision: str | None = None, head=None, token=None,
                        cache_dir=None) -> Shortcuts:
        """Maps saved by :meth:`save_pretrained`, from a folder or a hub repository ``owner/name``."""
        from njtc_solve.maps import hub

        return hub.load_pretrained(cls, name_or_path, revision=revision, head=head, token=token, cache_dir=cache_dir)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    commit_message: str | None = None, model: str = "", corpus: str = "", metrics=None) -> str:
        """Upload the :meth:`save_pretrained` folder to the hub repository ``repo_id``; returns the commit's URL."""
        from njtc_solve.maps import hub

        return hub.push_to_hub(self, repo_id, token=token, private=private, commit_message=commit_message,
                               model=model, corpus=corpus, metrics=metrics)


def _checked(path, tensors: dict, meta: dict) -> tuple[dict, dict]:
    """The file's metadata parsed, and its tensors by layer and part, checked against each other."""
    f = _fields(path, meta)
    parts = _layer_parts(path, f, tensors)
    _check_parts(path, f, parts, meta)
    return f, parts


def _invalid(path, problem: str) -> NJTCError:
    return NJTCError(f"{path} is not a valid shortcut file: {problem}")


def _fields(path, meta: dict) -> dict:
    """The metadata of a shortcut file parsed: :class:`Shortcuts`' arguments and ``layers``; absent optional keys at
    their defaults."""
    def field(key, parse, must_be, default=None):
        text = meta.get(key, default)
        if text is None:
            raise _invalid(path, f"its metadata has no {key!r}")
        try:
            return parse(text)
        except (ValueError, KeyError):  # json.JSONDecodeError is a ValueError
            raise _invalid(path, f"metadata {key}={reprlib.repr(text)} is not {must_be}") from None

    version = field("format_version", int, "an integer")
    if version not in (FORMAT_VERSION, ONE_JUMP_VERSION):
        raise NJTCError(f"{path} has shortcut format version {version}; this library reads {FORMAT_VERSION} "
                        f"and {ONE_JUMP_VERSION}")
    one_jump = field("one_jump", _one_of(*ONE_JUMP_MODES), "pooled or select") if version == ONE_JUMP_VERSION \
        else None
    boolean = {"true": True, "false": False}.__getitem__
    return {
        "method": field("method", str, "a string"),
        "layers": field("layers", _layer_list, "a JSON list of distinct layer numbers"),
        "rank": field("rank", _rank, '"none" or a positive integer'),
        "normalize": field("normalize", _one_of(*NORMALIZATIONS), "none, batch, layer or rms"),
        "residual": field("residual", boolean, "true or false"),
        "fit_intercept": field("fit_intercept", boolean, "true or false"),
        "alpha": field("alpha", _alpha, 'a non-negative number or "auto"'),
        "target_layer": field("target_layer", int, "an integer"),
        "weight": field("weight", _one_of("none", "logits"), "none or logits", "none"),
        "model_sha256": meta.get("model_sha256", ""),
        "label": meta.get("label", ""),
        "stats": field("stats", _json_object, "a JSON object", "{}"),
        "provenance": field("provenance", _json_object, "a JSON object", "{}"),
        "head_description": field("head", _json_object, "a JSON object", "{}"),
        "head_sha256": meta.get("head_sha256", ""),
        "one_jump": one_jump,
    }


def _layer_parts(path, f: dict, tensors: dict) -> dict[int, dict]:
    """The file's tensors grouped by listed layer and part; a tensor of another name or layer is refused."""
    parts, shared = {l: {} for l in f["layers"]}, {}
    for name, t in tensors.items():
        match = _TENSOR_NAME.fullmatch(name)
        if f["one_jump"] and _SHARED_NAME.fullmatch(name):
            shared[name.split(".")[1]] = t
            continue
        if match is None:
            raise _invalid(path, f"unexpected tensor {name!r}")
        if int(match[1]) not in parts:
            raise _invalid(path, f"tensor {name} is for a layer that its metadata's layers {f['layers']} omit")
        if f["one_jump"] and match[2] in _LINEAR:
            raise _invalid(path, f"tensor {name}: a one-jump file holds {match[2]} once, as shared.{match[2]}")
        parts[int(match[1])][match[2]] = t
    if f["one_jump"]:
        if not shared:
            raise _invalid(path, "it is a one-jump file without a shared map (no shared.* tensors)")
        for got in parts.values():  # every layer holds the same tensor objects: one map, shared
            got.update(shared)
    return parts


def _check_parts(path, f: dict, parts: dict, meta: dict) -> None:
    """Each layer holds the parts its rank and normalisation need, of one width ``d`` and rank, finite float32."""
    needed = {"weight"} if f["rank"] is None else {"U", "V"}
    needed |= {"norm_mean", "norm_scale"} if f["normalize"] == "batch" else set()
    sizes = {"r": (f["rank"], "its metadata's rank")}  # symbol: (size, its source); d from the first tensor
    for layer, got in parts.items():
        if not got:
            raise _invalid(path, f"layer {layer} is listed in its metadata but has no tensors")
        if not needed <= got.keys() <= needed | {"bias"}:
            raise _invalid(path, f"layer {layer} has {', '.join(got)}; rank={meta['rank']} and "
                                 f"normalize={f['normalize']} need {', '.join(sorted(needed))} (and optionally bias)")
        for part, t in got.items():
            name, dims = f"layers.{layer}.{part}", _SHAPES[part]
            if t.dim() == len(dims):
                for s, n in zip(dims, t.shape):
                    sizes.setdefault(s, (n, name))
            expected = [sizes.get(s, (s,))[0] for s in dims]
            if list(t.shape) != expected:
                known = ", ".join(f"{s}={sizes[s][0]} from {sizes[s][1]}" for s in sorted(set(dims)) if s in sizes)
                raise _invalid(path, f"tensor {name} has shape {tuple(t.shape)}, not "
                                     f"{' × '.join(map(str, expected))} ({known})")
            if t.dtype != torch.float32 or not torch.isfinite(t).all():
                raise _invalid(path, f"tensor {name} is not finite float32")


def _valid(parse, ok):
    """A parser of metadata text: ``parse``, then ValueError unless ``ok`` of the value."""
    def read(text: str):
        value = parse(text)
        if not ok(value):
            raise ValueError(text)
        return value
    return read


_layer_list = _valid(json.loads, lambda v: isinstance(v, list) and all(type(l) is int for l in v)
                     and len(set(v)) == len(v))
_rank = _valid(lambda text: None if text == "none" else int(text), lambda rank: rank is None or rank >= 1)
_alpha = _valid(lambda text: text if text == "auto" else float(text),
                lambda alpha: alpha == "auto" or (math.isfinite(alpha) and alpha >= 0))
_json_object = _valid(json.loads, lambda value: isinstance(value, dict))
_one_of = lambda *options: _valid(str, lambda text: text in options)
