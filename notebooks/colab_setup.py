"""Writes every notebook's Colab header from the README's one repository setting.

    python notebooks/colab_setup.py           # rewrites the notebooks in place
    python notebooks/colab_setup.py --check   # changes nothing; exits 1 naming the notebooks that are out of date

The setting is the README line `Repository: https://github.com/OWNER/NAME`. From it each notebook gets:
- an "Open in Colab" badge as the first line of its first markdown cell, linking to
  https://colab.research.google.com/github/OWNER/NAME/blob/main/notebooks/<notebook>.ipynb;
- the install cell (`INSTALL_CELL`, the same in every notebook) as its first code cell: in Colab it installs
  jaxalign from that repository, or from a copy uploaded to /content/jaxalign, without replacing the JAX build
  Colab ships for the runtime; anywhere else it installs nothing. Either way it says when the runtime's JAX is
  older than jaxalign's minimum (the `jax>=` line of setup.cfg, read from the installed package's metadata) and
  which devices JAX sees.

A notebook without a badge or install cell gets one inserted; one with stale ones gets them replaced. This is a
helper for the repository's notebooks, not part of the library. `tests/test_notebooks.py` checks the result.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
REPOSITORY_LINE = re.compile(r"^Repository: (https://github\.com/[\w.-]+/[\w.-]+?)/?(?:\s|$)", re.MULTILINE)
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_LINE = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\s*$")
INSTALL_MARKER = "# Colab: install jaxalign"
INSTALL_CELL_ID = "colab-install"

INSTALL_CELL = '''\
# Colab: install jaxalign from its repository, or from a copy uploaded to /content/jaxalign, keeping the JAX build
# that Colab ships for this runtime. Anywhere else this cell installs nothing (install the repository first:
# `pip install -e .`). Written by notebooks/colab_setup.py from the README's repository setting.
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

REPOSITORY = "{repository}"
UPLOADED = "/content/jaxalign"


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\\d+", text)[:3])


def requirement_name(requirement):
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower().replace("_", "-")


def install_in_colab():
    """jaxalign without its dependencies, then its other requirements with jax / jaxlib pinned to the runtime's."""
    if os.path.isdir(UPLOADED):
        source = UPLOADED
    elif "/OWNER/" in REPOSITORY:
        raise RuntimeError(f"{{REPOSITORY}} is a placeholder (jaxalign is not published yet): upload the repository "
                           f"folder to {{UPLOADED}} (Files pane, or !git clone URL {{UPLOADED}}) and run this cell again")
    else:
        source = f"jaxalign @ git+{{REPOSITORY}}"
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps", "--force-reinstall", source], check=True)
    importlib.invalidate_caches()
    pinned = []
    for name in ("jax", "jaxlib"):
        try:
            pinned.append(f"{{name}}=={{importlib.metadata.version(name)}}")
        except importlib.metadata.PackageNotFoundError:  # no JAX in this runtime: pip installs one
            pass
    requirements = [requirement for requirement in importlib.metadata.requires("jaxalign") or []
                    if "extra ==" not in requirement
                    and (requirement_name(requirement) not in ("jax", "jaxlib") or not pinned)]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\\n".join(pinned) + "\\n")
    # The constraints keep pip from upgrading jax / jaxlib for flax, optax or orbax: they resolve around them.
    subprocess.run(pip + ["-c", constraints.name] + requirements, check=True)


def minimum_jax():
    """The `jax>=` version in jaxalign's install_requires (setup.cfg), or None when jaxalign is not installed."""
    try:
        requirements = importlib.metadata.requires("jaxalign") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        found = re.fullmatch(r"jax\\s*>=\\s*([0-9][0-9a-z.]*)", requirement.strip())
        if found:
            return found.group(1)
    return None


if "google.colab" in sys.modules:
    install_in_colab()

import jax

MINIMUM_JAX = minimum_jax()
if MINIMUM_JAX and version_tuple(jax.__version__) < version_tuple(MINIMUM_JAX):
    print(f"WARNING: this runtime's JAX {{jax.__version__}} is older than jaxalign's minimum {{MINIMUM_JAX}}: jaxalign "
          f"may fail to import or run. Choose the latest runtime version (Runtime > Change runtime type), or "
          f"upgrade JAX for this runtime yourself (on a TPU: pip install -U 'jax[tpu]') and restart the session.")
print(f"JAX {{jax.__version__}} (jaxalign needs >= {{MINIMUM_JAX or '?'}}) on {{jax.default_backend()}}: {{jax.devices()}}")
if jax.default_backend() != "tpu":
    print("TPU runtime recommended (Runtime > Change runtime type > TPU); this one works too, more slowly.")'''


def repository_url(readme: str) -> str:
    """The repository URL of the README's single `Repository: https://github.com/OWNER/NAME` line."""
    found = REPOSITORY_LINE.findall(readme)
    if len(found) != 1:
        raise ValueError(f"README.md must hold exactly one line `Repository: https://github.com/OWNER/NAME`; found "
                         f"{len(found)}")
    return found[0]


def colab_url(repository: str, notebook_name: str) -> str:
    """Where Colab opens `notebooks/<notebook_name>` of the repository's main branch."""
    return (repository.replace("https://github.com/", "https://colab.research.google.com/github/", 1)
            + f"/blob/main/notebooks/{notebook_name}")


def badge(repository: str, notebook_name: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(repository, notebook_name)})"


def _source(cell: dict) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def _lines(text: str) -> list[str]:
    """Notebook JSON stores a cell's source as lines that keep their newline (all but the last)."""
    return text.splitlines(keepends=True)


def with_header(notebook: dict, repository: str, notebook_name: str) -> dict:
    """The notebook with its badge and install cell written from `repository` (a new dict; the input is kept)."""
    cells = [dict(cell) for cell in notebook["cells"]]
    markdown = next((cell for cell in cells if cell["cell_type"] == "markdown"), None)
    if markdown is None:
        raise ValueError(f"{notebook_name} has no markdown cell to carry the Colab badge; add a title cell first")
    lines = _source(markdown).split("\n")
    if BADGE_LINE.match(lines[0]):
        lines[0] = badge(repository, notebook_name)
    else:
        lines = [badge(repository, notebook_name), ""] + lines
    markdown["source"] = _lines("\n".join(lines))

    install = {"cell_type": "code", "id": INSTALL_CELL_ID, "metadata": {}, "execution_count": None, "outputs": [],
               "source": _lines(INSTALL_CELL.format(repository=repository))}
    first_code = next((index for index, cell in enumerate(cells) if cell["cell_type"] == "code"), len(cells))
    if first_code < len(cells) and _source(cells[first_code]).startswith(INSTALL_MARKER):
        install["id"] = cells[first_code].get("id", INSTALL_CELL_ID)
        install["metadata"] = cells[first_code].get("metadata", {})
        cells[first_code] = install
    else:
        cells.insert(first_code, install)
    return dict(notebook, cells=cells)


def notebook_text(notebook: dict) -> str:
    """The notebook as Jupyter writes it (one-space indent, non-ASCII kept, a final newline)."""
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def update(notebooks: list[pathlib.Path], repository: str, check: bool) -> list[pathlib.Path]:
    """Rewrites (or with `check` only lists) the notebooks whose header differs from the one for `repository`."""
    stale = []
    for path in notebooks:
        text = path.read_text(encoding="utf-8")
        wanted = notebook_text(with_header(json.loads(text), repository, path.name))
        if wanted != text:
            stale.append(path)
            if not check:
                path.write_text(wanted, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a notebook is stale")
    parser.add_argument("--readme", type=pathlib.Path, default=ROOT / "README.md")
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path,
                        help="notebooks to write (default: every notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    repository = repository_url(args.readme.read_text(encoding="utf-8"))
    notebooks = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    stale = update(notebooks, repository, args.check)
    for path in stale:
        print(f"{path}: {'out of date with' if args.check else 'rewritten from'} README's Repository: {repository}")
    if args.check and stale:
        print("run: python notebooks/colab_setup.py")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
