"""Config helpers: get_config(arg) variants, typed --config overrides with clear errors, resolved config file."""
import json
import textwrap

import ml_collections
import pytest

from jaxalign.configs.base import apply_overrides, load_config, parse_arg, save_resolved_config

CONFIG_FILE = textwrap.dedent('''
    """Test experiment. Run: jaxalign train --config thisfile.py:tiny"""
    import ml_collections
    from jaxalign.configs.base import parse_arg

    def get_config(arg=None):
        arg = parse_arg(arg, tiny=False, variant="default", layers=2)
        config = ml_collections.ConfigDict()
        config.variant = arg.variant
        config.total_steps = 10 if arg.tiny else 1000
        config.optimizer = ml_collections.ConfigDict({"lr": 1e-3, "clip": True, "betas": (0.9, 0.999)})
        config.model = ml_collections.ConfigDict({"layers": arg.layers, "name": "mlp"})
        config.init_file = None
        return config
''')


@pytest.fixture()
def config_path(tmp_path):
    path = tmp_path / "experiment.py"
    path.write_text(CONFIG_FILE)
    return str(path)


def test_parse_arg_is_typed_and_rejects_unknown_keys():
    arg = parse_arg("tiny,layers=4,variant=faithful", tiny=False, layers=2, variant="default")
    assert (arg.tiny, arg.layers, arg.variant) == (True, 4, "faithful")
    assert parse_arg(None, tiny=False).tiny is False
    with pytest.raises(ValueError, match="'size' is not one of"):
        parse_arg("size=3", tiny=False)
    with pytest.raises(ValueError, match="expected an integer"):
        parse_arg("layers=two", layers=2)


def test_load_config_with_variant_and_overrides(config_path):
    config = load_config(f"{config_path}:tiny,layers=3",
                         ["--config.optimizer.lr=3e-4", "optimizer.clip=false", "--config.model.name=gnn",
                          "--config.optimizer.betas=(0.8, 0.9)", "--config.init_file=/tmp/weights"])
    assert config.total_steps == 10 and config.model.layers == 3
    assert config.optimizer.lr == pytest.approx(3e-4) and isinstance(config.optimizer.lr, float)
    assert config.optimizer.clip is False
    assert config.model.name == "gnn"
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.init_file == "/tmp/weights"
    assert load_config(config_path).total_steps == 1000


def test_unknown_and_malformed_overrides_are_clear_errors(config_path):
    config = load_config(config_path)
    expected = r"unknown key 'lrr' under optimizer; known keys there: \['betas', 'clip', 'lr'\]"
    with pytest.raises(KeyError, match=expected):
        apply_overrides(config, ["--config.optimizer.lrr=1"])
    with pytest.raises(KeyError, match="no section 'optimiser'"):
        apply_overrides(config, ["--config.optimiser.lr=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(config, ["--config.total_steps=ten"])
    with pytest.raises(ValueError, match="--config.key=value"):
        apply_overrides(config, ["--config.total_steps"])
    with pytest.raises(FileNotFoundError, match="does_not_exist.py"):
        load_config("does_not_exist.py")


def test_save_resolved_config_writes_json(tmp_path):
    config = ml_collections.ConfigDict({"lr": 0.1, "model": {"layers": 2}})
    path = save_resolved_config(config, str(tmp_path / "run"))
    with open(path) as file:
        assert json.load(file) == {"lr": 0.1, "model": {"layers": 2}}
