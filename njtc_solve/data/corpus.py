"""Text corpora for extraction: CPython's ``pydoc_data.topics``, text files, or JSON lines.

A corpus is a list of documents, the unit of the train/validation split: a pydoc topic, a
non-empty line of a ``.txt`` file, a file of a folder of ``.txt`` files, or a record of a
``.jsonl`` file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from njtc_solve.core.errors import NJTCError

__all__ = ["DEFAULT_CORPUS", "corpus_sha256", "load_corpus"]

DEFAULT_CORPUS = "pydoc_data.topics"


def load_corpus(spec: str | None = None, *, text_field: str = "text") -> tuple[str, list[str]]:
    """Load a corpus as a list of documents.

    Parameters
    ----------
    spec : str, optional
        ``"pydoc_data.topics"`` (the default: CPython's own documentation topics, real
        English every Python ships; one document per topic), a ``.txt`` file (one document
        per non-empty line), a folder of ``.txt`` files (one document per file), or a
        ``.jsonl`` file (one document per record).
    text_field : str
        Field holding the text in each JSON line.

    Returns
    -------
    name : str
        A name for the corpus, recorded in the store.
    documents : list of str
        Non-empty documents in a fixed order.
    """
    spec = spec or DEFAULT_CORPUS
    if spec == DEFAULT_CORPUS:
        from pydoc_data import topics

        return spec, [topics.topics[key] for key in sorted(topics.topics)]
    path = Path(spec)
    if not path.exists():
        raise NJTCError(f"corpus {spec!r} not found (expected a .txt file, a folder, a .jsonl file or {DEFAULT_CORPUS})")
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
        raise NJTCError(f"corpus {path} must be a .txt file, a folder of .txt files or a .jsonl file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise NJTCError(f"corpus {path} holds no text")
    return str(path), docs


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
