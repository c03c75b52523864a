"""The README stays true: its Layout section names paths that exist and names every package
and top-level module of ``src/gam``; its links to files in the repository resolve; and no
command in it depends on this project's own machine (the ``../shared`` data folder)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PACKAGE = ROOT / "src" / "gam"


def layout_paths(readme_text: str) -> list[str]:
    """The paths the README's Layout section names: the first word of every line of its code
    block that does not start with a space (a continuation line does)."""
    section = readme_text.split("\n## Layout\n", 1)
    assert len(section) == 2, "README.md has no '## Layout' section"
    block = re.search(r"^```\n(.*?)^```", section[1], flags=re.S | re.M)
    assert block, "the README's Layout section has no code block"
    return [line.split()[0] for line in block.group(1).splitlines()
            if line.strip() and not line[0].isspace()]


def missing_paths(paths: list[str], root: Path) -> list[str]:
    """The named paths that do not exist under ``root`` (a name ending in / must be a folder)."""
    return [p for p in paths
            if not (root / p).exists() or (p.endswith("/") and not (root / p).is_dir())]


def package_entries(package: Path, root: Path) -> list[str]:
    """Every package under ``package`` (as ``path/``) and every top-level module of it, except
    ``__init__.py`` and ``__main__.py``, relative to ``root``."""
    packages = [f"{d.parent.relative_to(root).as_posix()}/"
                for d in package.rglob("__init__.py") if d.parent != package]
    modules = [f.relative_to(root).as_posix() for f in package.glob("*.py")
               if f.name not in ("__init__.py", "__main__.py")]
    return sorted(packages + modules)


def test_every_layout_path_exists():
    paths = layout_paths(README.read_text(encoding="utf-8"))
    assert len(paths) >= 10
    assert missing_paths(paths, ROOT) == []


def test_layout_names_every_package_and_top_level_module():
    named = set(layout_paths(README.read_text(encoding="utf-8")))
    assert [p for p in package_entries(PACKAGE, ROOT) if p not in named] == []


def test_a_wrong_layout_path_is_caught(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "cli.py").write_text("")
    text = ("# x\n\n## Layout\n\n```\nsrc/       a folder\n    continued here\n"
            "cli.py     a module\nsrc/nope.py  gone\ncli.py/    not a folder\n```\n")
    paths = layout_paths(text)
    assert paths == ["src/", "cli.py", "src/nope.py", "cli.py/"]
    assert missing_paths(paths, tmp_path) == ["src/nope.py", "cli.py/"]


def test_readme_links_to_repository_files_resolve():
    text = README.read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
               if not t.startswith(("http://", "https://", "#"))]
    assert targets
    assert [t for t in targets if not (ROOT / t).exists()] == []


def test_readme_does_not_depend_on_this_machine():
    assert "../shared" not in README.read_text(encoding="utf-8")
