"""The notebooks open in Colab and run: their code cells are executed in a fresh Python process (no Jupyter
needed), and their Colab headers (badge, install cell) follow the README's repository setting.

Cells are read from the .ipynb JSON; shell (`!pip ...`) and magic (`%...`) lines are dropped, since the package
is already installed here (the install cell installs only inside Colab). The notebook runs its quick variant
(JAXALIGN_NOTEBOOK_QUICK=1) with a private output folder and tower cache.
"""
from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import jax
import pytest

from jaxalign.programs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("tinyalign_demo.ipynb", "clutrr_distillation.ipynb", "memory_bank.ipynb")
# Fake CPU devices per notebook: one, as on a Colab CPU runtime, except where the notebook is about sharding.
DEVICES = {"memory_bank.ipynb": 4}


def _colab_setup():
    """notebooks/colab_setup.py (a script beside the notebooks, not a module of the package)."""
    spec = importlib.util.spec_from_file_location("colab_setup", os.path.join(ROOT, "notebooks", "colab_setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab_setup = _colab_setup()


def readme_repository() -> tuple[str, str]:
    """(owner, name) of the README's `Repository: https://github.com/OWNER/NAME` line."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        found = re.findall(r"^Repository: https://github\.com/([\w.-]+)/([\w.-]+)$", f.read(), re.MULTILINE)
    assert len(found) == 1, f"README.md needs exactly one `Repository: https://github.com/OWNER/NAME` line: {found}"
    return found[0]


def load_notebook(name: str) -> dict:
    with open(os.path.join(ROOT, "notebooks", name), encoding="utf-8") as f:
        return json.load(f)


def source(cell: dict) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def notebook_code(path: str) -> str:
    """The notebook's code cells as one Python script, without shell and magic lines."""
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = [line for line in source(cell).splitlines() if not line.lstrip().startswith(("!", "%"))]
        cells.append("\n".join(lines))
    return "\n\n".join(cells)


def test_notebook_code_drops_only_shell_and_magic_lines(tmp_path):
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": ["# title"]},
        {"cell_type": "code", "source": ["!pip install x\n", "x = 1\n", "%time y = 2\n", "print(x)"]}]}))
    assert notebook_code(str(path)) == "x = 1\nprint(x)"


# The demo notebook runs two of the quick demo's methods: tests/test_demo.py runs the whole quick demo already.
DEMO_ARGS = "--methods baseline,tinyalign"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(notebook_code(os.path.join(ROOT, "notebooks", name)))
    # One CPU device, as on a Colab CPU runtime, unless the notebook shows sharding: with the suite's 8 fake
    # devices, XLA's in-process collectives in the long demo subprocess timed out (40 s rendezvous) while the other
    # test worker starved their threads on a 2-core machine, so collectives here wait up to 10 minutes (Makefile).
    # The session's persistent compilation cache is still shared.
    xla_flags = (f"--xla_force_host_platform_device_count={DEVICES.get(name, 1)} "
                 "--xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=600")
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAXALIGN_NOTEBOOK_QUICK="1",
               JAXALIGN_DEMO_OUT=str(tmp_path / "out"), JAXALIGN_DEMO_ARGS=DEMO_ARGS,
               JAXALIGN_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT, MPLBACKEND="Agg",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    result = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"notebook {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    with open(tmp_path / "out" / "results.json") as f:
        results = json.load(f)
    assert "TPU runtime recommended" in result.stdout  # the install cell ran (and installed nothing)
    assert "older than jaxalign's minimum" not in result.stdout
    if name == "tinyalign_demo.ipynb":
        assert "tinyalign 100%" in result.stdout and "the paper's claims" in result.stdout  # the tables were printed
        quick = demo.demo_settings(quick=True)
        assert len(results["runs"]) == 2 * len(quick.seeds) * len(quick.fractions)  # DEMO_ARGS: two methods
        for path in results["plots"].values():
            assert os.path.isfile(path)
    elif name == "memory_bank.ipynb":
        assert results["encoder"] == "silhouette" and results["loaded_equals_saved"] is True
        # 2,048 training images over 4 devices, 512 real rows each; the CLI printed one line per query.
        assert results["bank"]["rows"] == 2048 and results["bank"]["rows_per_device"] == [512] * 4
        assert '"query": 1' in result.stdout
        # Outline and colour tell easy-vqa's 24 captions apart: 1.0 measured, here and over all 888 test images.
        assert results["caption_agreement"] >= 0.95
        (table,) = results["methods"].values()
        assert set(table) == {"exact", "binned", "binned, no re-ranking (target 0.9)", "approx (target 0.95)",
                              "pallas"}
        assert table["exact"]["recall"] == 1.0 and table["binned"]["recall"] == 1.0  # re-ranked binning is exact
        assert all(0.0 <= row["recall"] <= 1.0 and row["milliseconds"] > 0 for row in table.values())
        assert "| method | recall@k | ms per search |" in result.stdout
        assert os.path.isfile(results["plots"]["neighbours"])
    else:
        assert "| GNN teacher | " in result.stdout and "solver agrees with" in result.stdout
        assert len(results) == 4 and all(len(accuracy) == 5 for accuracy in results.values())   # k = 2..6
        # 80 quick steps: the teacher already solves k = 2 (0.98 measured); the students are barely trained.
        assert results["GNN teacher"]["1.2_test.csv"] >= 0.8
        assert os.path.isfile(tmp_path / "out" / "accuracy_vs_k.png")


# ------------------------------------------------------------------------------------------ the Colab header
def test_every_notebook_is_executed_by_the_tests():
    assert sorted(name for name in os.listdir(os.path.join(ROOT, "notebooks")) if name.endswith(".ipynb")) == sorted(
        NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_in_colab_from_the_readme_repository(name):
    owner, repository = readme_repository()
    title = source(next(cell for cell in load_notebook(name)["cells"] if cell["cell_type"] == "markdown"))
    assert title.splitlines()[0] == (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{owner}/{repository}/blob/main/notebooks/{name})")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_first_code_cell_installs_from_the_readme_repository(name):
    owner, repository = readme_repository()
    install = source(next(cell for cell in load_notebook(name)["cells"] if cell["cell_type"] == "code"))
    assert f'REPOSITORY = "https://github.com/{owner}/{repository}"' in install
    assert install == colab_setup.INSTALL_CELL.format(repository=f"https://github.com/{owner}/{repository}")


def test_notebook_headers_are_what_colab_setup_writes():
    paths = [colab_setup.NOTEBOOKS / name for name in NOTEBOOKS]
    stale = colab_setup.update(paths, colab_setup.repository_url(open(os.path.join(ROOT, "README.md")).read()),
                               check=True)
    assert stale == [], "run: python notebooks/colab_setup.py"


def setup_cfg_minimum_jax() -> str:
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    (minimum,) = re.findall(r"^jax>=([0-9.]+)$", config["options"]["install_requires"], re.MULTILINE)
    return minimum


def test_readme_states_the_minimum_jax_of_setup_cfg():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert re.findall(r"minimum, \*\*JAX ([0-9.]+)\*\*", f.read()) == [setup_cfg_minimum_jax()]


def test_colab_setup_adds_then_updates_the_header(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nRepository: https://github.com/someone/jaxalign\n")
    path = tmp_path / "new.ipynb"
    path.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# A new notebook\n", "text"]},
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": ["x = 1"]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert colab_setup.main(["--readme", str(readme), "--check", str(path)]) == 1
    assert colab_setup.main(["--readme", str(readme), str(path)]) == 0
    cells = json.loads(path.read_text())["cells"]
    assert source(cells[0]) == ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                                "(https://colab.research.google.com/github/someone/jaxalign/blob/main/notebooks/"
                                "new.ipynb)\n\n# A new notebook\ntext")
    assert source(cells[1]).startswith(colab_setup.INSTALL_MARKER) and source(cells[2]) == "x = 1"
    assert colab_setup.main(["--readme", str(readme), "--check", str(path)]) == 0  # written once, then stable

    readme.write_text("Repository: https://github.com/elsewhere/fork\n")  # the setting moves: the header follows
    assert colab_setup.main(["--readme", str(readme), str(path)]) == 0
    cells = json.loads(path.read_text())["cells"]
    assert len(cells) == 3 and "github/elsewhere/fork/blob/main/notebooks/new.ipynb" in source(cells[0])
    assert 'REPOSITORY = "https://github.com/elsewhere/fork"' in source(cells[1])


def run_install_cell(monkeypatch, repository: str, in_colab: bool, uploaded: bool = False) -> list[list[str]]:
    """Executes the install cell here, with pip calls recorded instead of run; returns the pip command lines."""
    calls = []

    def record(command, check):
        assert check
        constraints = command[command.index("-c") + 1] if "-c" in command else None
        calls.append(command + ([open(constraints).read()] if constraints else []))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", record)
    monkeypatch.setattr(os.path, "isdir", lambda path, isdir=os.path.isdir: uploaded if path == "/content/jaxalign"
                        else isdir(path))
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(colab_setup.INSTALL_CELL.format(repository=repository), {})
    return calls


def test_install_cell_outside_colab_installs_nothing(monkeypatch, capsys):
    assert run_install_cell(monkeypatch, "https://github.com/someone/jaxalign", in_colab=False) == []
    printed = capsys.readouterr().out
    assert f"JAX {jax.__version__} (jaxalign needs >= {setup_cfg_minimum_jax()}) on cpu" in printed
    assert "TPU runtime recommended" in printed and "older than" not in printed


def test_install_cell_in_colab_keeps_the_runtime_jax(monkeypatch):
    calls = run_install_cell(monkeypatch, "https://github.com/someone/jaxalign", in_colab=True)
    package, requirements = calls
    assert package[-3:] == ["--no-deps", "--force-reinstall", "jaxalign @ git+https://github.com/someone/jaxalign"]
    pinned = requirements.pop()  # the constraints file's content
    assert pinned == f"jax=={importlib.metadata.version('jax')}\njaxlib=={importlib.metadata.version('jaxlib')}\n"
    names = [re.match(r"[\w.-]+", requirement).group() for requirement in requirements[requirements.index("-c") + 2:]]
    assert "flax" in names and "easy-vqa" in names
    assert not {"jax", "jaxlib", "pytest", "torch"} & set(names)  # the runtime's JAX stays; no test or hf extras


def test_install_cell_in_colab_prefers_an_uploaded_copy(monkeypatch):
    package, _ = run_install_cell(monkeypatch, "https://github.com/OWNER/jaxalign", in_colab=True, uploaded=True)
    assert package[-1] == "/content/jaxalign"


def test_install_cell_in_colab_explains_a_placeholder_repository(monkeypatch):
    with pytest.raises(RuntimeError, match="placeholder.*upload the repository folder to /content/jaxalign"):
        run_install_cell(monkeypatch, "https://github.com/OWNER/jaxalign", in_colab=True)


def test_install_cell_warns_when_the_runtime_jax_is_too_old(monkeypatch, capsys):
    monkeypatch.setattr(jax, "__version__", "0.4.33")
    run_install_cell(monkeypatch, "https://github.com/someone/jaxalign", in_colab=False)
    assert (f"WARNING: this runtime's JAX 0.4.33 is older than jaxalign's minimum {setup_cfg_minimum_jax()}"
            in capsys.readouterr().out)
