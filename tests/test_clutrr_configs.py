"""The CLUTRR run configs find their released data, and reading data that is missing says clearly what is missing
and what to do."""
import os
import zipfile

import pytest

from jaxalign.configs.base import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxalign", "configs")
TEACHER = os.path.join(CONFIGS, "clutrr_teacher.py")
DISTILL = os.path.join(CONFIGS, "clutrr_distill.py")


def _released_zip(folder, dataset="data_089907f8", members=("1.2,1.3_train.csv", "1.2_test.csv")):
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{dataset}.zip", "w") as archive:
        for name in members:
            archive.writestr(f"{dataset}/{name}", "id,story\n")
    return folder / f"{dataset}.zip"


@pytest.mark.parametrize("config_file", [TEACHER, DISTILL])
def test_a_missing_data_root_loads_and_reading_it_names_the_path_and_the_ways_to_point_at_data(config_file, tmp_path,
                                                                                              monkeypatch):
    """A config loads without its default data (overrides may name other files); reading the missing zip is one
    clear error naming the absolute path and the remedies, not a zip or CSV traceback."""
    from jaxalign.programs import clutrr_trainer

    monkeypatch.chdir(tmp_path)
    config = load_config(f"{config_file}:data_root=nowhere/clutrr")
    assert config.data.train == f"{tmp_path}/nowhere/clutrr/data_089907f8.zip"
    for read in (lambda: clutrr_trainer.read_rows(config.data.train),
                 lambda: clutrr_trainer.read_test_files(list(config.data.test))):
        with pytest.raises(FileNotFoundError) as error:
            read()
        message = str(error.value)
        assert f"{tmp_path}/nowhere/clutrr/data_089907f8.zip does not exist, nor does its folder" in message
        assert f"relative to the working directory ({tmp_path})" in message
        for remedy in ("data_root=/path/to/clutrr,dataset=data_089907f8", "--config.data.train=",
                       "jaxalign clutrr generate --out-dir DIR"):
            assert remedy in message
        assert "name the training file inside the zip" not in message
    # Overrides naming real files replace the missing default.
    overridden = load_config(f"{config_file}:data_root=nowhere/clutrr", [f"--config.data.train={tmp_path}/x.csv"])
    assert overridden.data.train == f"{tmp_path}/x.csv"


def test_a_missing_file_in_an_existing_folder_lists_what_is_there(tmp_path):
    from jaxalign.programs import clutrr_trainer

    _released_zip(tmp_path, "data_7c5b0e70")
    config = load_config(f"{TEACHER}:data_root={tmp_path},dataset=data_db9b8f04")
    with pytest.raises(FileNotFoundError, match=r"data_db9b8f04\.zip does not exist \(its folder holds "
                                                r"\['data_7c5b0e70.zip'\]\)"):
        clutrr_trainer.read_rows(config.data.train)


def test_an_existing_root_loads_with_the_training_member_and_absolute_paths(tmp_path, monkeypatch):
    archive = _released_zip(tmp_path / "clutrr")
    monkeypatch.chdir(tmp_path)
    for config_file in (TEACHER, DISTILL):
        config = load_config(f"{config_file}:data_root=clutrr")
        assert config.data.train == f"{archive}:1.2,1.3_train.csv"
        assert tuple(config.data.test) == (str(archive),)


def test_a_zip_without_a_training_file_is_refused(tmp_path):
    _released_zip(tmp_path, members=("1.2_test.csv",))
    with pytest.raises(ValueError, match=r"holds no \*_train.csv file"):
        load_config(f"{TEACHER}:data_root={tmp_path}")


def test_quick_runs_and_an_empty_root_take_their_files_from_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                    # no released data anywhere near
    overrides = [f"--config.data.train={tmp_path}/1.2,1.3_train.csv", f"--config.data.test=('{tmp_path}',)"]
    quick = load_config(f"{TEACHER}:quick", overrides)
    assert quick.data.train == f"{tmp_path}/1.2,1.3_train.csv" and tuple(quick.data.test) == (str(tmp_path),)
    unnamed = load_config(f"{DISTILL}:data_root=")
    assert unnamed.data.train == "" and tuple(unnamed.data.test) == ()
    named = load_config(f"{DISTILL}:data_root=", overrides)
    assert named.data.train == f"{tmp_path}/1.2,1.3_train.csv" and tuple(named.data.test) == (str(tmp_path),)
