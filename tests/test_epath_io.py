"""Run files go through etils.epath: a `gs://bucket/run` path is written to the bucket, never to a local folder.

The `bucket` fixture redirects every gs:// path that epath opens to a local folder (`etils.epath.testing.mock_epath`)
and mimics two ways an object store differs from a disk, as epath's fsspec client sees it: a folder without
objects does not exist, and a rename into a folder that does not exist fails. Each test runs in an empty working
directory and checks that it stays empty, so a gs:// path turned into a local one (`./gs:/bucket/...`) shows up.
"""
import json
import os

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from jaxalign.align import memory_keys
from jaxalign.configs.base import save_resolved_config
from jaxalign.data.tokenizer import Tokenizer, train_word_level_tokenizer
from jaxalign.evaluate import plots
from jaxalign.memory import MemoryBank, load_bank, read_manifest, save_bank
from jaxalign.sharding import make_mesh
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train.metrics import MetricWriter, read_metrics


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    """The local folder standing for the root of gs:// (gs://bucket/x is <root>/bucket/x) while the test runs."""
    root = tmp_path / "gcs"
    root.mkdir()

    def local(path):
        text = os.fspath(path)
        return str(root / text[len("gs://"):]) if text.startswith("gs://") else text

    def redirect(original, path, *args, **kwargs):
        return original(local(path), *[local(arg) if isinstance(arg, (str, os.PathLike)) else arg for arg in args],
                        **kwargs)

    def exists(original, path):
        found = local(path)
        return original(found) and not (os.path.isdir(found) and not os.listdir(found))  # no empty folders

    def rename_into_existing_folder(original, path, destination):
        if not exists(lambda found: os.path.exists(found), os.path.dirname(os.fspath(destination))):
            raise FileNotFoundError(f"folder {os.path.dirname(os.fspath(destination))} does not exist")
        return original(local(path), local(destination))

    mocks = {name: redirect for name in ("copy", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
                                         "rmtree", "stat")}
    mocks.update(exists=exists, rename=rename_into_existing_folder, replace=rename_into_existing_folder)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    with epath_testing.mock_epath(**mocks):
        yield root
    assert os.listdir(workdir) == [], "a gs:// path was written as a local path"


def test_resolved_config_is_written_to_a_gcs_workdir(bucket):
    path = save_resolved_config({"lr": 0.1, "model": {"width": 8}}, "gs://bucket/run")
    assert path == "gs://bucket/run/config.json"
    assert json.loads((bucket / "bucket" / "run" / "config.json").read_text()) == {"lr": 0.1, "model": {"width": 8}}
    assert os.listdir(bucket / "bucket" / "run") == ["config.json"]  # the staged copy was renamed, not left


def test_metric_writer_appends_to_a_gcs_workdir_and_reads_back(bucket):
    with MetricWriter("gs://bucket/run", tensorboard=False) as writer:
        writer.write(1, {"loss": 2.5})
        # on an object store a line is there as soon as it is written, not only when the writer closes
        assert (bucket / "bucket" / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'
        writer.write(2, {"loss": np.float32(1.5), "accuracy": 0.25})
    with MetricWriter("gs://bucket/run", tensorboard=False) as resumed:  # a resumed run keeps the earlier lines
        resumed.write(3, {"loss": 1.0})
    assert read_metrics("gs://bucket/run") == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5, "accuracy": 0.25},
                                               {"step": 3, "loss": 1.0}]


def test_memory_bank_saved_to_gcs_loads_back_identical(bucket, eight_devices):
    mesh = make_mesh((2, 2, 2))
    rng = np.random.default_rng(5)
    keys = rng.normal(size=(37, 8)).astype(np.float32)
    values = {"tokens": rng.integers(0, 100, size=(37, 3)).astype(np.int32)}
    ids = rng.permutation(100)[:37].astype(np.int32)
    bank = MemoryBank.from_arrays(keys, values, ids, metric="cosine", mesh=mesh)

    written = save_bank(bank, "gs://bucket/run/bank", fingerprint="encoder-a")
    save_bank(bank, "gs://bucket/run/bank", fingerprint="encoder-b")  # replaces it: the swap runs on gs:// too
    assert str(written) == "gs://bucket/run/bank"
    assert sorted(os.listdir(bucket / "bucket" / "run")) == ["bank"]  # no staging or retired folder left
    assert (bucket / "bucket" / "run" / "bank" / "manifest.json").is_file()
    assert read_manifest("gs://bucket/run/bank")["encoder_fingerprint"] == "encoder-b"
    loaded = load_bank("gs://bucket/run/bank", mesh=mesh, fingerprint="encoder-b", key_dim=8)
    for saved, restored in zip(jax.tree.leaves((bank.keys, bank.ids, bank.values)),
                               jax.tree.leaves((loaded.keys, loaded.ids, loaded.values))):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(restored))
    reused, info = memory_keys.load_or_build_bank("gs://bucket/run/bank", "encoder-b", build=None, mesh=mesh)
    assert info == {"path": "gs://bucket/run/bank", "reused": True, "count": 37, "key_dim": 8}
    np.testing.assert_array_equal(reused.host_ids(), np.sort(ids))


def test_plot_is_saved_to_gcs(bucket):
    path = plots.plot_loss_curves({"run": [(1, 2.0), (2, 1.5), (3, 1.2)]}, "gs://bucket/run/plots/loss.png")
    assert path == "gs://bucket/run/plots/loss.png"
    assert (bucket / "bucket" / "run" / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_folder_round_trips_through_gcs(bucket):
    tokenizer = train_word_level_tokenizer(["the circle is red .", "is the square blue ?"], add_bos=True)
    tokenizer.save_folder("gs://bucket/run/tokenizer")
    assert sorted(os.listdir(bucket / "bucket" / "run" / "tokenizer")) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    loaded = Tokenizer.from_folder("gs://bucket/run/tokenizer")
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.encode("the square is red .") == tokenizer.encode("the square is red .")


def test_checkpoint_directory_reaches_orbax_unrewritten(tmp_path, monkeypatch):
    # orbax's CheckpointManager asks GCS about the bucket as it starts (google.cloud.storage), so a stand-in
    # records what it is given instead.
    given = []

    class RecordingManager:
        def __init__(self, directory, **kwargs):
            given.append(directory)

    monkeypatch.setattr(checkpoint_lib.ocp, "CheckpointManager", RecordingManager)
    assert checkpoint_lib.Checkpointer("gs://bucket/run/checkpoints").directory == "gs://bucket/run/checkpoints"
    assert checkpoint_lib.Checkpointer(epath.Path("gs://bucket/run/ckpt")).directory == "gs://bucket/run/ckpt"
    monkeypatch.chdir(tmp_path)
    assert checkpoint_lib.Checkpointer("checkpoints").directory == str(tmp_path / "checkpoints")  # orbax: absolute
    assert given == ["gs://bucket/run/checkpoints", "gs://bucket/run/ckpt", str(tmp_path / "checkpoints")]


def test_unreadable_checkpoint_is_moved_aside_within_gcs(bucket, monkeypatch):
    class ReloadingManager:
        def __init__(self, directory, **kwargs):
            pass

        def reload(self):
            pass

    monkeypatch.setattr(checkpoint_lib.ocp, "CheckpointManager", ReloadingManager)
    checkpoints = bucket / "bucket" / "run" / "checkpoints"
    for step in ("10", "5"):
        (checkpoints / step / "state").mkdir(parents=True)
        (checkpoints / step / "state" / "data").write_text(f"step {step}")
    checkpointer = checkpoint_lib.Checkpointer("gs://bucket/run/checkpoints")

    assert checkpointer._move_aside(10) == "gs://bucket/run/checkpoints-unreadable/10"
    assert sorted(os.listdir(checkpoints)) == ["5"]
    moved = bucket / "bucket" / "run" / "checkpoints-unreadable"
    assert (moved / "10" / "state" / "data").read_text() == "step 10"
    # the new folder held no object, so the move gave it one (else the rename into it is refused)
    assert sorted(os.listdir(moved)) == ["10", "README.txt"]


def test_clutrr_model_folder_round_trips_through_gcs(bucket):
    """A CLUTRR trainer's `model/` (model.json + params.npz) saved to and loaded from a gs:// workdir."""
    from jaxalign.distill import clutrr_batches, evaluate
    from jaxalign.models import gnn

    config = gnn.GNNConfig(num_relations=len(evaluate.teacher_edge_vocabulary()), hidden=8, num_layers=1,
                           num_classes=len(clutrr_batches.CLUTRR_LABELS), max_nodes=6, max_edges=8)
    params = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "bias": np.ones(3, np.float32)}
    model = evaluate.SavedModel("teacher", config, params, clutrr_batches.label_vocabulary(),
                                evaluate.teacher_edge_vocabulary())
    evaluate.save_model("gs://bucket/run/model", model)
    assert sorted(os.listdir(bucket / "bucket" / "run" / "model")) == ["model.json", "params.npz"]
    loaded = evaluate.load_model("gs://bucket/run")  # a workdir holding model/
    assert loaded.role == "teacher" and loaded.config == config
    np.testing.assert_array_equal(loaded.params["layer"]["kernel"], params["layer"]["kernel"])
    np.testing.assert_array_equal(loaded.params["bias"], params["bias"])
    assert loaded.labels.to_json() == model.labels.to_json()
