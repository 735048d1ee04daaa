"""The gradient baseline: same maps, never below the closed-form optimum on its training loss."""

from __future__ import annotations

import pytest
import torch
from conftest import benchmark_module

from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.data.store import ActivationStore

gradient = benchmark_module("gradient")  # benchmarks/gradient.py: the baseline, not part of the library
GradientShortcut, as_shortcuts = gradient.GradientShortcut, gradient.as_shortcuts
load_training_rows, train_gradient = gradient.load_training_rows, gradient.train_gradient


@pytest.mark.parametrize("method,normalize", [("njtc", None), ("nnjtc", "batch"), ("jtc", None)])
def test_adam_on_the_store_never_beats_the_closed_form(tiny_store, method, normalize):
    with ActivationStore(tiny_store) as store:
        [closed] = fit_shortcuts(store, method=method, ranks=None if method == "jtc" else [4], layers=[2],
                                 normalize=normalize, progress=False)
        optimum = closed.stats["layers"][2]["train_mse"]
        run = train_gradient(store, 2, method, 4, lr=3e-3, batch_size=128, epochs=30, time_budget=60,
                             optimum=optimum, seed=1)
        x, y = load_training_rows(store, 2)
        grad = as_shortcuts(run, 2, store, method)
        # the trained map's own training loss, computed independently of the training loop
        mse = float(((grad.transform_hidden(x, 2).double() - y.double()) ** 2).mean())
        closed_mse = float(((closed.transform_hidden(x, 2).double() - y.double()) ** 2).mean())
    assert closed_mse == pytest.approx(optimum, rel=1e-4)
    assert mse >= optimum * (1 - 1e-4)
    assert run.final_mse == pytest.approx(mse, rel=1e-4)
    assert mse <= optimum * 1.5, "Adam should get reasonably close, else the comparison is vacuous"


def test_batch_norm_folds_exactly_into_a_shortcut_map():
    torch.manual_seed(0)
    module = GradientShortcut(8, rank=3, batch_norm=True)
    x = torch.randn(64, 8) * 4 + 2
    module.train()
    module(x)  # populate running statistics
    with torch.no_grad():
        module.norm.weight.uniform_(0.5, 2)
        module.norm.bias.normal_()
    module.eval()
    folded = module.to_shortcut_map()
    assert torch.allclose(folded.predict(x), module(x).detach(), atol=1e-5)
