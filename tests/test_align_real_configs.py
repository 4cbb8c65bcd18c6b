"""The real-scale TinyAlign configs through the `jaxalign` command, on tiny random Hugging Face folders.

`tinyalign_qwen2.py` (SigLIP + Qwen2, default mode) and `tinyalign_phi2_faithful.py` (SigLIP + Phi-2, the
official recipe) run stage 1 then stage 2 from local snapshot folders and a LLaVA-format folder written here
(`hf_fixtures_vlm.py`), on 8 fake devices with a (2, 4, 1) mesh. Only sizes are overridden (batch, steps,
max_length, the Perceiver's latents and depth, k of the faithful run through the config's own `k=` variant);
modes, templates, connectors, data layout and accumulation come from the config files (the faithful runs
compute in float32 to halve their compile time; the Qwen2 runs keep the config's bfloat16).
"""
import contextlib
import io
import json
import os

import numpy as np
import pytest

import hf_fixtures_vlm as fixtures
from jaxalign import cli
from jaxalign.align import memory_keys
from jaxalign.programs import tinyalign_setup as setup
from jaxalign.configs.base import load_config
from jaxalign.data import chat_templates
from jaxalign.data.tokenizer import Tokenizer

pytest.importorskip("transformers")

QWEN2, PHI2 = "jaxalign/configs/tinyalign_qwen2.py", "jaxalign/configs/tinyalign_phi2_faithful.py"
STAGE1_STEPS, STAGE2_STEPS = 2, 6
TINY_MODEL_WIDTH = 32   # hidden size of every tiny tower in hf_fixtures_vlm


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, eight_devices):
    root = tmp_path_factory.mktemp("real_configs")
    llava = str(root / "llava")
    counts = fixtures.write_llava_folder(llava)
    texts = fixtures.corpus(llava)
    fixtures.save_siglip(str(root / "siglip_full"), full_model=True)   # the layout of siglip-so400m
    fixtures.save_siglip(str(root / "siglip_vision"), full_model=False)
    fixtures.save_causal_lm(str(root / "qwen2"), "qwen2", texts)
    fixtures.save_causal_lm(str(root / "phi"), "phi", texts)
    return {"root": root, "llava": llava, "counts": counts}


def overrides(inputs, vision: str, lm: str, stage: int, init_from: str = "") -> list[str]:
    values = {"model.vision_folder": inputs["root"] / vision, "model.lm_folder": inputs["root"] / lm,
              "data.manual_dir": inputs["llava"], "data.data_dir": inputs["root"] / "tfds", "mesh": "(2, 4, 1)",
              "progress": False, "model.max_length": 256, "train.batch_size": 8, "train.accum_steps": 2,
              "train.log_every": 1, "train.checkpoint_every": 100, "eval.batch_size": 8,
              "train.total_steps": STAGE1_STEPS if stage == 1 else STAGE2_STEPS}
    if stage == 2:   # an over-fittable tiny set: a large learning rate from the first step
        values.update({"model.init_from": init_from, "train.learning_rate": 3e-3, "train.warmup_ratio": 0.0})
    return [f"--config.{key}={value}" for key, value in values.items()]


def jaxalign(*argv: str) -> dict:
    """Runs the `jaxalign` command; returns its JSON summary."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    assert code == 0
    return json.loads(out.getvalue())   # stdout holds the summary only (tfds build messages go to stderr)


def train(config: str, workdir, extra: list[str]) -> dict:
    summary = jaxalign("train", "--config", config, "--workdir", str(workdir), *extra)
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as file:
        results = json.load(file)
    assert summary["train_loss_last"] == results["train_loss_last"]
    return results


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def manifest(results: dict) -> dict:
    """The bank's manifest, with 'files': each stored array's whole shape (rows summed over its shard files)."""
    with open(os.path.join(results["memory"]["path"], "manifest.json"), encoding="utf-8") as file:
        written = json.load(file)
    files: dict = {}
    for shard in written["shards"]:
        for name, entry in shard["files"].items():
            rows = files.get(name, {"shape": [0, *entry["shape"][1:]]})["shape"][0] + entry["shape"][0]
            files[name] = {"shape": [rows, *entry["shape"][1:]]}
    return dict(written, files=files)


@pytest.fixture(scope="module")
def qwen2_runs(inputs):
    root = inputs["root"]
    first = train(f"{QWEN2}:stage=1", root / "qwen2_stage1", overrides(inputs, "siglip_full", "qwen2", 1))
    second_extra = overrides(inputs, "siglip_full", "qwen2", 2, str(root / "qwen2_stage1"))
    second = train(f"{QWEN2}:stage=2", root / "qwen2_stage2", second_extra)
    evaluated = jaxalign("eval", "--config", f"{QWEN2}:stage=2", "--workdir", str(root / "qwen2_stage2"),
                         *second_extra)
    return first, second, evaluated


@pytest.fixture(scope="module")
def phi2_runs(inputs):
    root = inputs["root"]
    # float32 here (bfloat16 runs in the Qwen2 runs): XLA compiles CPU bfloat16 steps about twice as slowly.
    small = ["--config.retrieval.perceiver.num_latents=8", "--config.retrieval.perceiver.num_self_layers=2",
             "--config.model.dtype=float32"]
    first = train(f"{PHI2}:stage=1,k=4", root / "phi2_stage1",
                  overrides(inputs, "siglip_vision", "phi", 1) + small)
    second = train(f"{PHI2}:stage=2,k=4", root / "phi2_stage2",
                   overrides(inputs, "siglip_vision", "phi", 2, str(root / "phi2_stage1")) + small)
    return first, second


def assert_finite_losses(results: dict, steps: int) -> list[float]:
    losses = [loss for _, loss in results["loss_history"]]
    assert results["steps"] == steps and len(losses) == steps
    assert all(np.isfinite(losses)) and np.isfinite(results["eval"]["loss"]) and results["eval"]["num_tokens"] > 0
    return losses


# ------------------------------------------------------------------------------------------------- qwen2
def test_qwen2_stage1_trains_connectors_with_a_bank_of_the_captions(inputs, qwen2_runs):
    results = qwen2_runs[0]
    assert (results["stage"], results["mode"], results["control"], results["k"]) == (1, "default", "real", 3)
    assert results["trainable"] == ["connector", "retrieval_connector"]
    assert_finite_losses(results, STAGE1_STEPS)
    # The bank holds one row per pretraining caption; keys are [vision width + LM width], values the captions'
    # tokens (value_length 32 in the config).
    count = inputs["counts"][fixtures.PRETRAIN_JSON]
    assert results["memory"]["count"] == count and results["memory"]["reused"] is False
    assert results["memory"]["key_dim"] == 2 * TINY_MODEL_WIDTH
    bank = manifest(results)
    assert (bank["count"], bank["key_dim"]) == (count, 2 * TINY_MODEL_WIDTH)
    assert bank["files"]["keys.bin"]["shape"] == [count, 2 * TINY_MODEL_WIDTH]
    assert [entry["shape"] for name, entry in bank["files"].items() if name.startswith("values")] == [[count, 32]]
    assert bank["extra"] == {"source": "llava:blip_laion_cc_sbu_558k.json:fraction=1.0:seed=0:template=plain",
                             "mode": "default"}
    # Leave-one-out inside the jitted step: a caption never retrieves itself.
    assert [r["own_id_retrieved"] for r in metrics(results["workdir"]) if "own_id_retrieved" in r] == [0.0] * 2
    assert results["data"]["build_reports"]["pretrain"]["skipped"] == {}
    assert results["data"]["build_reports"]["pretrain"]["total"] == count
    assert "vqa" not in results["eval"]      # the caption template has no question


def test_qwen2_bank_fingerprint_is_the_one_of_the_loaded_towers(inputs, qwen2_runs):
    results = qwen2_runs[0]
    config = load_config(f"{QWEN2}:stage=1", [o[len("--config."):] for o in
                                              overrides(inputs, "siglip_full", "qwen2", 1)])
    tokenizer = setup.load_tokenizer(config, results["workdir"], sources={})
    vision_cfg, vision_params, lm_cfg, lm_params = setup.load_towers(config, tokenizer)
    cfg = setup.model_config(config, vision_cfg, lm_cfg)
    assert (vision_cfg.variant, vision_cfg.use_head, lm_cfg.tie_word_embeddings, cfg.num_image_tokens) == (
        "siglip", True, True, (fixtures.IMAGE_SIZE // fixtures.PATCH_SIZE) ** 2)
    expected = memory_keys.memory_fingerprint({"vision": vision_params, "lm": lm_params}, cfg,
                                              manifest(results)["extra"]["source"], setup.TOKEN_VALUE_FORMAT)
    assert manifest(results)["encoder_fingerprint"] == expected


def test_qwen2_stage2_starts_from_stage1_and_overfits_the_mix(inputs, qwen2_runs):
    first, results, _ = qwen2_runs
    assert results["init"]["replaced"] == len(setup.read_checkpoint_params(first["workdir"])) > 0
    assert results["trainable"] == ["connector", "retrieval_connector", "lm"]
    losses = assert_finite_losses(results, STAGE2_STEPS)
    assert losses[-1] < losses[0]
    # A new bank over the mix (text-only sample included), with its own fingerprint.
    assert results["memory"]["count"] == inputs["counts"][fixtures.MIX_JSON] and not results["memory"]["reused"]
    assert manifest(results)["encoder_fingerprint"] != manifest(first)["encoder_fingerprint"]
    assert results["data"]["train_skipped"]["skipped"] == {}
    vqa = results["eval"]["vqa"]
    assert vqa["count"] == inputs["counts"][fixtures.EVAL_JSON] and 0.0 <= vqa["accuracy"] <= 1.0
    assert results["eval"]["vqa_accuracy"] == vqa["accuracy"]


def test_qwen2_eval_command_reproduces_the_final_evaluation(qwen2_runs):
    _, results, evaluated = qwen2_runs
    assert evaluated["restored_params"] > 0 and evaluated["memory"]["reused"] is True
    assert evaluated["eval_loss"] == pytest.approx(results["eval"]["loss"], rel=1e-5)
    assert evaluated["vqa_accuracy"] == results["eval"]["vqa"]["accuracy"]


def test_qwen2_generation_stops_at_the_chatml_end_of_turn(inputs):
    tokenizer = Tokenizer.from_folder(str(inputs["root"] / "qwen2"))
    stops = setup.stop_token_ids(tokenizer, chat_templates.get_template("qwen2"))
    assert stops == [tokenizer.token_to_id("<|im_end|>")]   # the Instruct model's EOS is <|im_end|>


# -------------------------------------------------------------------------------------------- phi-2 faithful
def test_phi2_faithful_stage1_uses_perceiver_values_and_no_leave_one_out(inputs, phi2_runs):
    results = phi2_runs[0]
    assert (results["stage"], results["mode"], results["k"]) == (1, "faithful", 4)
    assert_finite_losses(results, STAGE1_STEPS)
    count = inputs["counts"][fixtures.PRETRAIN_JSON]
    # Keys are pooled LM-width vectors; values the seeded Perceiver's [8 latents x 96] per caption.
    assert (results["memory"]["count"], results["memory"]["key_dim"]) == (count, TINY_MODEL_WIDTH)
    value_shapes = [entry["shape"] for name, entry in manifest(results)["files"].items() if name.startswith("values")]
    assert value_shapes == [[count, 8, 96]]
    assert manifest(results)["extra"]["source"] == "llava:blip_laion_cc_sbu_558k.json:template=plain"
    # No leave-one-out: at the first step the connector is still the one the keys were made with, so each
    # caption's query equals its own key (score 1) and itself is exactly one of its k = 4 neighbours.
    first_step = [r for r in metrics(results["workdir"]) if "own_id_retrieved" in r][0]
    assert first_step["own_id_retrieved"] == pytest.approx(1 / 4)
    assert first_step["retrieval_score"] == pytest.approx(1.0, abs=1e-4)


def test_phi2_faithful_model_drops_token_zero_and_measures_text_start(inputs):
    config = load_config(f"{PHI2}:stage=2,k=4", [o[len("--config."):] for o in
                                                 overrides(inputs, "siglip_vision", "phi", 2, "unused")])
    tokenizer = Tokenizer.from_folder(config.model.lm_folder)
    vision_cfg, _, lm_cfg, _ = setup.load_towers(config, tokenizer)
    cfg = setup.model_config(config, vision_cfg, lm_cfg)
    assert cfg.num_image_tokens == vision_cfg.num_patches - 1 == 15
    assert (cfg.value_kind, cfg.leave_one_out, cfg.query.image_weight, cfg.query.text_weight) == (
        "latents", False, 0.4, 0.6)
    assert cfg.retrieval_connector.kind == "rag2x_gelu" and lm_cfg.family == "phi"
    # The query's text starts at the question, measured in this tokenizer, not the official hard-coded 35.
    with open(os.path.join(inputs["llava"], fixtures.MIX_JSON), encoding="utf-8") as file:
        conversation = json.load(file)[0]["conversations"]
    example = chat_templates.encode_conversation(tokenizer, chat_templates.get_template(config.data.template),
                                                 conversation, insert_retrieval=True)
    assert example.text_start != config.retrieval.text_start
    assert tokenizer.decode(example.input_ids[example.text_start:]).startswith("What color is the shape?")
    assert example.input_ids[example.text_start - 2] == chat_templates.RETRIEVAL_TOKEN_ID


def test_phi2_faithful_stage2_keeps_the_caption_bank_and_overfits(inputs, phi2_runs):
    first, results = phi2_runs
    assert results["init"]["replaced"] == len(setup.read_checkpoint_params(first["workdir"])) > 0
    losses = assert_finite_losses(results, STAGE2_STEPS)
    assert losses[-1] < losses[0]
    # Both stages search the stage-1 captions; stage 2 rebuilds them with its template and trained connector.
    assert results["memory"]["count"] == inputs["counts"][fixtures.PRETRAIN_JSON]
    assert manifest(results)["extra"]["source"] == "llava:blip_laion_cc_sbu_558k.json:template=phi"
    assert set(results["data"]["build_reports"]) == {"mix665k", "eval_stage2", "pretrain"}
    assert results["data"]["build_reports"]["mix665k"]["total"] == inputs["counts"][fixtures.MIX_JSON]
    vqa = results["eval"]["vqa"]
    assert vqa["count"] == inputs["counts"][fixtures.EVAL_JSON] and 0.0 <= vqa["accuracy"] <= 1.0


def test_a_registered_llava_name_for_another_json_is_a_clear_error(inputs):
    config = load_config(f"{QWEN2}:stage=1", [f"data.manual_dir={inputs['llava']}", "data.train_json=mine.json",
                                              f"data.data_dir={inputs['root'] / 'tfds_unused'}"])
    with pytest.raises(ValueError, match="'pretrain' is the registered LLaVA config.*mine.json.*train_name"):
        setup.data_sources(config)
