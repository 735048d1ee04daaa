"""The package's layout: stage packages whose imports run one way, with no import circle.

The import graph is read from the source with :mod:`ast` (every ``import`` and ``from ... import``
of the package, those inside functions too), so a circle that only a lazy import hides still
fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "njtc_solve"

# what each stage may import besides itself (cli -> evaluationuation/prune/infer -> solve -> maps -> data -> core)
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "maps": {"core", "data"},
    "solve": {"core", "data", "maps"},
    "evaluation": {"core", "data", "maps"},
    "prune": {"core", "data", "maps", "solve"},
    "infer": {"core", "data", "maps", "evaluation"},
    "cli": {"core", "data", "maps", "solve", "evaluation", "prune", "infer"},
}


def modules_of(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under ``package`` (a folder with ``__init__.py``)."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (relative imports resolved, ``from pkg import mod`` too)."""
    modules = modules_of(package)
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name and t != package.name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def test_the_package_has_no_import_circle():
    assert find_circle(import_graph(PACKAGE)) is None


def test_each_stage_imports_only_the_stages_below_it():
    graph = import_graph(PACKAGE)
    graph.pop("njtc_solve.prune.__main__")  # `python -m njtc_solve.prune` hands over to the command; never imported
    wrong = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                   if (sa := stage_of(a)) and (sb := stage_of(b)) and sb != sa and sb not in ALLOWED[sa])
    assert wrong == []


def test_every_module_lives_in_a_stage_package():
    top = {n for n in modules_of(PACKAGE) if n.count(".") == 1 and n.split(".")[1] not in ALLOWED}
    commands = {f"njtc_solve.{c}" for c in ("extract", "fit", "evaluate", "refine", "export", "lens", "generate")}
    assert top <= commands | {"njtc_solve.__main__", "njtc_solve.conftest"}, top - commands


def test_the_circle_finder_finds_a_circle_through_a_lazy_import(tmp_path):
    """The check can fail: a package whose command module and library import each other (the
    old ``njtc_solve/fit.py`` <-> ``njtc_solve/cli/fit.py`` hand-over), one of them inside a function."""
    pkg = tmp_path / "pkg"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "fit.py").write_text("def main():\n    from .cli.fit import run\n    return run()\n")
    (pkg / "cli" / "fit.py").write_text("from ..fit import main as library\n")
    (pkg / "other.py").write_text("import pkg.fit\n")
    assert find_circle(import_graph(pkg)) == ["pkg.cli.fit", "pkg.fit", "pkg.cli.fit"]
    (pkg / "fit.py").write_text("def main():\n    return 0\n")
    assert find_circle(import_graph(pkg)) is None


# the one module that hooks a model, patches a block's `forward` or changes its module lists
SURGERY_MODULE = "njtc_solve.core.decoder"


def model_surgery(package: Path) -> dict[str, list[str]]:
    """Module -> ``"line: what"`` for each hook installed, ``forward`` patched or module list touched, read with ``ast``.

    Found: a call of ``register_*hook`` (any torch hook), an assignment to, or deletion of, an
    attribute ``forward`` (``setattr(x, "forward", ...)`` too), and a subscript of ``_modules``.
    """
    found: dict[str, list[str]] = {}
    for name, path in modules_of(package).items():
        hits = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            what = None
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called.startswith("register_") and called.endswith("hook"):
                    what = called
                elif called == "setattr" and len(node.args) > 1 and getattr(node.args[1], "value", None) == "forward":
                    what = "setattr forward"
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                if any(isinstance(t, ast.Attribute) and t.attr == "forward" for t in targets):
                    what = ".forward ="
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "_modules":
                what = "_modules[...]"
            if what:
                hits.append(f"{node.lineno}: {what}")
        if hits:
            found[name] = hits
    return found


def test_hooks_forward_patching_and_module_swaps_live_in_the_decoder_only():
    """Hooks, ``forward`` patching and module-list swaps are in core/decoder.py and nowhere else in the package."""
    surgery = model_surgery(PACKAGE)
    assert set(surgery) == {SURGERY_MODULE}, {k: v for k, v in surgery.items() if k != SURGERY_MODULE}


def test_the_surgery_finder_finds_each_kind(tmp_path):
    """The check can fail: each kind of surgery, written as the package once did, is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "hooks.py").write_text("h = block.register_forward_pre_hook(f, with_kwargs=True)\n"
                                  "g = block.mlp.register_forward_hook(f)\n")
    (pkg / "patch.py").write_text("block.forward = make(i)\ndel block.forward\nsetattr(block, 'forward', f)\n")
    (pkg / "swap.py").write_text("parent._modules[name] = tail\n")
    (pkg / "clean.py").write_text("model.forward(x)\nforward = 1\nmodules = m._modules\n")
    found = model_surgery(pkg)
    assert found == {"pkg.hooks": ["1: register_forward_pre_hook", "2: register_forward_hook"],
                     "pkg.patch": ["1: .forward =", "2: .forward =", "3: setattr forward"],
                     "pkg.swap": ["1: _modules[...]"]}
