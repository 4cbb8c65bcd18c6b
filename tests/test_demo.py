"""The demo: tower pretraining pieces, plots, the table, and a quick end-to-end `jaxalign demo --quick` (twice: the
second call must reuse the cached towers and the finished runs)."""
from __future__ import annotations

import dataclasses
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


def test_lm_texts_can_write_the_image_caption_before_the_question():
    questions = [("what color is the shape?", "red", 1), ("what shape is in the image?", "circle", 2)]
    tokenizer = pretrain_towers.build_tokenizer(questions, ["a red circle", "a blue circle"])
    plain = pretrain_towers.lm_texts(tokenizer, "qwen2", questions, ["a red circle"])
    with_context = pretrain_towers.lm_texts(tokenizer, "qwen2", questions, ["a red circle"],
                                            {1: "a red circle", 2: "a blue circle"}, context_share=1.0)
    assert len(with_context[0]) == len(plain[0]) + 2  # each question once more, after its image's caption
    texts = [tokenizer.decode(row[:length]) for row, length in zip(with_context[0], with_context[1])]
    assert any("a blue circle what shape is in the image ?" in text for text in texts)


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
    # A seed draws its own subset (and test questions); every method shares it at that seed.
    other = demo.stage_config(settings, towers, 2, "real", 1.0, init_from="/s1", seed=1)
    assert other.data.fraction_seed == other.seed == 1 and full.data.fraction_seed == settings.seeds[0]
    assert set(select_fraction(demo.TRAIN_QUESTIONS_TOTAL, other.data.fraction, 1)) != set(full_rows)
    # The default memory: captioned training images keyed by the image alone; training leaves out its own image.
    assert full.data.memory_config == "captions" and full.retrieval.leave_out == "group"
    assert (full.retrieval.image_weight, full.retrieval.text_weight) == (1.0, 0.0)
    answers = demo.stage_config(dataclasses.replace(settings, bank="answers"), towers, 2, "real", 1.0)
    assert answers.data.memory_config == "" and answers.retrieval.text_weight == 0.6
    # The image-caption memory retrieves by the image alone: its diagnostics are measured at the first seed; the
    # answers bank's queries read the (trained) text embeddings, so every run measures its own.
    assert full.eval.retrieval_diagnostics and part.eval.retrieval_diagnostics
    assert not other.eval.retrieval_diagnostics
    assert demo.stage_config(dataclasses.replace(settings, bank="answers"), towers, 2, "real", 1.0,
                             seed=1).eval.retrieval_diagnostics
    # Keyed by the image's silhouette by default, by the towers on request; each key has its own bank folder.
    keyed = {key: demo.stage_config(dataclasses.replace(settings, key_encoder=key), towers, 2, "real", 1.0,
                                    bank_root="/banks") for key in demo.KEY_ENCODERS}
    assert full.retrieval.key_encoder == "silhouette" and keyed["towers"].retrieval.key_encoder == "towers"
    assert keyed["silhouette"].retrieval.memory_dir == "/banks/image_captions_silhouette_stage2"
    assert keyed["towers"].retrieval.memory_dir == "/banks/image_captions_towers_stage2"
    with pytest.raises(ValueError, match="key_encoder"):
        dataclasses.replace(settings, key_encoder="clip")
    # Every run of one process shares the processed training samples of one record set and spec.
    assert full.data.share_sample_cache and part.data.share_sample_cache and stage1.data.share_sample_cache


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


def _fake_runs(accuracy, methods=("baseline", "tinyalign")):
    """Runs of `methods` at 100% and 40% over seeds 0, 1, 2 with accuracy(method, fraction, seed)."""
    return [{"name": demo.run_name(m, f), "method": m, "fraction": f, "seed": seed, "train_questions": q,
             "steps": st, "final_train_loss": 0.5, "mean_train_loss": 0.7, "eval_loss": None,
             "accuracy": accuracy(m, f, seed), "eval_questions": 24, "per_type": {"color": 1.0}}
            for m in methods for f, q, st in ((1.0, 200, 5), (0.4, 80, 2)) for seed in (0, 1, 2)]


def test_claims_say_the_lm_does_not_read_its_context_when_even_the_oracle_does_not_help():
    methods = ("baseline", "oracle")
    settings = dataclasses.replace(demo.demo_settings(), methods=methods, fractions=(1.0,), k=1, stage2_steps=600)
    runs = [run for run in _fake_runs(lambda m, f, seed: 0.5 + 0.01 * seed, methods) if run["fraction"] == 1.0]
    claims = "\n".join(demo.aggregate(runs, settings)["claims"])
    assert "headroom): not shown" in claims
    assert "not reading the retrieved tokens after 600 stage-2 steps (19,200 samples) at k = 1" in claims
    # An oracle that helps beyond twice the SE: no such sentence.
    runs = [dict(run, accuracy=run["accuracy"] + (0.2 + 0.01 * run["seed"] if run["method"] == "oracle" else 0))
            for run in runs]
    claims = "\n".join(demo.aggregate(runs, settings)["claims"])
    assert "headroom): yes" in claims and "not reading" not in claims


def test_aggregate_compares_every_arm_with_each_null_once_including_the_constant_control():
    methods = ("baseline", "tinyalign", "shuffle_within_group", "oracle", "constant")
    settings = dataclasses.replace(demo.demo_settings(), methods=methods, fractions=(1.0,))
    offset = {"baseline": 0.0, "tinyalign": 0.3, "shuffle_within_group": 0.1, "oracle": 0.4, "constant": 0.05}
    runs = [run for run in _fake_runs(lambda m, f, seed: 0.4 + offset[m] + 0.01 * seed, methods)
            if run["fraction"] == 1.0]
    pairs = [(row["a"].removesuffix(" 100%"), row["b"].removesuffix(" 100%"))
             for row in demo.aggregate(runs, settings)["comparisons"] if row["metric"] == "accuracy"]
    assert pairs == [("tinyalign", "baseline"), ("shuffle_within_group", "baseline"), ("oracle", "baseline"),
                     ("constant", "baseline"), ("tinyalign", "shuffle_within_group"),
                     ("oracle", "shuffle_within_group"), ("constant", "shuffle_within_group"),
                     ("tinyalign", "constant"), ("oracle", "constant"), ("tinyalign", "oracle")]
    row = next(row for row in demo.aggregate(runs, settings)["comparisons"]
               if (row["a"], row["b"], row["metric"]) == ("tinyalign 100%", "constant 100%", "accuracy"))
    assert row["mean"] == pytest.approx(0.25) and row["n"] == 3
    # TinyAlign - oracle = -0.1 on every seed: the claim says the oracle is ahead.
    claims = "\n".join(demo.aggregate(runs, settings)["claims"])
    assert ("TinyAlign (retrieved captions) answers better than the oracle (own caption): no, the opposite: "
            "difference -0.100 ± 0.000 (SE, 3 seeds)") in claims
    # Without the constant control the demo's comparisons are as before: nothing against a run that is absent.
    demo_runs = [run for run in runs if run["method"] != "constant"]
    assert not [row for row in demo.aggregate(demo_runs, settings)["comparisons"] if "constant" in row["a"] + row["b"]]


def test_aggregate_pairs_by_seed_and_answers_the_claims():
    settings = dataclasses.replace(demo.demo_settings(), methods=("baseline", "tinyalign"))
    # Seeds move both arms together by 0.2; tinyalign is ahead by 0.04, 0.05, 0.06 at 100%:
    # paired differences mean 0.05, std 0.01, SE 0.01 / sqrt(3) = 0.00577 -> beyond twice the SE.
    level = {0: 0.5, 1: 0.7, 2: 0.3}
    gain = {0: 0.04, 1: 0.05, 2: 0.06}
    runs = _fake_runs(lambda m, f, seed: level[seed] + (gain[seed] if m == "tinyalign" and f == 1.0 else 0.0)
                      - (0.1 if f == 0.4 else 0.0))
    result = demo.aggregate(runs, settings)
    assert result["mean"]["tinyalign 100%"]["accuracy"] == pytest.approx(0.55)
    assert result["std"]["baseline 100%"]["accuracy"] == pytest.approx(0.2)
    row = next(r for r in result["comparisons"]
               if (r["a"], r["b"], r["metric"]) == ("tinyalign 100%", "baseline 100%", "accuracy"))
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.05) and row["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert row["exceeds_2se"] is True
    # tinyalign 40% - baseline 100% = -0.1 on every seed: worse, beyond its (zero) error.
    row = next(r for r in result["comparisons"] if (r["a"], r["b"], r["metric"]) ==
               ("tinyalign 40%", "baseline 100%", "accuracy"))
    assert row["mean"] == pytest.approx(-0.1) and row["exceeds_2se"] is True
    claims = "\n".join(result["claims"])
    assert "TinyAlign answers better than the baseline: yes" in claims
    assert "reaches the baseline with 100%: no" in claims
    assert "final training loss vs the baseline: not shown" in claims  # equal losses: difference 0


def test_table_shows_mean_and_std_per_run_and_marks_paired_differences():
    settings = dataclasses.replace(demo.demo_settings(), methods=("baseline", "tinyalign"))
    runs = _fake_runs(lambda m, f, seed: 0.75 if m == "tinyalign" else 0.5)
    results = {"runs": runs, "seeds": [0, 1, 2], **demo.aggregate(runs, settings)}
    lines = demo.format_table(results).splitlines()
    assert lines[0] == "easy-vqa, mean ± std over 3 seeds (0, 1, 2)"
    row = next(line for line in lines if line.startswith("tinyalign 100%"))
    assert row.split()[2:10] == ["200", "5", "0.500", "±", "0.000", "0.750", "±", "0.000"]
    assert any(line.strip().startswith("tinyalign 100% - baseline 100%") and line.endswith("*") for line in lines)
    assert "24 easy-vqa test questions per seed" in "\n".join(lines)


def test_distillation_table_says_what_it_shows_and_points_to_the_benchmark():
    files = ("1.2_test.csv", "1.3_test.csv")
    results = {"settings": {"train_rows": 1000, "test_rows_per_file": 128, "teacher_steps": 300,
                            "student_steps": 500, "seed": 0},
               "majority_baseline": dict(zip(files, (0.094, 0.117))),
               "teacher": {"test_accuracy": dict(zip(files, (1.0, 0.891)))},
               "student_alone": {"test_accuracy": dict(zip(files, (0.953, 0.719)))},
               "student_kd_contrastive": {"test_accuracy": dict(zip(files, (0.938, 0.758)))}}
    lines = demo.format_distillation_table(results).splitlines()
    header = next(line for line in lines if line.startswith("test file"))
    assert [title.strip() for title in header.split("  ") if title.strip()][1:] == [
        "most frequent answer", "GNN teacher (graph)", "BiLSTM alone (text)", "BiLSTM + KD + NCE"]
    assert next(line for line in lines if line.startswith("1.3_test.csv")).split()[1:] == [
        "0.117", "0.891", "0.719", "0.758"]
    text = "\n".join(lines)
    assert "1000 training stories of k = 2, 3; 128 test rows per file; seed 0" in text
    assert "(300 steps)" in text and "(500 steps)" in text
    assert "bench/clutrr_distill.py" in text and "bench/RESULTS.md" in text


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
    settings = demo.demo_settings(quick=True)
    names = [(run["name"], run["seed"]) for run in first["runs"]]
    assert names == [(f"{method} 100%", seed) for method in demo.DEFAULT_METHODS for seed in settings.seeds]
    assert first["seeds"] == list(settings.seeds) and set(first["mean"]) == set(first["std"]) == {n for n, _ in names}
    assert first["comparisons"] and first["claims"]
    for run in first["runs"]:
        assert math.isfinite(run["final_train_loss"]) and run["final_train_loss"] > 0
        assert math.isfinite(run["stage1_final_train_loss"])
        assert all(math.isfinite(loss) for _, loss in run["loss_history"])
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["eval_questions"] == demo.demo_settings(quick=True).eval_questions
        assert run["per_type"] and all(0.0 <= value <= 1.0 for value in run["per_type"].values())
        assert run["eval_loss"] is None  # the quick variant skips the eval loss (one compilation less per run)
    # (The 40% runs, which the quick variant leaves out, are checked in test_stage_configs_select_...)
    # Every retrieval run of the first seed reports what its retrieved values carry (the image-caption memory
    # retrieves by the image alone, so later seeds would measure the same); the oracle reads no bank row.
    for run in first["runs"]:
        if run["control"] not in ("off", "oracle") and run["seed"] == settings.seeds[0]:
            assert {"test", "train", "key_ceiling"} <= set(run["retrieval_precision"])
        else:
            assert run["retrieval_precision"] == {}
    prior = first["question_prior"][str(settings.seeds[0])]
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
    config.train.log_every = 1  # every step's loss compared (the demo logs every 5th)
    runs = [tinyalign_trainer.train_and_evaluate(config, str(tmp_path / f"stage1_{n}")) for n in range(2)]
    assert runs[0]["loss_history"] == runs[1]["loss_history"] and len(runs[0]["loss_history"]) == 3
