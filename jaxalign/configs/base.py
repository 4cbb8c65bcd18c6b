"""Helpers for experiment configs: ml_collections ConfigDicts from `get_config(arg)` files (big_vision style).

A config file is a Python module with `get_config(arg=None) -> ConfigDict`; its docstring holds the command that
runs it. `arg` selects variants with big_vision's `key=value,flag` syntax, parsed by `parse_arg`:

    def get_config(arg=None):
        arg = parse_arg(arg, variant="default", tiny=False)   # typed defaults
        config = ConfigDict()
        config.lr = 1e-3 if not arg.tiny else 1e-2
        ...

On the command line: `--config jaxalign/configs/tinyalign.py:tiny,variant=faithful` and overrides
`--config.lr=3e-4` (or plain `lr=3e-4`), typed after the existing value; unknown keys are errors naming the
closest level's keys. Every run writes the resolved config to `<workdir>/config.json`.

Public API:
  parse_arg(arg, **defaults) -> ConfigDict
  load_config(path_or_module, overrides=()) -> ConfigDict   ('file.py[:arg]' or 'package.module[:arg]')
  apply_overrides(config, overrides) -> ConfigDict (in place, returned)
  save_resolved_config(config, workdir) -> path of config.json
  load_resolved_config(workdir) -> ConfigDict (what a run saved; `jaxalign predict` reads it)
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections
from etils import epath

ConfigDict = ml_collections.ConfigDict


def _parse_value(text: str, like: Any, where: str) -> Any:
    """`text` converted to the type of the existing value `like`."""
    if isinstance(like, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"{where}: expected a boolean (true / false), got {text!r}")
    if isinstance(like, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {text!r}") from None
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {text!r}") from None
    if isinstance(like, str):
        return text
    # None, tuples, lists, dicts: a Python literal, or the plain string when it is not one.
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(like, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parses a `get_config` argument 'key=value,flag,...' against typed `defaults` (big_vision convention).

    A bare `flag` sets a boolean default to True. Unknown keys are errors listing the known ones.
    """
    result = ConfigDict(dict(defaults))
    if not arg:
        return result
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, has_value, text = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)} (in {arg!r})")
        if not has_value:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...), it is not a flag")
            result[key] = True
        else:
            result[key] = _parse_value(text, defaults[key], f"config argument {key!r}")
    return result


def _import_config_module(name: str):
    if name.endswith(".py") or os.sep in name:
        if not os.path.exists(name):
            raise FileNotFoundError(f"config file {name} does not exist")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(name)


def load_config(path_or_module: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Calls `get_config(arg)` of 'path/to/file.py[:arg]' or 'package.module[:arg]', then applies overrides."""
    name, _, arg = path_or_module.partition(":")
    module = _import_config_module(name)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {name} has no get_config(arg) function")
    config = module.get_config(arg) if arg else module.get_config()
    return apply_overrides(config, overrides)


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Applies '--config.a.b=value' (or 'a.b=value') overrides in order, typed after the existing values.

    Raises:
      KeyError: for a key the config does not have (the message lists the keys at that level).
      ValueError: for a malformed override or a value of the wrong type.
    """
    for override in overrides:
        text = override[len("--config."):] if override.startswith("--config.") else override
        key, has_value, value_text = text.partition("=")
        if not has_value or not key:
            raise ValueError(f"config override {override!r} is not of the form --config.key=value")
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ConfigDict):
                level = ".".join(parents[:depth]) or "<top>"
                raise KeyError(f"config override {override!r}: no section {part!r} under {level}; "
                               f"known keys there: {sorted(node.keys())}")
            node = node[part]
        if leaf not in node:
            level = ".".join(parents) or "<top>"
            raise KeyError(f"config override {override!r}: unknown key {leaf!r} under {level}; "
                           f"known keys there: {sorted(node.keys())}")
        value = _parse_value(value_text, node[leaf], f"config override {override!r}")
        try:
            node[leaf] = value
        except TypeError as error:
            raise ValueError(f"config override {override!r}: {error}") from error
    return config


def save_resolved_config(config: ConfigDict | dict, workdir: str | os.PathLike) -> str:
    """Writes the config as `<workdir>/config.json` (best-effort for non-JSON values) and returns the path.

    `workdir` may be local or a `gs://` / `s3://` URI (written through `etils.epath`, never rewritten).
    """
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    if isinstance(config, ConfigDict):
        text = config.to_json_best_effort(indent=2, sort_keys=True)
    else:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
    staged = folder / "config.json.tmp"
    staged.write_text(text + "\n")
    staged.replace(path)  # never leave a half-written config next to the checkpoints
    return os.fspath(path)


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def load_resolved_config(workdir: str | os.PathLike, overrides: Sequence[str] = ()) -> ConfigDict:
    """The config a run saved as `<workdir>/config.json` (`save_resolved_config`), with `overrides` applied.

    JSON has no tuples: its lists come back as tuples, as the config files write sequences (mesh shapes, length
    buckets, trainable parts).

    Raises:
      FileNotFoundError: the workdir has no config.json (no run was started there).
      ValueError: config.json is not a JSON object.
    """
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)} does not exist: {os.fspath(workdir)} is not the workdir of a run")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)} is not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{os.fspath(path)} holds a {type(content).__name__}, not a config object")
    return apply_overrides(ConfigDict(_tuples(content)), overrides)
