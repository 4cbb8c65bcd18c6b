"""TinyAlign training stages through `train_and_evaluate`, on 8 fake devices, a (2, 4, 1) mesh, tiny random
towers and a tiny LLaVA-format folder written here (coloured-shape images, captions and questions)."""
import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image, ImageDraw

from jaxalign.programs import tinyalign_trainer as trainer
from jaxalign.configs.base import load_config
from jaxalign.data import pipeline

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square")


def shape_image(path, color, shape):
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (6, 6, 26, 26)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    image.save(path)


def write_llava_folder(root):
    """captions.json (stage 1), questions.json (stage 2), captions_eval.json and eval.json, images/.

    Two bad samples are planted: 'missing-image' (no image file: left out by the tfds build) and
    'too-long' (a question longer than the model's max_length: skipped by the pipeline)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    captions, questions = [], []
    for index, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        name = f"{color}_{shape}.png"
        shape_image(os.path.join(root, "images", name), color, shape)
        captions.append({"id": f"cap-{index}", "image": f"images/{name}", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": f"a {color} {shape}"}]})
        for kind, question, answer in (("color", "what color is the shape?", color),
                                       ("shape", "what shape is in the image?", shape)):
            questions.append({"id": f"q-{index}-{kind}", "image": f"images/{name}", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    bad_image = {"id": "missing-image", "image": "nowhere.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "red"}]}
    too_long = {"id": "too-long", "image": "images/red_circle.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "what color is the shape? " * 30},
        {"from": "gpt", "value": "red"}]}
    files = {"captions.json": captions + [bad_image], "captions_eval.json": captions[:4],
             "questions.json": questions + [too_long], "eval.json": questions[:8]}
    for name, content in files.items():
        with open(os.path.join(root, name), "w") as f:
            json.dump(content, f)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, eight_devices):
    root = tmp_path_factory.mktemp("tinyalign")
    write_llava_folder(str(root / "llava"))
    return root


def tiny_config(folders, stage, steps, *extra):
    overrides = [f"data.manual_dir={folders / 'llava'}", f"data.data_dir={folders / 'tfds'}", "mesh=(2, 4, 1)",
                 "progress=False", "train.checkpoint_every=2", "retrieval.build_batch_size=8",
                 "eval.batch_size=8", "eval.max_batches=1", *extra]
    return load_config(f"jaxalign/configs/tinyalign_tiny.py:stage={stage},data=llava,steps={steps}", overrides)


@pytest.fixture(scope="module")
def stage1(folders):
    workdir = str(folders / "stage1")
    return workdir, trainer.train_and_evaluate(tiny_config(folders, 1, 3), workdir)


@pytest.fixture(scope="module")
def stage2(folders, stage1):
    workdir = str(folders / "stage2")
    config = tiny_config(folders, 2, 4, f"model.init_from={stage1[0]}", "train.learning_rate=0.003",
                         "train.warmup_ratio=0.0", "train.log_every=1", "retrieval.leave_out=group")
    return workdir, trainer.train_and_evaluate(config, workdir)


def test_stage1_trains_connectors_with_leave_one_out(stage1):
    workdir, results = stage1
    assert results["steps"] == 3 and np.isfinite(results["train_loss_last"])
    assert results["trainable"] == ["connector", "retrieval_connector"]
    assert results["memory"]["count"] == 8 and results["memory"]["reused"] is False
    # Leave-one-out inside the jitted step: no retrieved neighbour is the sample itself.
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all(record["own_id_retrieved"] == 0.0 for record in metrics if "own_id_retrieved" in record)
    assert np.isfinite(results["eval"]["loss"]) and results["eval"]["num_tokens"] > 0


def test_retrieval_diagnostics_reach_the_results(stage2):
    """Stage 2 trains with leave_out='group' on questions that come two per image: a training query never retrieves
    a row of its own image, nor does the bank's own search (the ceiling excludes the row's image); test queries
    (eval.json: the first 8 training questions, so in the bank) may."""
    _, results = stage2
    diagnostics = results["eval"]["retrieval_precision"]
    assert sorted(diagnostics) == ["key_ceiling", "test", "train"]
    train, test, ceiling = diagnostics["train"], diagnostics["test"], diagnostics["key_ceiling"]
    assert train["queries"] == 8 and train["k"] == results["k"] and train["empty"] == 0
    assert train["fields"]["image"]["compared"] == 8 * results["k"] and train["fields"]["image"]["agree"] == 0
    assert ceiling["fields"]["image"]["agree"] == 0 and ceiling["search"]["rows"] == results["memory"]["count"]
    for result in (train, test, ceiling):
        assert 0.0 <= result["fields"]["answer"]["precision"] <= 1.0
        assert 0.0 < result["fields"]["answer"]["chance"] < 1.0
    # Evaluation counts its skipped samples (none here: eval.json holds only good questions).
    assert results["eval"]["skipped"]["total"] > 0 and results["eval"]["skipped"]["counts"] == {}


def test_bad_samples_are_reported_with_their_ids(stage1, stage2):
    _, first = stage1
    assert first["data"]["build_reports"]["captions"]["skipped"] == {"missing_image": ["missing-image"]}
    _, second = stage2
    assert "too-long" in second["data"]["train_skipped"]["skipped"]["too_long"]
    # The bank is built from the same questions: its build pass counts the same sample, by id.
    assert "too-long" in second["memory"]["build_skipped"]["skipped"]["too_long"]


def test_stage2_starts_from_stage1_trains_the_lm_and_lowers_the_loss(stage1, stage2):
    _, results = stage2
    assert results["init"]["replaced"] > 0            # connector params came from the stage-1 checkpoint
    assert results["trainable"] == ["connector", "retrieval_connector", "lm"]
    losses = [loss for _, loss in results["loss_history"]]
    assert losses[-1] < losses[0]
    vqa = results["eval"]["vqa"]
    assert vqa["count"] == 8 and 0.0 <= vqa["accuracy"] <= 1.0
    assert set(vqa["per_type"]) == {"(none)"}


def read_extra(workdir, step):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "extra"))
    extra = manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
    manager.close()
    return extra


def read_checkpoint(workdir, step):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "extra"))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return {name: np.asarray(value) for name, value in restored.items()}


class DataReads:
    """Counts the training pipeline's record reads (`process_record`) and the reads before the first batch."""

    def __init__(self, monkeypatch):
        self.records, self.before_first_batch, self.replayed_steps, self.restored = 0, None, 0, []
        original_process, original_next = pipeline.process_record, pipeline.TrainBatches.__next__
        original_skip, original_restore = pipeline.TrainBatches.skip_steps, pipeline.TrainBatches.restore

        def process_record(*args, **kwargs):
            self.records += 1
            return original_process(*args, **kwargs)

        def first_next(batches):
            if self.before_first_batch is None:
                self.before_first_batch = self.records
            return original_next(batches)

        def skip_steps(batches, steps):
            self.replayed_steps += steps
            return original_skip(batches, steps)

        def restore(batches, state):
            self.restored.append(dict(state))
            return original_restore(batches, state)

        monkeypatch.setattr(pipeline, "process_record", process_record)
        monkeypatch.setattr(pipeline.TrainBatches, "__next__", first_next)
        monkeypatch.setattr(pipeline.TrainBatches, "skip_steps", skip_steps)
        monkeypatch.setattr(pipeline.TrainBatches, "restore", restore)


def test_resume_after_an_interruption_is_exact(folders, stage1, stage2, monkeypatch):
    workdir, straight_results = stage2
    resumed = str(folders / "stage2_resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))   # as if the run had died after step 2
    config = tiny_config(folders, 2, 4, f"model.init_from={stage1[0]}", "train.learning_rate=0.003",
                         "train.warmup_ratio=0.0", "train.log_every=1", "eval.at_end=False",
                         "retrieval.leave_out=group")
    reads = DataReads(monkeypatch)
    results = trainer.train_and_evaluate(config, resumed)
    assert results["memory"]["reused"] is True and results["steps"] == 4
    # The data position came from the checkpoint (one state per data shard, keyed by the shard's number):
    # nothing of steps 0-1 was read again.
    saved = read_extra(workdir, 2)["data_iterator_state"]["processes"][0]["shards"]
    assert sorted(saved, key=int) == [str(shard) for shard in range(8)]
    assert reads.restored == [saved[str(shard)] for shard in range(8)]
    assert all(state["step"] == 2 for state in saved.values())
    assert reads.replayed_steps == 0 and reads.before_first_batch == 0
    assert results["loss_history"] == [entry for entry in straight_results["loss_history"] if entry[0] > 2]
    straight, again = read_checkpoint(workdir, 4), read_checkpoint(resumed, 4)
    assert sorted(straight) == sorted(again)
    for name in straight:
        np.testing.assert_array_equal(straight[name], again[name], err_msg=name)


class _Lowered(Exception):
    """Raised by the captured step once it has lowered its program: the run need not train."""


def test_runs_of_different_lengths_share_one_compiled_step(folders, stage1, monkeypatch):
    """The demo's 100% and 40% stage-2 runs differ only in length: the learning-rate horizon is optimizer state
    (`horizon_schedule`), so the trainer lowers the very same update-step program for both (one compile, one
    persistent-cache entry)."""
    from jaxalign.align import update_step
    lowered = []
    original = update_step.jit_update_step

    def capture(*args, **kwargs):
        jitted = original(*args, **kwargs)

        def first_call(state, batch, memory):
            lowered.append(jitted.lower(state, batch, memory).as_text())
            raise _Lowered()
        return first_call

    monkeypatch.setattr(update_step, "jit_update_step", capture)
    for steps in (10, 4):
        config = tiny_config(folders, 2, steps, f"model.init_from={stage1[0]}", "eval.at_end=False")
        with pytest.raises(_Lowered):
            trainer.train_and_evaluate(config, str(folders / f"stage2_lowered_{steps}"))
    assert len(lowered) == 2 and lowered[0] == lowered[1]


def test_eval_command_reproduces_the_final_evaluation(folders, stage1, stage2, capsys):
    from jaxalign import cli

    workdir, results = stage2
    overrides = [f"--config.data.manual_dir={folders / 'llava'}", f"--config.data.data_dir={folders / 'tfds'}",
                 "--config.mesh=(2, 4, 1)", "--config.progress=False", "--config.eval.batch_size=8",
                 "--config.eval.max_batches=1", f"--config.model.init_from={stage1[0]}"]
    code = cli.main(["eval", "--config", "jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava,steps=4",
                     "--workdir", workdir, *overrides])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["restored_params"] > 0
    assert summary["eval_loss"] == pytest.approx(results["eval"]["loss"], rel=1e-5)
    assert summary["vqa_accuracy"] == results["eval"]["vqa"]["accuracy"]
