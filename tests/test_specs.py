"""Settings are checked once, at the library's door: every declared parameter of every spec refuses a bad
value with one line that names it, and each library entry refuses it before any work (before a file is
opened, a model is touched or a row is read). The idea is scikit-learn's ``generate_invalid_param_val``."""

from __future__ import annotations

import types

import pytest

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.params import Interval, ListOf, Options, check_params, invalid_value
from njtc_solve.data.plan import PlanSpec, plan_extraction
from njtc_solve.evaluation.evaluate import EvaluateSpec, evaluate_shortcuts
from njtc_solve.evaluation.layer_pairs import evaluate_pairs
from njtc_solve.evaluation.lens import LensSpec, ShortcutLens, plot_trajectory
from njtc_solve.infer.speculative import GenerateSpec, speculative_generate
from njtc_solve.prune.refine_fold import RefineFoldSpec
from njtc_solve.solve.fit import FitSpec
from njtc_solve.solve.refine_shortcuts import RefineShortcutsSpec, refine_shortcuts

SPECS = (PlanSpec, EvaluateSpec, GenerateSpec, LensSpec, RefineShortcutsSpec, RefineFoldSpec, FitSpec)
REQUIRED = {GenerateSpec: {"exit_layer": 2}}  # what a spec needs besides its defaults
CASES = [(spec, name) for spec in SPECS for name in getattr(spec, "constraints", {})]


def _refused(call, name: str) -> str:
    with pytest.raises(NJTCError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"`{name}`" in message or f"unknown {name}" in message, message
    return message


def test_every_spec_declares_its_parameters_and_accepts_its_defaults():
    for spec in SPECS:
        assert spec.constraints, spec
        spec(**REQUIRED.get(spec, {}))


@pytest.mark.parametrize("spec, name", CASES, ids=[f"{s.__name__}.{n}" for s, n in CASES])
def test_every_declared_parameter_refuses_a_bad_value_naming_it(spec, name):
    bad = invalid_value(spec.constraints[name])
    _refused(lambda: spec(**{**REQUIRED.get(spec, {}), name: bad}), name)


# each entry: (call with one setting, the spec whose parameters it takes, parameters it does not take)
def _entries(tmp_path):
    missing = tmp_path / "missing.h5"  # opening it would fail with another message
    fake = types.SimpleNamespace(exit_layer=1)
    fake.model = fake
    return {
        "plan_extraction": (lambda **kw: plan_extraction(None, None, **kw), PlanSpec,
                            {"corpus", "text_field", "batch_size"}),
        "evaluate_shortcuts": (lambda **kw: evaluate_shortcuts(missing, ["missing.safetensors"], **kw), EvaluateSpec,
                               {"skip_rows"}),
        "evaluate_pairs": (lambda **kw: evaluate_pairs(missing, ["missing.safetensors"], **kw), EvaluateSpec,
                           {"layers", "thresholds"}),
        "refine_shortcuts": (lambda **kw: refine_shortcuts(missing, tmp_path / "missing.safetensors", **kw),
                             RefineShortcutsSpec, set()),
        "speculative_generate": (lambda **kw: speculative_generate(fake, [1], drafter=fake, **{
            "max_new_tokens": 4, "draft_tokens": 1, **kw}), GenerateSpec,
            {"exit_layer", "max_draft_tokens", "calibration_sequences", "device"}),
        "trajectory": (lambda **kw: ShortcutLens.__new__(ShortcutLens).trajectory("x", **kw), LensSpec,
                       {"color", "max_positions", "device", "dtype"}),
        "plot_trajectory": (lambda **kw: plot_trajectory(None, **kw), LensSpec,
                            {"k", "batch_size", "chunk_rows", "device", "dtype"}),
    }


ENTRIES = ["plan_extraction", "evaluate_shortcuts", "evaluate_pairs", "refine_shortcuts", "speculative_generate",
           "trajectory", "plot_trajectory"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_each_library_entry_refuses_a_bad_setting_before_any_work(entry, tmp_path):
    call, spec, not_taken = _entries(tmp_path)[entry]
    names = [n for n in spec.constraints if n not in not_taken]
    assert names
    for name in names:
        settings = {name: invalid_value(spec.constraints[name])}
        _refused(lambda: call(**settings), name)  # noqa: B023 (called at once)


def test_the_declared_kinds():
    assert Interval(int, 1, None).holds(3) and not Interval(int, 1, None).holds(True)
    assert not Interval(float, 0, 1).holds(float("nan")) and not Interval(float, 0, 1, closed="left").holds(1.0)
    assert Options(("kl", "mse")).holds("kl") and not Options(("kl",)).holds(["kl"])
    assert ListOf(Interval(int, 0, None)).holds((0, 2)) and not ListOf(Interval(int, 0, None)).holds("12")
    constraints = {"max_rows": [None, Interval(int, 1, None, says="positive", show_value=False)]}
    check_params(constraints, {"max_rows": None})
    with pytest.raises(NJTCError, match=r"^`max_rows` must be positive$"):
        check_params(constraints, {"max_rows": 0})
    with pytest.raises(NJTCError, match=r"^`steps` must be at least 1, not 0$"):
        check_params({"steps": [Interval(int, 1, None)]}, {"steps": 0})
