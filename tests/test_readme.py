"""The README's Python API section is a walkthrough that runs: executed here as a doctest on a
tiny random Llama, in a fresh folder (store → fit → save → load → transform_hidden → logits →
lens trajectory, then the estimator on data it makes itself)."""

from __future__ import annotations

import doctest
import re

from conftest import ROOT


def _section(title: str) -> str:
    """The README's ``## title`` section, its code fences blanked (a fence is no expected output)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    return re.sub(r"^```.*$", "", text[start:end], flags=re.M)


def test_the_python_api_walkthrough_runs(tiny_models, tmp_path, monkeypatch):
    section = _section("Python API")
    test = doctest.DocTestParser().get_doctest(section, {"MODEL": str(tiny_models["llama"])}, "README.md: Python API",
                                               str(ROOT / "README.md"), 0)
    sources = "".join(example.source for example in test.examples)
    for step in ("extract_activations(", "fit_shortcuts(", ".save(", "Shortcuts.load(", "transform_hidden(",
                 "sc(h, 1)", "trajectory(", "ReducedRankRegressor(", "X = "):
        assert step in sources, f"the walkthrough lost its {step!r} step"
    monkeypatch.chdir(tmp_path)
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append)
    assert runner.failures == 0 and runner.tries == len(test.examples), "".join(report)
