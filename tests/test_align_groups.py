"""Leave-one-out by group and a memory bank that does not depend on the fine-tuning fraction (issue 11).

A training sample that retrieves another question about its own image sees what no test sample can see, so
`leave_out='group'` excludes every bank entry of the sample's group (its image). Checked here: the group table
against a NumPy reference built from the records, the exclusion inside the jitted forward pass (tiny random model
on 8 fake devices, as in test_align_model.py), the pipeline field, and `build_run` on a tiny LLaVA folder: a bank
over 100% of the data next to a 40% training subset, the fingerprint, and one loss step on a real batch.
"""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxalign import sharding
from jaxalign.align import loss as loss_lib
from jaxalign.align import memory_keys, model as model_lib
from jaxalign.align.controls import RetrievalControl
from jaxalign.configs.base import load_config
from jaxalign.data import easy_vqa, pipeline
from jaxalign.data.chat_templates import get_template
from jaxalign.data.image_ops import SIGLIP_MEAN, SIGLIP_STD
from jaxalign.data.tokenizer import train_word_level_tokenizer
from jaxalign.memory import store
from jaxalign.memory.bank import MemoryBank
from jaxalign.models.connector import ConnectorConfig
from jaxalign.models.decoder import DecoderConfig
from jaxalign.models.vit import VisionConfig
from jaxalign.programs import tinyalign_setup as setup

B, L, K, LV = 8, 24, 2, 3
IMAGE_AT, RAG_AT, ANSWER = 2, 3, slice(8, 10)
FIRST_ID = 100
IMAGES = np.array([0, 0, 1, 1, 2, 2, 3, 3])   # the image of each sample of the model batch: pairs of siblings


def reference_members(rows, row_images, bank_ids, bank_images):
    """NumPy reference: for each row, the sorted bank ids of its image, -1 padded to the largest image group."""
    bank_ids, bank_images = np.asarray(bank_ids), np.asarray(bank_images)
    width = max(np.unique(bank_images, return_counts=True)[1].max(), 1)
    out = np.full((len(rows), width), -1, np.int32)
    for position, row in enumerate(rows):
        if row < 0:
            continue
        same = np.sort(bank_ids[bank_images == row_images[row]])
        out[position, :len(same)] = same
    return out


# --------------------------------------------------------------------------------------------- the table
def test_group_table_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 12, 60)
    bank_ids = np.sort(rng.choice(60, 40, replace=False))         # a bank over part of the source
    train_rows = rng.choice(60, 25, replace=False)                  # the training selection
    table = memory_keys.group_members(train_rows, [("image_id", images[r]) for r in train_rows], 60, bank_ids,
                                      [("image_id", images[b]) for b in bank_ids], same_source=True)
    asked = np.concatenate([train_rows, [-1]])                      # -1: a padding row of a batch
    np.testing.assert_array_equal(table(asked), reference_members(asked, images, bank_ids, images[bank_ids]))
    assert table.width == np.unique(images[bank_ids], return_counts=True)[1].max()
    with pytest.raises(ValueError, match="not in the selection"):
        table(np.setdiff1d(np.arange(60), train_rows)[:1])


def test_rows_without_an_image_are_their_own_group_only_in_the_same_source():
    keys = [("image_id", 7), None, ("image_id", 7), None]
    same = memory_keys.group_members([0, 1, 2, 3], keys, 4, [0, 1, 2, 3], keys, same_source=True)
    np.testing.assert_array_equal(same(np.array([0, 1, 2, 3])), [[0, 2], [1, -1], [0, 2], [3, -1]])
    # A separate memory source: ids name other records, a text-only row excludes nothing, images still match.
    other = memory_keys.group_members([0, 1], [("image_id", 7), None], 2, [5, 6, 9], [("image_id", 7), None,
                                                                                      ("image_id", 7)],
                                      same_source=False)
    np.testing.assert_array_equal(other(np.array([0, 1])), [[5, 9], [-1, -1]])


def test_image_keys_of_easy_vqa_and_llava_records():
    assert memory_keys.image_group_key({"image_id": np.int32(4), "image": b"png"}) == ("image_id", 4)
    assert memory_keys.image_group_key({"image_path": b"a/../x.png"}, "images") == ("path", "images/x.png")
    assert memory_keys.image_group_key({"image_path": b"", "image": b""}) is None    # text-only LLaVA record
    assert memory_keys.image_group_key({"image": b"abc"}) == memory_keys.image_group_key({"image": b"abc"})


# ------------------------------------------------------------------------------------ the pipeline field
@pytest.fixture(scope="module")
def records():
    return easy_vqa.question_records("test")[:120]


def test_training_batches_carry_each_samples_group_and_evaluation_batches_do_not(records):
    template = get_template("phi")
    tokenizer = train_word_level_tokenizer([r["question"] + " " + r["answer"] for r in records]
                                           + [template.system_message + " USER: ASSISTANT:"])
    images = np.array([record["image_id"] for record in records])
    bank_ids = np.sort(pipeline.select_fraction(120, 0.5, 0))
    keys = memory_keys.record_group_keys(records, np.arange(120))
    table = memory_keys.group_members(np.arange(120), keys, 120, bank_ids, [keys[i] for i in bank_ids], True)
    options = dict(image_size=16, mean=SIGLIP_MEAN, std=SIGLIP_STD, max_length=48, batch_size=8, verbose=False,
                   process_index=0, process_count=1, group_members=table)
    batches = pipeline.make_vqa_dataset(records, tokenizer, template, seed=0, **options)
    for batch in [next(batches) for _ in range(3)]:
        rows = batch["sample_index"]
        np.testing.assert_array_equal(batch["group_member_ids"],
                                      reference_members(rows, images, bank_ids, images[bank_ids]))
    assert any((images[bank_ids] == images[row]).sum() > 1 for row in rows)  # siblings do occur
    evaluation = next(iter(pipeline.make_eval_dataset(records, tokenizer, template, **options)))
    assert "group_member_ids" not in evaluation


# -------------------------------------------------------------------------------- inside the jitted step
@pytest.fixture(scope="module")
def model_run(eight_devices):
    cfg = model_lib.TinyAlignConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2, use_head=False),
        lm=DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2),
        connector=ConnectorConfig("mlp2x_gelu", 16, 32), retrieval_connector=ConnectorConfig("linear", 32, 32),
        k=K, value_length=LV, max_length=L)
    mesh = sharding.make_mesh((2, 4, 1))
    params = sharding.shard_params(model_lib.init(cfg, jax.random.PRNGKey(0), identity_retrieval=True),
                                   model_lib.logical_axes(cfg), mesh)
    rng = np.random.default_rng(0)
    # Two questions per image with the same prompt and pixels and different answers: siblings have equal keys.
    ids = rng.integers(3, 64, (B, L)).astype(np.int32)
    ids[1::2, :ANSWER.start] = ids[0::2, :ANSWER.start]
    ids[:, IMAGE_AT], ids[:, RAG_AT] = -200, -300
    labels = np.full((B, L), -100, np.int32)
    labels[:, ANSWER] = ids[:, ANSWER]
    mask = np.zeros((B, L), np.int32)
    mask[:, :10] = 1
    pixels = rng.normal(size=(B // 2, 16, 16, 3)).astype(np.float32)[IMAGES]
    sample_ids = np.arange(FIRST_ID, FIRST_ID + B, dtype=np.int32)
    keys = [("image_id", int(image)) for image in IMAGES]
    table = memory_keys.group_members(sample_ids, keys, FIRST_ID + B, sample_ids, keys, same_source=True)
    batch = dict(pixels=pixels, input_ids=ids, labels=labels, attention_mask=mask,
                 image_index=np.full(B, IMAGE_AT, np.int32), retrieval_index=np.full(B, RAG_AT, np.int32),
                 text_start=np.full(B, 4, np.int32), sample_index=sample_ids, group_member_ids=table(sample_ids))
    encode = jax.jit(model_lib.make_bank_encoder(cfg))
    bank_keys, values = encode(params, None, dict(batch, value_tokens=memory_keys.answer_token_values(labels, LV)))
    bank = MemoryBank.from_arrays(np.asarray(bank_keys), {"tokens": np.asarray(values["tokens"])}, sample_ids,
                                  mesh=mesh)
    memory = memory_keys.RetrievalMemory.create(bank, shuffle_seed=0)
    group_cfg = dataclasses.replace(cfg, leave_out_group=True)
    variants = {"self": (cfg, True), "group": (group_cfg, True), "eval": (group_cfg, False),
                "group_shuffled": (dataclasses.replace(group_cfg, control=RetrievalControl("shuffled")), True)}

    @jax.jit
    def run_all(params, batch, memory):
        aux = {name: model_lib.build_lm_inputs(params, c, batch, memory, train)[1]
               for name, (c, train) in variants.items()}
        metrics = {name: loss_lib.make_loss_fn(c, memory, train=True)(params, batch, None)[1]
                   for name, c in (("self", cfg), ("group", group_cfg))}
        return aux, metrics

    aux, metrics = jax.device_get(run_all(params, sharding.global_batch(batch, mesh), memory))
    return dict(cfg=cfg, aux=aux, metrics=metrics, batch=batch, params=params, memory=memory, mesh=mesh)


def images_of(ids):
    return np.where(ids >= 0, IMAGES[np.clip(ids - FIRST_ID, 0, B - 1)], -1)


def test_with_group_a_query_never_retrieves_an_entry_of_its_own_image(model_run):
    retrieved = model_run["aux"]["group"]["retrieved_ids"]
    assert (retrieved >= FIRST_ID).all()
    assert not (images_of(retrieved) == IMAGES[:, None]).any()


def test_with_self_a_query_retrieves_its_sibling_but_not_itself(model_run):
    retrieved = model_run["aux"]["self"]["retrieved_ids"]
    own = model_run["batch"]["sample_index"][:, None]
    assert not (retrieved == own).any()
    # The sibling's key equals the query (same prompt and pixels), so it is the first neighbour.
    np.testing.assert_array_equal(retrieved[:, 0], own[:, 0] ^ 1)
    np.testing.assert_array_equal(images_of(retrieved[:, 0]), IMAGES)


def test_evaluation_excludes_nothing(model_run):
    retrieved = model_run["aux"]["eval"]["retrieved_ids"]
    np.testing.assert_array_equal(images_of(retrieved[:, 0]), IMAGES)   # score 1: its own image's pair
    np.testing.assert_allclose(model_run["aux"]["eval"]["scores"][:, 0], 1.0, atol=1e-5)


def test_group_diagnostics_count_any_retrieval_of_the_own_image(model_run):
    self_metrics, group_metrics = model_run["metrics"]["self"], model_run["metrics"]["group"]
    assert float(self_metrics["own_id_retrieved"]) == float(group_metrics["own_id_retrieved"]) == 0.0
    retrieved = model_run["aux"]["self"]["retrieved_ids"]
    expected = (images_of(retrieved) == IMAGES[:, None]).mean()      # k = 2: the sibling, then another image
    assert float(self_metrics["same_group_retrieved"]) == pytest.approx(expected) == pytest.approx(0.5)
    assert float(group_metrics["same_group_retrieved"]) == 0.0


def test_a_control_with_group_exclusion_never_reads_the_own_value(model_run):
    aux = model_run["aux"]["group_shuffled"]
    np.testing.assert_array_equal(aux["retrieved_ids"], model_run["aux"]["group"]["retrieved_ids"])
    assert not (aux["value_ids"] == model_run["batch"]["sample_index"][:, None]).any()


def test_group_without_the_batch_field_is_a_clear_error(model_run):
    cfg = dataclasses.replace(model_run["cfg"], leave_out_group=True)
    batch = {name: value for name, value in model_run["batch"].items() if name != "group_member_ids"}
    with pytest.raises(ValueError, match="group_member_ids"):
        model_lib.excluded_ids(cfg, batch, train=True)
    assert model_lib.excluded_ids(cfg, batch, train=False) is None
    assert (cfg.leave_out, model_run["cfg"].leave_out,
            dataclasses.replace(cfg, leave_one_out=False).leave_out) == ("group", "self", "none")


# ------------------------------------------------------------------------------ a run's bank and groups
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
QUESTIONS = (("what color is the shape?", None), ("is there a circle?", "yes"), ("what shape is it?", "circle"))


def write_llava_folder(root):
    """questions.json: 3 questions about each of 4 images and 1 text-only question (13 records); eval.json."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    questions = []
    for color, rgb in COLORS.items():
        Image.new("RGB", (32, 32), rgb).save(os.path.join(root, "images", f"{color}.png"))
        for index, (question, answer) in enumerate(QUESTIONS):
            questions.append({"id": f"{color}-{index}", "image": f"images/{color}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer or color}]})
    questions.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "what color is the sky?"}, {"from": "gpt", "value": "blue"}]})
    for name, content in (("questions.json", questions), ("eval.json", questions[:4])):
        with open(os.path.join(root, name), "w") as file:
            json.dump(content, file)
    return len(questions)


@pytest.fixture(scope="module")
def llava(tmp_path_factory, eight_devices):
    root = tmp_path_factory.mktemp("groups")
    count = write_llava_folder(str(root / "llava"))

    def run(*overrides, arg="fraction=0.4,memory_fraction=1.0,leave_out=group"):
        config = load_config(f"jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava,{arg}", [
            f"data.manual_dir={root / 'llava'}", f"data.data_dir={root / 'tfds'}", "progress=False",
            f"retrieval.memory_dir={root / 'memory'}", "retrieval.build_batch_size=8", *overrides])
        return setup.build_run(config, str(root / "run"))

    return dict(root=root, count=count, run=run, first=run())


def test_a_full_memory_next_to_a_40_percent_training_subset(llava):
    run, count = llava["first"], llava["count"]
    assert run.cfg.leave_out == "group" and run.memory_info["fraction"] == 1.0
    assert run.memory_info["count"] == count and not run.memory_info["reused"]
    bank_ids = run.memory.bank.host_ids()
    np.testing.assert_array_equal(bank_ids, np.arange(count))        # every row, ids = source rows
    training = pipeline.select_fraction(count, 0.4, 0)
    assert len(training) == round(0.4 * count) and np.isin(training, bank_ids).all()
    batches = pipeline.make_vqa_dataset(run.sources["train"], batch_size=8, seed=0, fraction=0.4, fraction_seed=0,
                                        process_index=0, process_count=1, verbose=False, **run.data_options)
    assert set(next(batches)["sample_index"]) <= set(training.tolist())


def test_the_runs_groups_are_the_images_of_the_records(llava):
    run, count = llava["first"], llava["count"]
    source = run.sources["train"]
    paths = [source[row]["image_path"].decode() or f"row-{row}" for row in range(count)]   # text-only: itself
    _, images = np.unique(paths, return_inverse=True)
    training = pipeline.select_fraction(count, 0.4, 0)
    table = run.data_options["group_members"]
    np.testing.assert_array_equal(table(training), reference_members(training, images, np.arange(count), images))
    assert run.memory_info["groups"] == {"group_by": "image", "leave_out": "group", "count": 5, "largest": 3}
    # The tfds fast path (one feature parsed from the raw record) agrees with decoding whole records.
    assert memory_keys._tfds_group_keys(source, np.arange(count), "") is not None
    assert memory_keys.record_group_keys(source, np.arange(count)) == [
        memory_keys.image_group_key(source[row]) for row in range(count)]


def test_one_training_step_never_retrieves_the_own_image(llava):
    run = llava["first"]
    batches = pipeline.make_vqa_dataset(run.sources["train"], batch_size=8, seed=0, fraction=0.4, fraction_seed=0,
                                        process_index=0, process_count=1, verbose=False, **run.data_options)
    batch = sharding.global_batch(model_lib.numpy_batch(next(batches)), run.mesh)
    metrics = jax.jit(lambda p, b, m: loss_lib.make_loss_fn(run.cfg, m, train=True)(p, b, None)[1])(
        run.params, batch, run.memory)
    assert float(metrics["same_group_retrieved"]) == float(metrics["own_id_retrieved"]) == 0.0


def test_the_fingerprint_follows_the_memory_fraction_not_the_leave_out(llava):
    root = llava["root"]
    full = store.read_manifest(str(root / "memory"))
    assert full["extra"]["source"] == "llava:questions.json:fraction=1.0:seed=0:template=qwen2"
    # 'self' and 'group' search the same bank, so that comparing them compares only what is left out.
    again = llava["run"]("retrieval.memory_fraction=1.0", arg="fraction=0.4,leave_out=self")
    assert again.memory_info["reused"] and again.cfg.leave_out == "self"
    # 'same' is the bank of the 40% subset: another fingerprint.
    same = llava["run"](f"retrieval.memory_dir={root / 'memory_subset'}",
                        arg="fraction=0.4,memory_fraction=same,leave_out=group")
    assert same.memory_info["count"] == round(0.4 * llava["count"]) and not same.memory_info["reused"]
    subset = store.read_manifest(str(root / "memory_subset"))
    assert subset["encoder_fingerprint"] != full["encoder_fingerprint"]
    assert subset["extra"]["source"] == "llava:questions.json:fraction=0.4:seed=0:template=qwen2"
    with pytest.raises(ValueError, match="memory_fraction"):
        llava["run"](arg="fraction=0.4,memory_fraction=1.5")
