"""`jaxalign prepare-data`: the tfds data sets training reads, written once, before training, through the command
line as a user runs it. Small LLaVA folders (PNG images, a JSON file with one sample whose image is missing) are
written here; easy-vqa comes from its package; CLUTRR files from the generator."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxalign import cli
from jaxalign.data import sharded_prepare
from jaxalign.data.llava import LlavaConfig, LlavaDataset, prepare_llava

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
VERSION = str(LlavaDataset.VERSION)


def write_llava_folder(root):
    """questions.json (two questions per image, then one sample whose image is missing), eval.json, images/."""
    os.makedirs(root / "images", exist_ok=True)
    questions = []
    for color, rgb in COLORS.items():
        Image.new("RGB", (16, 16), rgb).save(root / "images" / f"{color}.png")
        for kind, question, answer in (("color", "what color is the shape?", color),
                                       ("size", "is the image small?", "yes")):
            questions.append({"id": f"{color}-{kind}", "image": f"{color}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    missing = {"id": "lost", "image": "nowhere.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": "red"}]}
    (root / "questions.json").write_text(json.dumps(questions[:5] + [missing] + questions[5:]))
    (root / "eval.json").write_text(json.dumps(questions[:4]))
    return root


def prepare(capsys, *args):
    """Runs `jaxalign prepare-data ARGS --format json`; returns the datasets it printed ({datasets: [...]})."""
    capsys.readouterr()
    assert cli.main(["prepare-data", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)["datasets"]


def records(data_dir, name, split="train"):
    source = tfds.data_source(name, data_dir=str(data_dir), split=split)
    return [source[index] for index in range(len(source))]


def same_records(first, second):
    assert len(first) == len(second)
    for one, two in zip(first, second):
        assert sorted(one) == sorted(two)
        for key in one:
            np.testing.assert_array_equal(one[key], two[key], err_msg=key)


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    return write_llava_folder(tmp_path_factory.mktemp("prepare_llava") / "llava")


def llava_args(folder, data_dir, *extra):
    return ["llava", "--json", str(folder / "questions.json"), "--images", str(folder / "images"),
            "--data-dir", str(data_dir), "--examples-per-shard", "3", *extra]


def test_llava_data_set_holds_the_json_samples_and_reports_the_missing_image(llava_folder, tmp_path, capsys):
    assert cli.main(["prepare-data", *llava_args(llava_folder, tmp_path / "tfds")]) == 0
    printed = capsys.readouterr().out
    assert "jaxalign_llava/questions" in printed and "kept 8 of 9 samples; skipped 1" in printed
    assert "missing_image: 1 (ids: 'lost')" in printed
    assert "--config.data.train_name=questions" in printed and "--config.data.image_root=images" in printed

    folder = tmp_path / "tfds" / "jaxalign_llava" / "questions" / VERSION
    saved = json.loads((folder / "prepare_report.json").read_text())
    assert saved["splits"]["train"]["examples"] == 8 and saved["splits"]["train"]["shards"] == 3
    assert saved["skipped"]["counts"] == {"missing_image": 1}
    assert saved["skipped"]["skipped"]["missing_image"] == ["lost"]

    samples = json.loads((llava_folder / "questions.json").read_text())
    got = records(tmp_path / "tfds", "jaxalign_llava/questions")
    kept = [index for index, sample in enumerate(samples) if sample["id"] != "lost"]
    assert sorted(int(record["json_index"]) for record in got) == kept
    for record in got:
        sample = samples[int(record["json_index"])]
        assert record["id"].decode() == sample["id"]
        assert json.loads(record["conversations"]) == sample["conversations"]
        assert record["image"] == (llava_folder / "images" / sample["image"]).read_bytes()
        assert record["image_path"].decode() == sample["image"] and bool(record["has_image"])


def test_records_come_in_the_order_of_the_tfds_build_training_does(llava_folder, tmp_path, capsys):
    """Record i is the same sample whether the data were prepared or built by a training run (bank ids, fractions
    and batches index records by position)."""
    prepare(capsys, *llava_args(llava_folder, tmp_path / "prepared"))
    prepare_llava(LlavaConfig(name="questions", json_file="questions.json", image_root="images"),
                  manual_dir=str(llava_folder), data_dir=str(tmp_path / "built"))
    same_records(records(tmp_path / "prepared", "jaxalign_llava/questions"),
                 records(tmp_path / "built", "jaxalign_llava/questions"))


def interrupt_after_the_first_shard(monkeypatch):
    """Makes the next preparation stop (as if killed) when it starts its second shard."""
    write = sharded_prepare._ShardWriter.write
    written = []

    def write_one_then_stop(self, *args):
        if written:
            raise KeyboardInterrupt("stopped after the first shard")
        written.append(args)
        write(self, *args)

    monkeypatch.setattr(sharded_prepare._ShardWriter, "write", write_one_then_stop)


def test_an_interrupted_preparation_resumes_and_gives_the_same_data_set(llava_folder, tmp_path, monkeypatch, capsys):
    interrupt_after_the_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["prepare-data", *llava_args(llava_folder, tmp_path / "tfds")])
    monkeypatch.undo()
    # Nothing a reader would take for a finished data set: no version folder (tfds would build it again).
    config_dir = tmp_path / "tfds" / "jaxalign_llava" / "questions"
    work = config_dir / (VERSION + sharded_prepare.WORK_SUFFIX)
    assert sorted(os.listdir(config_dir)) == [work.name]
    assert len([name for name in os.listdir(work) if name.startswith("shard-")]) == 1

    [resumed] = prepare(capsys, *llava_args(llava_folder, tmp_path / "tfds"))
    assert (resumed["shards_reused"], resumed["shards_written"], resumed["prepared_now"]) == (1, 2, True)
    assert resumed["skipped"]["counts"] == {"missing_image": 1} and resumed["skipped"]["total"] == 9
    assert sorted(os.listdir(config_dir)) == [VERSION]
    prepare(capsys, *llava_args(llava_folder, tmp_path / "whole"))
    same_records(records(tmp_path / "tfds", "jaxalign_llava/questions"),
                 records(tmp_path / "whole", "jaxalign_llava/questions"))

    [again] = prepare(capsys, *llava_args(llava_folder, tmp_path / "tfds"))
    assert (again["prepared_now"], again["shards_written"]) == (False, 0)
    assert again["skipped"]["counts"] == {"missing_image": 1}


def test_an_interrupted_preparation_of_a_json_that_changed_since_starts_over(tmp_path, monkeypatch, capsys):
    folder = write_llava_folder(tmp_path / "llava")
    interrupt_after_the_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["prepare-data", *llava_args(folder, tmp_path / "tfds")])
    monkeypatch.undo()
    samples = json.loads((folder / "questions.json").read_text())
    (folder / "questions.json").write_text(json.dumps(samples[:3]))
    [result] = prepare(capsys, *llava_args(folder, tmp_path / "tfds"))
    assert result["shards_reused"] == 0 and result["splits"]["train"] == {"kept": 3, "total": 3, "skipped": {}}
    assert sorted(record["id"].decode() for record in records(tmp_path / "tfds", "jaxalign_llava/questions")
                  ) == sorted(sample["id"] for sample in samples[:3])


def test_training_after_prepare_data_only_reads_the_data(llava_folder, tmp_path, monkeypatch, capsys, eight_devices):
    config = ["--config", "jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava,retrieval=off,steps=2",
              f"--config.data.manual_dir={llava_folder}", f"--config.data.data_dir={tmp_path / 'tfds'}",
              "--config.data.image_root=images", "--config.data.eval_image_root=images"]
    prepared = prepare(capsys, *config)
    assert [item["dataset"] for item in prepared] == ["jaxalign_llava/questions", "jaxalign_llava/eval"]
    folders = {item["dataset_dir"]: sorted(os.listdir(item["dataset_dir"])) for item in prepared}

    def rebuild(*args, **kwargs):
        raise AssertionError("training rebuilt a prepared data set")

    monkeypatch.setattr(LlavaDataset, "_download_and_prepare", rebuild)
    monkeypatch.setattr(sharded_prepare, "prepare_shards", rebuild)
    workdir = tmp_path / "run"
    assert cli.main(["train", *config, "--workdir", str(workdir), "--config.progress=False",
                     "--config.eval.max_batches=1", "--config.eval.vqa=False", "--config.eval.batch_size=8"]) == 0
    assert {folder: sorted(os.listdir(folder)) for folder in folders} == folders
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 2
    assert results["data"]["build_reports"]["questions"]["counts"] == {"missing_image": 1}


def test_easy_vqa_captions_prepared_as_the_tfds_build_writes_them(tmp_path, capsys):
    from jaxalign.data import easy_vqa

    [result] = prepare(capsys, "easy-vqa", "--data-dir", str(tmp_path / "tfds"), "--configs", "captions",
                       "--examples-per-shard", "2000", "--workers", "2")
    assert result["dataset"] == "jaxalign_easy_vqa/captions"
    # Images whose caption the questions leave open are counted before the shards: shards hold the others.
    assert result["shards_written"] == sum(-(-split["kept"] // 2000) for split in result["splits"].values())
    report = result["splits"]["test"]
    _, captions = easy_vqa.caption_records("test")
    assert report["total"] == captions.total and report["kept"] == captions.total - len(captions.undetermined)
    prepared = records(tmp_path / "tfds", "jaxalign_easy_vqa/captions", "test")
    same_records(prepared, [easy_vqa.load_easy_vqa("captions", "test")[index] for index in range(len(prepared))])


def test_clutrr_csv_files_prepared_with_malformed_rows_counted(tmp_path, capsys):
    from jaxalign.clutrr import generator, reader, relations

    written = generator.generate_dataset(str(tmp_path / "csv"), train_ks=(2, 3), test_ks=(2, 3), tasks=(1,),
                                         rows_per_file=6, seed=0, train_rows_per_k=8)
    train_file = next(path for name, path in written.items() if name.endswith("_train.csv"))
    test_file = tmp_path / "csv" / "1.3_test.csv"
    with open(test_file, newline="") as stream:
        table = list(csv.DictReader(stream))
    table[1]["target"] = "spaceship"  # no kinship relation: a malformed row
    with open(test_file, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)

    [result] = prepare(capsys, "clutrr", "--train", train_file, "--test", str(tmp_path / "csv"), "--data-dir",
                       str(tmp_path / "tfds"), "--name", "tiny", "--examples-per-shard", "4")
    assert sorted(result["splits"]) == ["test_1_2", "test_1_3", "train"]
    assert result["splits"]["test_1_3"]["total"] == 6 and result["splits"]["test_1_3"]["kept"] == 5
    assert result["skipped"]["total"] == 6 + 6 + 16 and sum(result["skipped"]["counts"].values()) == 1
    assert result["skipped"]["skipped"] == {"malformed_target": [f"1.3_test.csv:{table[1]['id']}"]}
    for split, file_name in (("train", train_file), ("test_1_2", tmp_path / "csv" / "1.2_test.csv")):
        rows = reader.read_csv(file_name)
        got = records(tmp_path / "tfds", "jaxalign_clutrr/tiny", split)
        assert sorted(record["id"].decode() for record in got) == sorted(row.id for row in rows)
        by_id = {row.id: row for row in rows}
        assert all(relations.LABELS[record["target"]] == by_id[record["id"].decode()].target for record in got)


def test_shards_are_split_over_processes_without_overlap():
    assignments = [sharded_prepare.shard_assignment(7, index, 3) for index in range(3)]
    assert assignments == [[0, 3, 6], [1, 4], [2, 5]]
    shards = sharded_prepare.ordered_shards("train", list(range(10)), 4)
    assert [len(shard) for shard in shards] == [4, 4, 2] and sorted(sum(shards, [])) == list(range(10))


def test_two_processes_each_write_their_share(llava_folder, tmp_path, capsys):
    """launch/local.sh 2 1 jaxalign prepare-data ...: both processes write shards of one data set, which equals
    the one a single process writes."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("JAXALIGN_")}
    env.update(LOG_DIR=str(tmp_path / "logs"), JAXALIGN_HEARTBEAT_TIMEOUT="60")
    env.pop("XLA_FLAGS", None)
    launched = subprocess.run(
        ["bash", "launch/local.sh", "2", "1", sys.executable, "-m", "jaxalign.cli", "prepare-data",
         *llava_args(llava_folder, tmp_path / "tfds"), "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    logs = [(tmp_path / "logs" / f"process_{index}.log").read_text() for index in range(2)]
    assert launched.returncode == 0, launched.stderr + "\n".join(log[-3000:] for log in logs)
    folder = tmp_path / "tfds" / "jaxalign_llava" / "questions" / VERSION
    saved = json.loads((folder / "prepare_report.json").read_text())
    assert saved["shards_by_process"] == {"0": ["train/0", "train/2"], "1": ["train/1"]}
    assert saved["skipped"]["counts"] == {"missing_image": 1}
    prepare(capsys, *llava_args(llava_folder, tmp_path / "single"))
    same_records(records(tmp_path / "tfds", "jaxalign_llava/questions"),
                 records(tmp_path / "single", "jaxalign_llava/questions"))
