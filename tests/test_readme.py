"""The README and the docs pages are examples that run, and links that resolve.

Every page's Python code blocks are doctests (``>>>``), executed here on a tiny random Llama in a
fresh folder holding ``activations.h5`` (a store of that model; an empty folder for a page that
extracts its own), with ``MODEL`` (its folder),
``model``, ``tokenizer`` and ``documents`` in the namespace, as the docstring examples have (see
``njtc_solve/conftest.py``). The Python API page's walkthrough (store → fit → save → load →
transform_hidden → logits → lens trajectory, then the estimator on data it makes itself) is
checked to keep its steps. Shell blocks are not run."""

from __future__ import annotations

import doctest
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
README_LIMIT = 15_000  # characters: a README that fits a screen, the rest in docs/


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _fences(text: str) -> list[tuple[str, str]]:
    """Every fenced code block of a Markdown text: (its info string, its body)."""
    return re.findall(r"^```([^\n`]*)\n(.*?)^```\s*$", text, flags=re.M | re.S)


def _doctest(page: Path, globs: dict) -> doctest.DocTest:
    """The page as one doctest, its code fences blanked (a fence is no expected output)."""
    text = re.sub(r"^```.*$", "", page.read_text(encoding="utf-8"), flags=re.M)
    return doctest.DocTestParser().get_doctest(text, globs, _name(page), str(page), 0)


@pytest.fixture(scope="module")
def page_namespace(tiny_models, tmp_path_factory):
    """A store of the tiny Llama and the objects the pages' examples start from."""
    from njtc_solve import extract_activations, load_corpus, load_model

    model, tokenizer, name = load_model(str(tiny_models["llama"]), progress=False)
    documents = load_corpus()[1]
    store = extract_activations(model, tokenizer, documents, tmp_path_factory.mktemp("pages") / "activations.h5",
                                model_name=name, seq_len=32, max_tokens=2048, progress=False)
    return store, {"MODEL": str(tiny_models["llama"]), "model": model, "tokenizer": tokenizer,
                   "documents": documents}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_python_block_is_a_doctest(page):
    for info, body in _fences(page.read_text(encoding="utf-8")):
        if info.strip().lower() in ("python", "py", "pycon"):
            assert body.lstrip().startswith(">>> "), \
                f"{_name(page)}: a Python block that is not a doctest (write it as >>> lines):\n{body[:200]}"


@pytest.mark.parametrize("page", [p for p in PAGES if ">>> " in p.read_text(encoding="utf-8")], ids=_name)
def test_the_examples_run(page, page_namespace, tmp_path, monkeypatch):
    store, namespace = page_namespace
    test = _doctest(page, dict(namespace))
    assert test.examples
    if not any("extract_activations(" in example.source for example in test.examples):  # else it makes its own
        shutil.copy(store, tmp_path / "activations.h5")
    monkeypatch.chdir(tmp_path)
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append)
    assert runner.failures == 0 and runner.tries == len(test.examples), "".join(report)


def test_the_python_api_walkthrough_keeps_its_steps():
    sources = "".join(e.source for e in _doctest(ROOT / "docs" / "api.md", {}).examples)
    for step in ("extract_activations(", "fit_shortcuts(", ".save(", "Shortcuts.load(", "transform_hidden(",
                 "sc(h, 1)", "trajectory(", "ReducedRankRegressor(", "X = "):
        assert step in sources, f"the walkthrough lost its {step!r} step"


def test_the_readme_example_keeps_its_steps():
    sources = "".join(e.source for e in _doctest(ROOT / "README.md", {}).examples)
    for step in ("load_model(", "extract_activations(", "fit_shortcuts(", "evaluate_shortcuts("):
        assert step in sources, f"the README's example lost its {step!r} step"
    assert len(sources.splitlines()) <= 15, "the README's example should stay about ten lines"


def test_the_readme_fits_a_screen():
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size < README_LIMIT, f"README.md has {size:,} characters; move detail into docs/ (limit {README_LIMIT:,})"


def _links(text: str) -> list[str]:
    """Targets of Markdown links and images, ``[text](target)`` and ``![alt](target)``, outside code."""
    text = re.sub(r"^```.*?^```\s*$", "", text, flags=re.M | re.S)  # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return [m.split()[0] for m in re.findall(r"\]\(([^)\s]+(?:\s+\"[^\"]*\")?)\)", text)]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_point_to_files(page):
    targets = _links(page.read_text(encoding="utf-8"))
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL, an anchor on the page
            continue
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{_name(page)} links to files that do not exist: {missing}"


def test_docs_links_stay_inside_docs():
    """mkdocs builds docs/ alone: a page that links outside it breaks the built site."""
    docs = (ROOT / "docs").resolve()
    outside = [(_name(page), target) for page in PAGES if page.is_relative_to(ROOT / "docs")
               for target in _links(page.read_text(encoding="utf-8"))
               if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", target)
               and not (page.parent / target.split("#")[0]).resolve().is_relative_to(docs)]
    assert not outside, f"links from docs/ to files outside it (name them in backticks instead): {outside}"


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) ![img](missing.png) `[code](nope.md)` [web](https://example.org)\n")
    assert [t for t in _links(page.read_text()) if not (tmp_path / t).exists() and ":" not in t] == ["missing.png"]


def _nav_pages(nav) -> list[str]:
    """Every page file named in mkdocs.yml's nav (nested sections included)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return [page for item in nav for page in _nav_pages(item)]


def test_the_site_lists_every_page():
    import yaml  # a dependency of transformers

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(listed) == pages, f"mkdocs.yml's nav and docs/ differ: {set(listed) ^ set(pages)}"


def test_the_site_builds_strictly(tmp_path):
    """What `make docs` runs; skipped where mkdocs (the docs extra) is not installed."""
    pytest.importorskip("mkdocs")
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "site" / "architecture.html").is_file()
