"""Text corpora for extraction: CPython's ``pydoc_data.topics``, text files, JSON lines, or Hugging Face
datasets (the ``[datasets]`` extra; docs/datasets.md), as a list of documents, the unit of the split.

Dataset files and hub datasets are streamed, and only the rows of a slice (``train[:20000]``) are read.
"""

from __future__ import annotations

import hashlib
import json
import re
from itertools import islice
from pathlib import Path

from njtc_solve.core.errors import NJTCError

__all__ = ["DATASET_FILES", "DEFAULT_CORPUS", "HUB_PREFIX", "corpus_path", "corpus_sha256", "is_dataset",
           "load_corpus"]

DEFAULT_CORPUS = "pydoc_data.topics"
HUB_PREFIX = "hf:"
DATASET_FILES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}  # suffix: datasets' builder
_SAVED = ("dataset_info.json", "state.json")  # what Dataset.save_to_disk writes beside its .arrow files
_EXTRA = "pip install 'njtc_solve[datasets]'"
_SLICE = re.compile(r"(?P<split>.*)\[(?P<start>[0-9]*):(?P<stop>[0-9]*)\]")


def load_corpus(spec: str | None = None, *, text_field: str = "text") -> tuple[str, list[str]]:
    """Load a corpus as a list of documents.

    Parameters
    ----------
    spec : str, optional
        ``"pydoc_data.topics"`` (the default; one document per topic), a ``.txt`` file (one per
        non-empty line), a folder of ``.txt`` files (one per file), a ``.jsonl`` file (one per
        record), or a Hugging Face dataset (one per row): a ``save_to_disk`` folder, a ``.parquet``,
        ``.arrow`` or ``.csv`` file, or ``hf:NAME[:CONFIG][:SPLIT]`` (split default ``train``); a
        dataset may end in a slice such as ``[:20000]``.
    text_field : str
        Field holding the text in each JSON line, or the dataset's text column.

    Returns
    -------
    name : str
        A name for the corpus, recorded in the store.
    documents : list of str
        Non-empty documents in a fixed order.

    Raises
    ------
    NJTCError
        A missing or empty corpus, a record without the text field, a dataset without the extra.

    Examples
    --------
    >>> name, docs = load_corpus()
    >>> name, len(docs) > 50
    ('pydoc_data.topics', True)
    """
    spec = spec or DEFAULT_CORPUS
    if spec == DEFAULT_CORPUS:
        from pydoc_data import topics

        return spec, [topics.topics[key] for key in sorted(topics.topics)]
    if is_dataset(spec):
        return spec, _read_dataset(spec, text_field)
    path = Path(spec)
    if not path.exists():
        raise NJTCError(f"corpus {spec!r} not found (expected a .txt file, a folder, a .jsonl file, a dataset "
                        f"(a save_to_disk folder, .parquet, .arrow, .csv, {HUB_PREFIX}NAME) or {DEFAULT_CORPUS})")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise NJTCError(f"corpus folder {path} has no .txt files")
        docs = [_read_text(f) for f in files]
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path, text_field)
    elif path.suffix == ".txt":
        docs = _read_text(path).splitlines()
    else:
        raise NJTCError(f"corpus {path} must be a .txt file, a folder of .txt files, a .jsonl file or a dataset "
                        f"(a save_to_disk folder, {', '.join(DATASET_FILES)} or {HUB_PREFIX}NAME)")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise NJTCError(f"corpus {path} holds no text")
    return str(path), docs


def _split_slice(text: str) -> tuple[str, slice | None]:
    """``"train[10:20]"`` as ``("train", slice(10, 20))``; a text without a slice as itself and ``None``."""
    found = _SLICE.fullmatch(text)
    if found is None:
        return text, None
    start, stop = (int(found[k]) if found[k] else None for k in ("start", "stop"))
    if start is not None and stop is not None and stop <= start:
        raise NJTCError(f"corpus slice [{found['start']}:{found['stop']}] is empty")
    return found["split"], slice(start, stop)


def _local_dataset(spec: str) -> tuple[Path, slice | None] | None:
    """``(path, slice)`` of a local dataset spec (a save_to_disk folder or a dataset file), else ``None``."""
    head, rows = _split_slice(spec)
    path = Path(head)
    if path.is_dir() and (all((path / name).is_file() for name in _SAVED) or (path / "dataset_dict.json").is_file()):
        return path, rows
    if path.suffix in DATASET_FILES and (path.is_file() or rows is not None):
        return path, rows
    return None


def corpus_path(spec) -> Path:
    """The file or folder a local corpus spec reads (a dataset's ``[:N]`` slice taken off).

    >>> str(corpus_path("data/train.parquet[:100]")), str(corpus_path("notes.txt"))
    ('data/train.parquet', 'notes.txt')
    """
    head, rows = _split_slice(str(spec))
    return Path(head) if rows is not None else Path(spec)


def is_dataset(spec: str) -> bool:
    """Whether ``spec`` names a Hugging Face dataset: ``hf:NAME...``, a save_to_disk folder or a dataset file.

    >>> is_dataset("hf:wikitext:wikitext-2-raw-v1:train[:100]"), is_dataset("notes.txt")
    (True, False)
    """
    return spec.startswith(HUB_PREFIX) or _local_dataset(spec) is not None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise NJTCError(f"a Hugging Face dataset as corpus needs the [datasets] extra: {_EXTRA}") from None
    return datasets


def _open_dataset(spec: str):
    """The rows of a dataset spec, lazily where the source allows (an iterable of dicts), and how to name it."""
    if spec.startswith(HUB_PREFIX):
        body, rows = _split_slice(spec[len(HUB_PREFIX):])  # the slice first: it holds a ':' of its own
        parts = body.split(":")
        if not parts[0] or len(parts) > 3:
            raise NJTCError(f"corpus {spec!r} must be {HUB_PREFIX}NAME, {HUB_PREFIX}NAME:CONFIG or "
                            f"{HUB_PREFIX}NAME:CONFIG:SPLIT")
        name, config, split = (parts + ["", ""])[:3]
        split = split or "train"
        datasets = _datasets()
        try:
            data = datasets.load_dataset(name, config or None, split=split, streaming=True)
        except Exception as err:  # no network, no such dataset, config or split: the library's own words
            raise NJTCError(f"cannot load corpus {spec!r}: {_first_line(err)}") from None
        return data, rows
    path, rows = _local_dataset(spec)
    if not path.exists():
        raise NJTCError(f"corpus {path} not found")
    datasets = _datasets()
    try:
        if path.is_dir():
            if (path / "dataset_dict.json").is_file():
                splits = sorted(p.name for p in path.iterdir() if p.is_dir())
                raise NJTCError(f"corpus {path} holds several splits ({', '.join(splits)}); name one: "
                                f"{path / (splits[0] if splits else 'SPLIT')}")
            if _saved_files(path) == []:  # datasets cannot load a saved empty dataset: say what it is
                raise NJTCError(f"corpus {spec} holds no text (an empty split)")
            data = datasets.load_from_disk(str(path))  # memory-mapped: rows are read as iterated
        else:
            data = datasets.load_dataset(DATASET_FILES[path.suffix], data_files=str(path), split="train",
                                         streaming=True)
    except NJTCError:
        raise
    except Exception as err:  # a damaged or foreign file
        raise NJTCError(f"cannot read corpus {path} as a dataset: {_first_line(err)}") from None
    return data, rows


def _saved_files(path: Path) -> list | None:
    """The data files a save_to_disk folder's ``state.json`` lists (``None`` where it cannot be read)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state.get("_data_files") if isinstance(state, dict) else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _read_dataset(spec: str, text_field: str) -> list[str]:
    """The documents of a dataset: its ``text_field`` of each row (of the slice), non-empty ones."""
    data, rows = _open_dataset(spec)
    columns = getattr(data, "column_names", None)
    if columns is not None and text_field not in columns:
        raise NJTCError(f"corpus {spec} has no column {text_field!r} (its columns: {', '.join(columns)}); "
                        "see `text_field`")
    rows = slice(None) if rows is None else rows
    docs = []
    try:
        for number, record in enumerate(islice(iter(data), rows.start or 0, rows.stop), rows.start or 0):
            if not isinstance(record, dict) or text_field not in record:
                raise NJTCError(f"corpus {spec} has no column {text_field!r} (its columns: "
                                f"{', '.join(record) if isinstance(record, dict) else 'none'}); see `text_field`")
            value = record[text_field]
            if value is None:  # a missing value (a .csv's empty cell): an empty document
                continue
            if not isinstance(value, str):
                raise NJTCError(f"corpus {spec}: row {number} has no string {text_field!r} (see `text_field`)")
            docs.append(value)
    except NJTCError:
        raise
    except Exception as err:  # reading a streamed file or the network failed part way
        raise NJTCError(f"cannot read corpus {spec}: {_first_line(err)}") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise NJTCError(f"corpus {spec} holds no text (an empty split or slice, or empty {text_field!r} values)")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise NJTCError(f"corpus file {path} is not UTF-8 text") from err


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise NJTCError(f"{path}:{number}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise NJTCError(f"{path}:{number}: no string field {text_field!r} (see `text_field`)")
        docs.append(record[text_field])
    return docs


def corpus_sha256(documents: list[str]) -> str:
    """Hash of the documents, so a resumed run can check it reads the same corpus."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
