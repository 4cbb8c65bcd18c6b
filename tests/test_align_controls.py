"""Retrieval controls that can tell (issue 11): 'oracle', 'shuffle_within_group' and 'constant' next to 'real'.

A tiny random TinyAlign model on 8 fake devices (as in test_align_groups.py) with a bank built the real way from
64 easy-vqa test questions (`memory_keys.memory_batches` + `build_bank`: ids are source rows, values the answer
tokens). Checked against NumPy references from the records: the oracle value is the sample's own answer tokens in
training, evaluation and generation batches; a within-group shuffle moves values only between rows of one
question type, is fixed by its seed and keeps the answer-type distribution of the real values; 'constant' gives
every slot one value; no control but 'oracle' hands a training sample its own value (or, with leave_out 'group',
one of its image); every control runs at k = 1 and k = 10. Then `build_run` on a tiny LLaVA folder: the oracle's
batch field in training, scoring and generation batches, and the bank rows' labels read from the tfds records.
"""
import collections
import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxalign import sharding
from jaxalign.align import controls, loss as loss_lib
from jaxalign.align import memory_keys, model as model_lib
from jaxalign.align.controls import RetrievalControl
from jaxalign.configs.base import load_config
from jaxalign.data import easy_vqa, pipeline
from jaxalign.data.chat_templates import get_template
from jaxalign.data.image_ops import SIGLIP_MEAN, SIGLIP_STD
from jaxalign.data.tokenizer import train_word_level_tokenizer
from jaxalign.models.connector import ConnectorConfig
from jaxalign.models.decoder import DecoderConfig
from jaxalign.models.vit import VisionConfig
from jaxalign.programs import tinyalign_setup as setup

BANK, EVAL, B, LV, L, K_MAX = 64, 8, 8, 4, 80, 10
CONTROLS = ("real", "shuffled", "shuffle_within_group", "constant", "oracle")
CONSTANT_ROW = 5


def answer_reference(tokenizer, answers):
    """NumPy reference of a value: the answer's word ids, then EOS (the phi template's labels), -1 padded."""
    out = np.full((len(answers), LV), -1, np.int32)
    for row, answer in enumerate(answers):
        ids = [tokenizer.token_to_id(word) for word in answer.split()] + [tokenizer.eos_id]
        out[row, :min(len(ids), LV)] = ids[:LV]
    return out


@pytest.fixture(scope="module")
def run(eight_devices):
    records = easy_vqa.question_records("test")[:BANK + EVAL]
    bank_records, eval_records = records[:BANK], records[BANK:]
    # A short system message keeps the sequences short; the phi template's labels are "answer <eos>".
    template = dataclasses.replace(get_template("phi"), system_message="chat")
    tokenizer = train_word_level_tokenizer([r["question"] + " " + r["answer"] for r in records]
                                           + ["chat USER: ASSISTANT:"])
    cfg = model_lib.TinyAlignConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2, use_head=False),
        lm=DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2),
        connector=ConnectorConfig("mlp2x_gelu", 16, 32), retrieval_connector=ConnectorConfig("linear", 32, 32),
        k=3, value_length=LV, max_length=L)
    mesh = sharding.make_mesh((2, 4, 1))
    params = sharding.shard_params(model_lib.init(cfg, jax.random.PRNGKey(0), identity_retrieval=True),
                                   model_lib.logical_axes(cfg), mesh)
    options = dict(tokenizer=tokenizer, template=template, image_size=16, mean=SIGLIP_MEAN, std=SIGLIP_STD,
                   max_length=L, insert_retrieval=True, image_length=cfg.num_image_tokens,
                   retrieval_length=K_MAX * LV, verbose=False, process_index=0, process_count=1)

    # The bank, as tinyalign_setup.build_memory builds it.
    encode = jax.jit(lambda batch: model_lib.make_bank_encoder(cfg)(params, None, batch))
    bank = memory_keys.build_bank(encode, memory_keys.memory_batches(
        pipeline.make_eval_dataset(bank_records, batch_size=16, **options), tokenizer, "tokens", LV), mesh,
        progress=False)
    memories = {"plain": memory_keys.RetrievalMemory.create(bank),
                "shuffled": memory_keys.RetrievalMemory.create(bank, shuffle_seed=0)}
    memories["within"], within_info = memory_keys.control_memory(
        bank, RetrievalControl("shuffle_within_group", seed=0), bank_records)

    # Training batches of the bank's own records (leave-one-out applies), with groups (image) and oracle values.
    keys = memory_keys.record_group_keys(bank_records, np.arange(BANK))
    groups = memory_keys.group_members(np.arange(BANK), keys, BANK, np.arange(BANK), keys, same_source=True)
    oracle = memory_keys.oracle_values(LV)
    train_batch = next(pipeline.make_vqa_dataset(bank_records, batch_size=B, seed=0, group_members=groups,
                                                 oracle_values=oracle, **options))
    generation = next(iter(pipeline.make_eval_dataset(eval_records, batch_size=B, for_generation=True,
                                                      oracle_values=oracle, **options)))
    scoring = next(iter(pipeline.make_eval_dataset(eval_records, batch_size=B, oracle_values=oracle, **options)))

    group_cfg = dataclasses.replace(cfg, leave_out_group=True)
    variants = {}   # name -> (cfg, memory name, train)
    for kind, memory in (("real", "plain"), ("shuffled", "shuffled"), ("shuffle_within_group", "within"),
                         ("constant", "plain"), ("oracle", "plain")):
        control = RetrievalControl(kind, constant_row=CONSTANT_ROW)
        variants[kind] = (dataclasses.replace(cfg, control=control), memory, True)
        variants[f"{kind}/group"] = (dataclasses.replace(group_cfg, control=control), memory, True)

    # One small program per variant: XLA's in-process CPU collectives can time out (40 s rendezvous) in one
    # program holding many independent searches when the 2 cores are busy.
    device_batch = sharding.global_batch(model_lib.numpy_batch(train_batch), mesh)
    aux = {name: jax.device_get(lm_inputs_aux(params, device_batch, memories[memory], c, train))
           for name, (c, memory, train) in variants.items()}
    return dict(records=records, bank_records=bank_records, eval_records=eval_records, tokenizer=tokenizer,
                cfg=cfg, mesh=mesh, params=params, bank=bank, memories=memories, within_info=within_info,
                train_batch=train_batch, generation=generation, scoring=scoring, aux=aux)


@functools.partial(jax.jit, static_argnames=("cfg", "train"))
def lm_inputs_aux(params, batch, memory, cfg, train):
    return model_lib.build_lm_inputs(params, cfg, batch, memory, train)[1]


@functools.partial(jax.jit, static_argnames=("cfg",))
def training_loss(params, batch, memory, cfg):
    """(loss, metrics, value_token_ids, value_ids) of one training step's forward pass."""
    hidden, labels, aux = model_lib.vlm_forward(params, cfg, batch, memory, None, True)
    loss_sum, count = loss_lib.answer_loss(hidden, labels, aux["token_kind"], params["lm"], cfg.lm)
    own = model_lib.sample_ids_equal(aux["retrieved_ids"], batch["sample_index"])
    return loss_sum / count, jax.numpy.mean(own), aux["value_token_ids"], aux["value_ids"]


def field(records, name, ids):
    values = np.array([record[name] for record in records], dtype=object)
    return np.where(ids >= 0, values[np.clip(ids, 0, len(records) - 1)], None)


# -------------------------------------------------------------------------------------------------- oracle
def test_the_bank_values_are_the_answer_tokens(run):
    values = np.asarray(jax.device_get(run["bank"].values["tokens"]))[:BANK]
    answers = [record["answer"] for record in run["bank_records"]]
    np.testing.assert_array_equal(values, answer_reference(run["tokenizer"], answers))


def test_oracle_values_of_a_training_batch_are_the_samples_own_answers(run):
    batch = run["train_batch"]
    answers = field(run["bank_records"], "answer", batch["sample_index"])
    expected = answer_reference(run["tokenizer"], answers)
    np.testing.assert_array_equal(batch[pipeline.ORACLE_FIELD], expected)
    # The model puts it in every slot the search filled; nothing else changes the search.
    aux = run["aux"]["oracle"]
    np.testing.assert_array_equal(aux["value_token_ids"], np.repeat(expected[:, None], 3, axis=1))
    np.testing.assert_array_equal(aux["retrieved_ids"], run["aux"]["real"]["retrieved_ids"])
    assert (aux["value_ids"] == -1).all()   # no bank row: the value came from the batch
    # 'real' reads the neighbours' values, which are the bank's rows.
    real = run["aux"]["real"]
    np.testing.assert_array_equal(real["value_token_ids"], answer_reference(
        run["tokenizer"], field(run["bank_records"], "answer", real["value_ids"]).ravel()).reshape(B, 3, LV))


def test_oracle_values_of_evaluation_and_generation_batches(run):
    expected = answer_reference(run["tokenizer"], [record["answer"] for record in run["eval_records"]])
    for batch in (run["generation"], run["scoring"]):
        np.testing.assert_array_equal(batch["sample_index"], np.arange(EVAL))
        np.testing.assert_array_equal(batch[pipeline.ORACLE_FIELD], expected)
    assert (run["generation"]["labels"] == -100).all()   # prompts: the value was re-encoded from the record
    cfg = dataclasses.replace(run["cfg"], control=RetrievalControl("oracle"))
    prefill = jax.jit(lambda p, b, m: model_lib.build_lm_inputs(p, cfg, b, m, False, "left")[1]["value_token_ids"])
    ids = prefill(run["params"], sharding.global_batch(model_lib.numpy_batch(run["generation"]), run["mesh"]),
                  run["memories"]["plain"])
    np.testing.assert_array_equal(np.asarray(ids), np.repeat(expected[:, None], 3, axis=1))


def test_oracle_needs_its_batch_field_and_token_values(run):
    cfg = dataclasses.replace(run["cfg"], control=RetrievalControl("oracle"))
    batch = {name: value for name, value in model_lib.numpy_batch(run["train_batch"]).items()
             if name != pipeline.ORACLE_FIELD}
    with pytest.raises(ValueError, match="oracle_value_ids"):
        model_lib.build_lm_inputs(run["params"], cfg, batch, run["memories"]["plain"], True)
    with pytest.raises(ValueError, match="token values"):
        dataclasses.replace(cfg, value_kind="latents", retrieval_connector=ConnectorConfig("linear", 16, 32))
    with pytest.raises(ValueError, match="oracle"):
        controls.controlled_value_ids(RetrievalControl("oracle"), np.zeros((1, 1), np.int32), 4)


def test_a_caption_oracle_encodes_the_records_caption_as_a_caption_bank_does(run):
    """A bank of captions next to question data: the oracle value of a question is its image's caption."""
    options = dict(tokenizer=run["tokenizer"], template=get_template("plain"), image_size=16, mean=SIGLIP_MEAN,
                   std=SIGLIP_STD, max_length=L, verbose=False, process_index=0, process_count=1)
    records = [record for record in run["bank_records"] if record["caption"]][:B]
    captions = [{"id": "c", "image": record["image"], "caption": record["caption"],
                 "conversations": json.dumps(easy_vqa.caption_conversation(record["caption"]))}
                for record in records]
    bank_form = next(memory_keys.memory_batches(pipeline.make_eval_dataset(captions, batch_size=B, **options),
                                                run["tokenizer"], "tokens", LV))["value_tokens"]
    batch = next(iter(pipeline.make_eval_dataset(records, batch_size=B, for_generation=True, **options,
                                                 oracle_values=memory_keys.oracle_values(LV, "caption"))))
    np.testing.assert_array_equal(batch[pipeline.ORACLE_FIELD], bank_form)


class CountingRecords(list):
    """Records that count how often each index is read."""

    def __init__(self, records):
        super().__init__(records)
        self.reads = collections.Counter()

    def __getitem__(self, index):
        self.reads[int(index)] += 1
        return super().__getitem__(index)


def test_a_caption_oracle_reads_and_encodes_each_training_record_once_per_run(run):
    """Over several epochs every training batch carries its samples' captions in the bank's form, while the
    oracle reads a record once: epochs after the first take its rows from the iterator's cache."""
    options = dict(tokenizer=run["tokenizer"], template=get_template("plain"), image_size=16, mean=SIGLIP_MEAN,
                   std=SIGLIP_STD, max_length=L, verbose=False, process_index=0, process_count=1)
    records = [record for record in run["bank_records"] if record["caption"]][:2 * B]
    captions = [{"id": "c", "image": record["image"], "caption": record["caption"],
                 "conversations": json.dumps(easy_vqa.caption_conversation(record["caption"]))}
                for record in records]
    bank_form = next(memory_keys.memory_batches(pipeline.make_eval_dataset(captions, batch_size=len(records),
                                                                           **options),
                                                run["tokenizer"], "tokens", LV))["value_tokens"]
    reads = {}
    for oracle in (None, memory_keys.oracle_values(LV, "caption")):
        source = CountingRecords(records)
        batches = pipeline.make_vqa_dataset(source, batch_size=B, seed=0, num_epochs=3, oracle_values=oracle,
                                            cache_samples=True, **options)
        seen = 0
        for batch in batches:
            if oracle is not None:
                np.testing.assert_array_equal(batch[pipeline.ORACLE_FIELD], bank_form[batch["sample_index"]])
            seen += len(batch["sample_index"])
        assert seen == 3 * len(records)
        reads[oracle is not None] = source.reads
    extra = reads[True] - reads[False]   # the oracle's own reads
    assert extra == collections.Counter(range(len(records)))


# ------------------------------------------------------------------------------------ shuffle within group
def test_the_within_group_permutation_stays_in_each_question_type_and_is_fixed_by_its_seed(run):
    types = field(run["bank_records"], "question_type", np.arange(BANK))
    permutation = np.asarray(run["memories"]["within"].permutation)
    assert sorted(permutation.tolist()) == list(range(BANK))
    assert (types[permutation] == types).all()
    counts = collections.Counter(types.tolist())
    alone = np.array([counts[t] == 1 for t in types])
    np.testing.assert_array_equal(permutation == np.arange(BANK), alone)   # only a lone row keeps its value
    info = run["within_info"]["shuffle"]
    assert (info["group_by"], info["groups"], info["alone"]) == ("question_type", len(counts), int(alone.sum()))
    assert info["sizes"] == dict(counts)
    again, _ = memory_keys.control_memory(run["bank"], RetrievalControl("shuffle_within_group", seed=0),
                                          run["bank_records"])
    other, _ = memory_keys.control_memory(run["bank"], RetrievalControl("shuffle_within_group", seed=1),
                                          run["bank_records"])
    np.testing.assert_array_equal(np.asarray(again.permutation), permutation)
    assert (np.asarray(other.permutation) != permutation).any()
    # One group: the global 'shuffled' permutation exactly.
    np.testing.assert_array_equal(controls.within_group_permutation(["x"] * BANK, 0),
                                  controls.shuffle_permutation(BANK, 0))


def test_within_group_values_come_from_rows_of_the_retrieved_rows_question_type(run):
    aux, real = run["aux"]["shuffle_within_group"], run["aux"]["real"]
    records = run["bank_records"]
    np.testing.assert_array_equal(aux["retrieved_ids"], real["retrieved_ids"])
    found = aux["retrieved_ids"] >= 0
    assert found.all()
    np.testing.assert_array_equal(field(records, "question_type", aux["value_ids"]),
                                  field(records, "question_type", aux["retrieved_ids"]))
    assert (aux["value_ids"] != aux["retrieved_ids"]).mean() > 0.9
    # So the answer types of the values are those of the real values, slot by slot and in distribution.
    answer_types = np.vectorize(controls.answer_type)
    within_types = answer_types(field(records, "answer", aux["value_ids"]))
    real_types = answer_types(field(records, "answer", real["value_ids"]))
    np.testing.assert_array_equal(within_types, real_types)
    # Over the whole bank too; a global shuffle does not keep it row by row.
    answers = np.array([record["answer"] for record in records], dtype=object)
    within, shuffled = (np.asarray(run["memories"][name].permutation) for name in ("within", "shuffled"))
    assert collections.Counter(answer_types(answers[within])) == collections.Counter(answer_types(answers))
    assert (answer_types(answers[within]) == answer_types(answers)).all()
    assert (answer_types(answers[shuffled]) != answer_types(answers)).any()


def test_shuffle_labels_by_answer_type_and_wording(run):
    records = run["bank_records"]
    answer_types = memory_keys.record_shuffle_labels(records, np.arange(BANK), "answer_type")
    assert answer_types == [("yes/no" if r["answer"] in ("yes", "no") else "other") for r in records]
    wordings = memory_keys.record_shuffle_labels(records, np.arange(BANK), "wording")
    for record, wording in zip(records, wordings):
        assert not set(wording.replace("?", "").split()) & set(easy_vqa.COLORS + easy_vqa.SHAPES)
    distinct_wordings = len(set(wordings))   # several wordings, yet far fewer than the questions
    assert distinct_wordings > 1 and distinct_wordings < BANK
    # Without the question field the texts come from the conversation; captions have no question type.
    no_fields = [{"conversations": r["conversations"]} for r in records[:5]]
    assert memory_keys.record_shuffle_labels(no_fields, np.arange(5), "wording") == wordings[:5]
    assert memory_keys.record_shuffle_labels(no_fields, np.arange(5), "answer_type") == answer_types[:5]
    with pytest.raises(ValueError, match="answer_type"):
        memory_keys.record_shuffle_labels(no_fields, np.arange(5), "question_type")
    # 'auto': the question type where the records have one (easy-vqa questions), else the answer type.
    assert memory_keys.resolve_shuffle_group(records, "auto") == "question_type"
    assert memory_keys.resolve_shuffle_group(no_fields, "auto") == "answer_type"
    assert memory_keys.record_shuffle_labels(no_fields, np.arange(5), "auto") == answer_types[:5]


# --------------------------------------------------------------------------------------------- constant
def test_constant_gives_every_slot_one_value(run):
    aux = run["aux"]["constant"]
    own = run["train_batch"]["sample_index"][:, None]
    expected = np.where(own == CONSTANT_ROW, CONSTANT_ROW + 1, CONSTANT_ROW) * np.ones_like(aux["value_ids"])
    np.testing.assert_array_equal(aux["value_ids"], expected)
    tokens = aux["value_token_ids"][(own != CONSTANT_ROW)[:, 0]]
    assert (tokens == tokens[0, 0]).all()


# ---------------------------------------------------------------------------------------- no own values
@pytest.mark.parametrize("kind", ["real", "shuffled", "shuffle_within_group", "constant"])
def test_no_control_but_oracle_hands_a_training_sample_its_own_value(run, kind):
    batch = run["train_batch"]
    own = batch["sample_index"][:, None]
    assert not (run["aux"][kind]["value_ids"] == own).any()
    # With leave_out 'group' not a value of its own image either (the retrieved rows are of other images).
    grouped = run["aux"][f"{kind}/group"]["value_ids"]
    assert not model_lib.in_sample_group(grouped, batch[model_lib.GROUP_FIELD]).any()
    images = field(run["bank_records"], "image_id", batch["sample_index"])
    assert not (field(run["bank_records"], "image_id", grouped) == images[:, None]).any()


def test_group_exclusion_moves_a_remapped_row_off_every_excluded_row():
    permutation = controls.shuffle_permutation(8, seed=3)
    ids = np.array([[0, 1]])
    first = permutation[0]
    excluded = np.array([[first, permutation[first], -1]])          # the first two rows on 0's cycle
    rows = np.asarray(controls.controlled_value_ids(RetrievalControl("shuffled"), ids, 8, permutation, excluded))
    assert rows[0, 0] == permutation[permutation[first]] and not np.isin(rows, excluded).any()
    constant = controls.controlled_value_ids(RetrievalControl("constant", constant_row=2), ids, 8,
                                             exclude_ids=np.array([[2, 3, 5]]))
    np.testing.assert_array_equal(np.asarray(constant), [[4, 4]])
    # A large group (more than the unrolled moves): the next 20 rows on row 0's cycle are all excluded.
    permutation = controls.shuffle_permutation(40, seed=1)
    cycle = [int(permutation[0])]
    for _ in range(20):
        cycle.append(int(permutation[cycle[-1]]))
    rows = controls.controlled_value_ids(RetrievalControl("shuffled"), ids, 40, permutation,
                                         np.array([cycle[:20]]))
    assert int(rows[0, 0]) == cycle[20]


# ------------------------------------------------------------------------------------------- k = 1, 10
def test_every_control_runs_at_k_1_and_10(run):
    batch = sharding.global_batch(model_lib.numpy_batch(run["train_batch"]), run["mesh"])
    memory_of = {"shuffled": "shuffled", "shuffle_within_group": "within"}
    results = {}
    for kind in CONTROLS:
        for k in (1, 10):
            cfg = dataclasses.replace(run["cfg"], k=k, control=RetrievalControl(kind, constant_row=CONSTANT_ROW))
            memory = run["memories"][memory_of.get(kind, "plain")]
            results[(kind, k)] = jax.device_get(training_loss(run["params"], batch, memory, cfg))
    own = run["train_batch"]["sample_index"][:, None]
    for (kind, k), (loss, own_retrieved, token_ids, value_ids) in results.items():
        assert np.isfinite(loss) and loss > 0, (kind, k)
        assert token_ids.shape == (B, k, LV) and (token_ids[:, :, 0] >= 0).all(), (kind, k)
        assert float(own_retrieved) == 0.0
        if kind == "oracle":
            np.testing.assert_array_equal(token_ids, np.repeat(run["train_batch"][pipeline.ORACLE_FIELD][:, None],
                                                               k, axis=1))
        else:
            assert not (value_ids == own).any(), (kind, k)
    # The controls change the loss only through the values: one value per slot, k slots.
    assert len({round(float(results[(kind, 10)][0]), 6) for kind in CONTROLS}) > 1


# ------------------------------------------------------------------------------ a run's controls (LLaVA)
def write_llava_folder(root):
    """questions.json: 3 questions (one yes / no) about each of 4 single-colour images; eval.json: 4 of them."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    questions = []
    for color, rgb in {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220),
                       "yellow": (230, 220, 20)}.items():
        Image.new("RGB", (32, 32), rgb).save(os.path.join(root, "images", f"{color}.png"))
        for index, (question, answer) in enumerate((("what color is the shape?", color),
                                                    ("is there a red shape?", "yes" if color == "red" else "no"),
                                                    ("what shape is it?", "circle"))):
            questions.append({"id": f"{color}-{index}", "image": f"images/{color}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    for name, content in (("questions.json", questions), ("eval.json", questions[::3])):
        with open(os.path.join(root, name), "w") as file:
            json.dump(content, file)


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory, eight_devices):
    root = tmp_path_factory.mktemp("controls")
    write_llava_folder(str(root / "llava"))

    def build(arg):
        config = load_config(f"jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava,{arg}", [
            f"data.manual_dir={root / 'llava'}", f"data.data_dir={root / 'tfds'}", "progress=False",
            f"retrieval.memory_dir={root / 'memory'}", "retrieval.build_batch_size=8"])
        return setup.build_run(config, str(root / "run"))

    return build


def test_a_run_with_the_oracle_control_gives_every_batch_its_own_values(llava_run):
    run = llava_run("retrieval=oracle")
    assert run.cfg.control.kind == "oracle" and run.memory_info["oracle"] == {"value": "answer"}
    options = dict(process_index=0, process_count=1, verbose=False, **run.data_options)
    train = next(pipeline.make_vqa_dataset(run.sources["train"], batch_size=8, seed=0, **options))
    bank_values = np.asarray(jax.device_get(run.memory.bank.values["tokens"]))   # ids = training rows
    np.testing.assert_array_equal(train[pipeline.ORACLE_FIELD], bank_values[train["sample_index"]])
    scoring = next(iter(pipeline.make_eval_dataset(run.sources["eval"], batch_size=4, **options)))
    generation = next(iter(pipeline.make_eval_dataset(run.sources["eval"], batch_size=4, for_generation=True,
                                                      **options)))
    np.testing.assert_array_equal(generation[pipeline.ORACLE_FIELD], scoring[pipeline.ORACLE_FIELD])
    from jaxalign.programs import tinyalign_setup

    stop_ids = tinyalign_setup.stop_token_ids(run.tokenizer, run.template)  # values are text: no end-of-turn
    np.testing.assert_array_equal(scoring[pipeline.ORACLE_FIELD],
                                  memory_keys.answer_token_values(scoring["labels"], run.cfg.value_length, stop_ids))
    batch = sharding.global_batch(model_lib.numpy_batch(train), run.mesh)
    loss = jax.jit(lambda p, b, m: loss_lib.make_loss_fn(run.cfg, m, train=True)(p, b, None)[0])(
        run.params, batch, run.memory)
    assert np.isfinite(float(loss))


def test_a_run_with_the_within_group_control_reads_the_bank_rows_labels(llava_run):
    run = llava_run("retrieval=shuffle_within_group")
    assert run.cfg.control.shuffle_group == "auto"
    shuffle = run.memory_info["shuffle"]   # LLaVA records have no question type: 'auto' groups by answer type
    assert shuffle["group_by"] == "answer_type" and shuffle["sizes"] == {"other": 8, "yes/no": 4}
    source, ids = run.sources["train"], run.memory.bank.host_ids()
    labels = memory_keys.record_shuffle_labels(source, ids, "answer_type")   # tfds: two features parsed
    decoded = [dict(source[int(row)]) for row in ids]                        # whole records decoded
    assert labels == memory_keys.record_shuffle_labels(decoded, np.arange(len(ids)), "answer_type")
    assert memory_keys.record_shuffle_labels(source, ids, "wording") == memory_keys.record_shuffle_labels(
        decoded, np.arange(len(ids)), "wording")
    permutation = np.asarray(run.memory.permutation)
    assert (np.array(labels)[permutation] == np.array(labels)).all() and (permutation != np.arange(12)).all()
    with pytest.raises(ValueError, match="answer_type"):
        llava_run("retrieval=shuffle_within_group,shuffle_group=question_type")
