"""The package's layout as the README draws it: the library never imports the programs or the command line,
the programs never import the command line, and one library package does not reach into another's programs.

Read from the source (every `import` and `from ... import` statement, including those inside functions), so a
lazy import inside a function counts too.
"""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxalign"
LIBRARY = ("models", "memory", "align", "distill", "clutrr", "data", "train", "io", "evaluate", "configs",
           "sharding", "distributed", "paths")
ENTRY = ("jaxalign.commands", "jaxalign.cli")
PROGRAMS = ("jaxalign.programs",)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("jaxalign")}


def _modules(top: str) -> list[pathlib.Path]:
    path = PACKAGE / top
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _offending(paths, forbidden) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)} imports {name}" for path in paths for name in sorted(_imports(path))
            if name.startswith(forbidden)]


def test_every_library_package_exists():
    assert all((PACKAGE / top).is_dir() or (PACKAGE / f"{top}.py").is_file() for top in LIBRARY)
    assert (PACKAGE / "programs").is_dir() and (PACKAGE / "commands").is_dir()


def test_library_imports_neither_programs_nor_commands():
    paths = [path for top in LIBRARY for path in _modules(top)]
    assert len(paths) > 50
    assert _offending(paths, ENTRY + PROGRAMS) == []


def test_programs_do_not_import_the_command_line():
    assert _offending(_modules("programs"), ENTRY) == []


def test_commands_never_import_cli_back():
    assert _offending(_modules("commands"), ("jaxalign.cli",)) == []


def test_library_packages_keep_to_their_own_job():
    """align (TinyAlign) and distill (CLUTRR distillation) are separate methods: neither imports the other."""
    assert _offending(_modules("align"), ("jaxalign.distill",)) == []
    assert _offending(_modules("distill"), ("jaxalign.align",)) == []
    assert _offending(_modules("clutrr"), ("jaxalign.distill", "jaxalign.align")) == []


def test_the_checker_sees_a_lazy_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from jaxalign.programs import demo\n    import jaxalign.cli\n")
    assert _imports(sample) == {"jaxalign.programs", "jaxalign.programs.demo", "jaxalign.cli"}
