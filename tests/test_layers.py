"""The package's layers (docs/design.md, "Architecture map"), checked from the source: a module
imports only from its own package or from a lower layer, never upward or sideways, and no
modules import each other in a circle. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "gam"

# unit (a top-level module or a subpackage) -> layer. The package face gam/__init__.py
# re-exports models' public names (and ``__version__``): above models, below training.
LAYERS = {
    "gam.errors": -1,
    "gam.runtime": 0, "gam.files": 0, "gam.constants": 0,
    "gam.data": 1, "gam.models": 1,
    "gam": 1.5,
    "gam.training": 2,
    "gam.bench": 3, "gam.hf": 3,
    "gam.cli": 4,
    "gam.__main__": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit_of(module: str) -> str | None:
    if module == "gam":
        return "gam"
    for unit in sorted(set(LAYERS) - {"gam"}, key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def imported_modules(module: str, path: Path, known: dict[str, Path] = MODULES) -> set[str]:
    """The gam modules ``module`` imports (``from a.b import c`` counts as a.b.c when that is
    one of the ``known`` modules, else as a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == "gam" or m.startswith("gam.")}


GRAPH = {m: imported_modules(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if unit_of(m) is None]
    assert not missing, f"modules outside the layer map (add them to LAYERS and docs): {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_only(module: str) -> None:
    unit = unit_of(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        target_unit = unit_of(target)
        if target_unit == unit:
            continue
        if target_unit is None or LAYERS[target_unit] >= LAYERS[unit]:
            wrong.append(target)
    assert not wrong, (f"{module} (layer {LAYERS[unit]}) imports {wrong}: only its own "
                       "package or lower layers")


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_check_sees_a_sideways_import(tmp_path: Path) -> None:
    """The parser resolves what it must: an absolute, a relative and a function-level import."""
    fake = tmp_path / "gam" / "data"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("def f():\n    from ..models import lm\n    import gam.hf\n")
    found = imported_modules("gam.data.x", fake / "x.py", {**MODULES, "gam.data.x": fake / "x.py"})
    assert found == {"gam.models.lm", "gam.hf"}


# Inside gam.models: the shell (``lm`` and the modules split from it), the ops, the registry and
# the files that save and load models are shared; every other module is a family's, and a family
# that needs several modules is a package (``models/gam/``: GAM and its extension gam-delta). A
# family imports the shell, the ops and the bottom layer only, never another family.
SHELL = {"gam.models", "gam.models.lm", "gam.models.blocks", "gam.models.inputs",
         "gam.models.sampling"}
MODEL_SHARED = SHELL | {"gam.models.registry", "gam.models.io", "gam.models.official"}


def family_of(module: str) -> str:
    """gam.models.<family>[.<part>] -> gam.models.<family>."""
    return ".".join(module.split(".")[:3])


FAMILY_MODULES = sorted(m for m in MODULES if m.startswith("gam.models.")
                        and m not in MODEL_SHARED and not m.startswith("gam.models.ops"))


def test_the_family_list_is_not_empty() -> None:
    assert {"gam.models.gam", "gam.models.mamba", "gam.models.transformer"} <= set(FAMILY_MODULES)


@pytest.mark.parametrize("module", FAMILY_MODULES)
def test_a_family_imports_only_the_shell_and_the_ops(module: str) -> None:
    wrong = sorted(t for t in GRAPH[module] if t.startswith("gam.models")
                   and t not in SHELL
                   and not t.startswith("gam.models.ops")
                   and family_of(t) != family_of(module))
    assert not wrong, (f"{module} imports {wrong}: a family imports only the shell "
                       f"({sorted(SHELL)}) and ops")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("gam.models.ops")))
def test_the_ops_import_no_family_and_no_shell(module: str) -> None:
    wrong = sorted(t for t in GRAPH[module] if t.startswith("gam.models")
                   and not t.startswith("gam.models.ops"))
    assert not wrong, f"{module} imports {wrong}: an op stands below every model module"


def names_imported_through(path: Path, known: dict[str, Path] = MODULES) -> list[str]:
    """``from gam.a import X`` in ``path`` where ``gam.a`` is a module (not a package face) that
    itself imports ``X`` from elsewhere: an import through a re-export instead of the owner."""
    imported: dict[str, dict[str, str]] = {}  # module -> name it imports -> from where

    def imports_of(module: str) -> dict[str, str]:
        if module not in imported:
            tree = ast.parse(known[module].read_text(encoding="utf-8"))
            imported[module] = {a.asname or a.name: node.module for node in tree.body
                                if isinstance(node, ast.ImportFrom) and node.module
                                for a in node.names}
        return imported[module]

    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.module in known
                and known[node.module].name != "__init__.py"):
            continue
        for alias in node.names:
            owner = imports_of(node.module).get(alias.name)
            if owner is not None and f"{node.module}.{alias.name}" not in known:
                found.append(f"{alias.name} through {node.module} (owner: {owner})")
    return found


@pytest.mark.parametrize("path", sorted([*MODULES.values(), *SRC.parent.glob("tests/**/*.py")]),
                         ids=str)
def test_names_are_imported_from_their_owner(path: Path) -> None:
    """One home per name: no module re-exports another's names for others to import (the
    package faces, ``__init__.py``, excepted)."""
    found = names_imported_through(path)
    assert not found, f"{path}: import from the owning module instead: {found}"


def test_the_check_sees_an_import_through_a_re_export(tmp_path: Path) -> None:
    facade = tmp_path / "facade.py"
    facade.write_text("from gam.runtime import resolve_device\n\ndef own():\n    pass\n")
    user = tmp_path / "user.py"
    user.write_text("from gam.facade import own, resolve_device\n")
    assert names_imported_through(user, {**MODULES, "gam.facade": facade}) == [
        "resolve_device through gam.facade (owner: gam.runtime)"]


MAX_LINES = 500


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_stays_under_the_line_limit(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, (f"{MODULES[module]} has {lines} lines: split it along a seam "
                                f"(at most {MAX_LINES})")
