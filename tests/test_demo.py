"""The demo: tower pretraining pieces, plots, the table, and a quick end-to-end `jaxalign demo --quick` (twice: the
second call must reuse the cached towers and the finished runs)."""
from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.programs import demo, pretrain_towers
from jaxalign.evaluate import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ pieces
def test_sigmoid_contrastive_loss_matches_numpy_with_shared_captions():
    images = np.asarray([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    texts = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    labels = np.asarray([0, 1, 0])
    same = labels[:, None] == labels[None, :]
    log_temperature, bias = np.log(10.0), -5.0
    logits = 10.0 * images @ texts.T + bias
    signs = np.where(same, 1.0, -1.0)
    expected = -np.sum(np.log(1.0 / (1.0 + np.exp(-signs * logits)))) / 3
    got = pretrain_towers.sigmoid_contrastive_loss(jnp.asarray(images), jnp.asarray(texts), jnp.asarray(same),
                                                   jnp.asarray(log_temperature), jnp.asarray(bias))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_fingerprint_names_the_settings():
    base = pretrain_towers.TowerPretrainConfig()
    assert base.fingerprint() == pretrain_towers.TowerPretrainConfig().fingerprint()
    assert base.fingerprint() != pretrain_towers.TowerPretrainConfig(vision_steps=base.vision_steps + 1).fingerprint()


def test_tokenizer_knows_every_easy_vqa_word_and_the_chat_template():
    from jaxalign.data import easy_vqa

    questions = easy_vqa.read_questions("test")[:300]
    tokenizer = pretrain_towers.build_tokenizer(questions, ["a red circle", "a teal triangle"])
    unknown = tokenizer.token_to_id("<unk>")
    ids = tokenizer.encode(" ".join(f"{q} {a}" for q, a, _ in questions))
    assert unknown not in ids
    assert tokenizer.token_to_id("<|im_start|>") is not None and tokenizer.token_to_id("<|im_end|>") is not None
    texts, lengths, counts = pretrain_towers.lm_texts(tokenizer, "qwen2", questions, ["a red circle"])
    assert counts.sum() == len(questions) + 1
    assert len(texts) == len(set(map(tuple, texts)))  # each distinct conversation once
    assert tokenizer.decode(texts[0][:lengths[0]]).startswith("system you are a helpful assistant")


def test_stage_configs_select_the_40_percent_subset_inside_the_full_one():
    from jaxalign.data.pipeline import select_fraction

    settings = demo.demo_settings()
    towers = pretrain_towers.PretrainedTowers("/t", "/t/vision", "/t/lm", {}, True)
    full = demo.stage_config(settings, towers, 2, "real", 1.0, init_from="/s1")
    part = demo.stage_config(settings, towers, 2, "real", 0.4, init_from="/s1")
    full_rows = select_fraction(demo.TRAIN_QUESTIONS_TOTAL, full.data.fraction, full.data.fraction_seed)
    part_rows = select_fraction(demo.TRAIN_QUESTIONS_TOTAL, part.data.fraction, part.data.fraction_seed)
    assert len(full_rows) == settings.train_questions and len(part_rows) == round(0.4 * settings.train_questions)
    assert set(part_rows) <= set(full_rows)
    assert part.train.total_steps == round(0.4 * full.train.total_steps)
    assert round(full.eval.fraction * demo.TEST_QUESTIONS_TOTAL) == settings.eval_questions
    assert (full.model.vision_folder, full.model.lm_folder, full.model.init_from) == ("/t/vision", "/t/lm", "/s1")
    stage1 = demo.stage_config(settings, towers, 1, "off", 1.0)
    assert stage1.retrieval.control == "off" and stage1.train.total_steps == settings.stage1_steps


def test_plots_write_pngs_and_reject_bad_values(tmp_path):
    curves = {"a": [(1, 2.0), (2, 1.5), (3, float("nan")), (4, 1.0)], "b": [(1, 3.0), (2, 2.5)]}
    path = plots.plot_loss_curves(curves, str(tmp_path / "sub" / "loss.png"))
    assert open(path, "rb").read(8) == PNG_MAGIC
    path = plots.plot_loss_curves({"a": [(step, 1.0 / step) for step in range(1, 40)]}, str(tmp_path / "s.png"),
                                  smooth=5)
    assert open(path, "rb").read(8) == PNG_MAGIC
    assert plots.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    path = plots.plot_accuracy_bars({"a": {"overall": 0.5, "color": 1.0}, "b": {"overall": 0.25}},
                                    str(tmp_path / "acc.png"))
    assert open(path, "rb").read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        plots.plot_accuracy_bars({"a": {"overall": 1.5}}, str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="no finite point"):
        plots.plot_loss_curves({"a": [(1, float("inf"))]}, str(tmp_path / "bad.png"))


def test_table_has_one_row_per_run_with_its_numbers():
    runs = [{"name": f"{m} {p}", "train_questions": q, "steps": s, "final_train_loss": 0.5, "eval_loss": None,
             "accuracy": 0.75, "eval_questions": 24, "per_type": {"color": 1.0}}
            for m in ("baseline", "tinyalign") for p, q, s in (("100%", 200, 5), ("40%", 80, 2))]
    table = demo.format_table({"runs": runs})
    lines = table.splitlines()
    assert len(lines) == 2 + len(runs) + 1
    assert lines[2].split()[:6] == ["baseline", "100%", "200", "5", "0.500", "-"]
    assert "24 easy-vqa test questions" in lines[-1]


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """Runs `jaxalign demo --quick` twice into one folder with a private tower cache."""
    root = tmp_path_factory.mktemp("demo")
    out, cache = str(root / "out"), str(root / "cache")
    argv = ["--out", out, "--quick", "--cache", cache]
    assert cli.main(["demo"] + argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        first = json.load(f)
    assert cli.main(["demo"] + argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        second = json.load(f)
    return out, cache, first, second


def test_quick_demo_reports_every_run_with_finite_losses_and_valid_accuracies(quick_demo):
    out, _, first, _ = quick_demo
    names = [run["name"] for run in first["runs"]]
    assert names == [f"{method} {percent}" for method, _ in demo.METHODS for percent in ("100%", "40%")]
    for run in first["runs"]:
        assert math.isfinite(run["final_train_loss"]) and run["final_train_loss"] > 0
        assert math.isfinite(run["stage1_final_train_loss"])
        assert all(math.isfinite(loss) for _, loss in run["loss_history"])
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["eval_questions"] == demo.demo_settings(quick=True).eval_questions
        assert run["per_type"] and all(0.0 <= value <= 1.0 for value in run["per_type"].values())
        assert run["eval_loss"] is None  # the quick variant skips the eval loss (one compilation less per run)
    # The 40% runs train for 40% of the steps on the 40% subset.
    by_name = {run["name"]: run for run in first["runs"]}
    assert by_name["tinyalign 40%"]["steps"] == round(0.4 * by_name["tinyalign 100%"]["steps"])
    assert by_name["tinyalign 40%"]["train_questions"] == round(0.4 * by_name["tinyalign 100%"]["train_questions"])
    prior = first["question_prior"]
    assert prior["eval_questions"] == demo.demo_settings(quick=True).eval_questions
    assert 0.0 <= prior["accuracy"] <= 1.0 and set(prior["per_type"]) == set(first["runs"][0]["per_type"])
    assert "question-only prior" in demo.format_table(first)
    for path in first["plots"].values():
        assert open(path, "rb").read(8) == PNG_MAGIC
    assert set(first["plots"]) == {"loss_curves", "stage1_loss_curves", "accuracy"}


def test_quick_demo_caches_the_towers_and_reuses_them(quick_demo):
    _, cache, first, second = quick_demo
    assert not first["towers"]["reused"] and second["towers"]["reused"]
    folder = first["towers"]["folder"]
    assert folder == second["towers"]["folder"] and folder.startswith(os.path.join(cache, "demo_towers"))
    for name in ("vision/config.json", "vision/model.safetensors", "lm/config.json", "lm/tokenizer.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    # The second call also found the finished runs and reproduced the same numbers without training.
    assert all(run["reused"] for run in second["runs"])
    assert [run["accuracy"] for run in second["runs"]] == [run["accuracy"] for run in first["runs"]]


def test_cached_towers_load_as_hugging_face_folders(quick_demo):
    from jaxalign.data.tokenizer import Tokenizer
    from jaxalign.io import hf_lm, hf_vision

    folder = quick_demo[2]["towers"]["folder"]
    vision_cfg, _ = hf_vision.load(os.path.join(folder, "vision"))
    lm_cfg, _ = hf_lm.load(os.path.join(folder, "lm"))
    tokenizer = Tokenizer.from_folder(os.path.join(folder, "lm"))
    settings = demo.demo_settings(quick=True).towers
    assert (vision_cfg.image_size, vision_cfg.patch_size, vision_cfg.hidden_size) == (
        settings.image_size, settings.patch_size, settings.vision_width)
    assert lm_cfg.vocab_size == tokenizer.vocab_size and lm_cfg.eos_token_id == tokenizer.eos_id


# ------------------------------------------------------------------------------------------- reruns agree
def test_a_seeded_rerun_reproduces_towers_and_training_bit_for_bit(quick_demo, tmp_path):
    """Same code, same machine, same seeds: pretraining the towers again into an empty cache gives the same bytes,
    and training a stage again in an empty workdir gives the same losses, bit for bit (the demo's numbers move
    between machines, and between versions of the code, only through floating-point rounding; see README)."""
    from jaxalign.programs import tinyalign_trainer

    settings = demo.demo_settings(quick=True)
    first = quick_demo[2]["towers"]
    again = pretrain_towers.obtain_towers(settings.towers, cache_root=str(tmp_path / "cache"))
    assert not again.reused and again.manifest["fingerprint"] == first["manifest"]["fingerprint"]
    for part in ("vision", "lm"):
        with open(os.path.join(first["folder"], part, "model.safetensors"), "rb") as f:
            expected = f.read()
        with open(os.path.join(again.folder, part, "model.safetensors"), "rb") as f:
            assert f.read() == expected, part
    config = demo.stage_config(settings, again, 1, "real", 1.0)
    config.progress = False
    runs = [tinyalign_trainer.train_and_evaluate(config, str(tmp_path / f"stage1_{n}")) for n in range(2)]
    assert runs[0]["loss_history"] == runs[1]["loss_history"] and len(runs[0]["loss_history"]) == 3
