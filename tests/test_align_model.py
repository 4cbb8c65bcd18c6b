"""The TinyAlign forward pass on a (2, 4, 1) mesh of 8 fake devices, with tiny random towers and a bank made
by the model's own key function: no loss on image / retrieved positions, leave-one-out, controls, 'off'."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxalign import sharding
from jaxalign.align import loss as loss_lib
from jaxalign.align import memory_keys, model as model_lib, splice
from jaxalign.align.controls import RetrievalControl
from jaxalign.memory.bank import MemoryBank
from jaxalign.models.connector import ConnectorConfig
from jaxalign.models.decoder import DecoderConfig
from jaxalign.models.vit import VisionConfig

B, L, K, LV = 8, 24, 2, 3
IMAGE_AT, RAG_AT, ANSWER = 2, 3, slice(8, 10)


@pytest.fixture(scope="module")
def setup(eight_devices):
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
    ids = rng.integers(3, 64, (B, L)).astype(np.int32)
    ids[:, IMAGE_AT], ids[:, RAG_AT] = -200, -300
    labels = np.full((B, L), -100, np.int32)
    labels[:, ANSWER] = ids[:, ANSWER]
    mask = np.zeros((B, L), np.int32)
    mask[:, :10] = 1
    batch = dict(pixels=rng.normal(size=(B, 16, 16, 3)).astype(np.float32), input_ids=ids, labels=labels,
                 attention_mask=mask, image_index=np.full(B, IMAGE_AT, np.int32),
                 retrieval_index=np.full(B, RAG_AT, np.int32), text_start=np.full(B, 4, np.int32),
                 sample_index=np.arange(100, 100 + B, dtype=np.int32))
    # The bank holds the batch's own samples (ids 100..107), keys from the model's key function.
    encode = jax.jit(model_lib.make_bank_encoder(cfg))
    keys, values = encode(params, None, dict(batch, value_tokens=memory_keys.answer_token_values(labels, LV)))
    bank = MemoryBank.from_arrays(np.asarray(keys), {"tokens": np.asarray(values["tokens"])}, batch["sample_index"],
                                  mesh=mesh)
    memory = memory_keys.RetrievalMemory.create(bank, shuffle_seed=0)
    variants = {"train": (cfg, True), "eval": (cfg, False),
                "shuffled": (dataclasses.replace(cfg, control=RetrievalControl("shuffled")), True),
                "constant": (dataclasses.replace(cfg, control=RetrievalControl("constant", constant_row=3)), True),
                "off": (dataclasses.replace(cfg, control=RetrievalControl("off")), True)}

    @jax.jit
    def run_all(params, batch, memory):
        out = {name: model_lib.build_lm_inputs(params, c, batch, None if name == "off" else memory, train)
               for name, (c, train) in variants.items()}
        hidden, spliced_labels, aux = model_lib.vlm_forward(params, cfg, batch, memory, None, True)
        return out, (hidden, spliced_labels, aux)

    device_batch = sharding.global_batch(batch, mesh)
    outputs, forward = run_all(params, device_batch, memory)
    return dict(cfg=cfg, params=params, batch=batch, memory=memory, outputs=jax.device_get(outputs),
                forward=forward, values=np.asarray(values["tokens"]))


def test_sequence_layout_and_no_loss_on_image_or_retrieved_positions(setup):
    spliced, aux = setup["outputs"]["train"]
    kinds, labels = spliced.token_kind, spliced.labels
    num_image, num_retrieved = setup["cfg"].num_image_tokens, K * LV
    expected = [splice.TEXT] * IMAGE_AT + [splice.IMAGE] * num_image + [splice.RETRIEVED] * num_retrieved
    for row in range(B):
        real_values = int((setup["values"][aux["value_ids"][row] - 100] >= 0).sum())
        assert list(kinds[row, :IMAGE_AT + num_image + real_values]) == expected[:IMAGE_AT + num_image + real_values]
    assert (labels[(kinds == splice.IMAGE) | (kinds == splice.RETRIEVED)] == -100).all()
    # The answer tokens kept their labels, after the inserted tokens.
    assert sorted(labels[labels != -100].tolist()) == sorted(setup["batch"]["labels"][:, ANSWER].ravel().tolist())
    mask = np.asarray(loss_lib.loss_mask(labels, kinds))
    assert mask.sum() == B * 2 and not mask[(kinds[:, 1:] != splice.TEXT)].any()


def test_labels_at_image_and_retrieved_positions_cannot_change_the_loss(setup):
    hidden, labels, aux = setup["forward"]
    lm, cfg = setup["params"]["lm"], setup["cfg"].lm
    loss, count = loss_lib.answer_loss(hidden, labels, aux["token_kind"], lm, cfg)
    poisoned = np.where(np.isin(np.asarray(aux["token_kind"]), [splice.IMAGE, splice.RETRIEVED]), 5,
                        np.asarray(labels))
    poisoned_loss, poisoned_count = loss_lib.answer_loss(hidden, poisoned, aux["token_kind"], lm, cfg)
    assert float(count) == B * 2 == float(poisoned_count)
    np.testing.assert_allclose(float(poisoned_loss), float(loss), rtol=1e-6)


def test_leave_one_out_in_training_but_not_in_evaluation(setup):
    own = setup["batch"]["sample_index"][:, None]
    train_ids = setup["outputs"]["train"][1]["retrieved_ids"]
    eval_ids = setup["outputs"]["eval"][1]["retrieved_ids"]
    assert (train_ids >= 100).all() and not (train_ids == own).any()
    # Keys and queries come from the same function, so without exclusion each sample finds itself first.
    np.testing.assert_array_equal(eval_ids[:, 0], own[:, 0])


def test_controls_change_only_which_values_are_read(setup):
    real = setup["outputs"]["train"][1]
    shuffled = setup["outputs"]["shuffled"][1]
    constant = setup["outputs"]["constant"][1]
    np.testing.assert_array_equal(shuffled["retrieved_ids"], real["retrieved_ids"])   # same search
    np.testing.assert_array_equal(real["value_ids"], real["retrieved_ids"])
    permutation = np.asarray(setup["memory"].permutation)
    own_row = setup["batch"]["sample_index"][:, None] - 100
    mapped = permutation[real["retrieved_ids"] - 100]
    mapped = np.where(mapped == own_row, permutation[mapped], mapped)
    np.testing.assert_array_equal(shuffled["value_ids"], mapped + 100)
    expected_constant = np.where(own_row == 3, 104, 103) * np.ones_like(real["retrieved_ids"])
    np.testing.assert_array_equal(constant["value_ids"], expected_constant)


def test_retrieval_off_is_the_plain_baseline(setup):
    spliced, aux = setup["outputs"]["off"]
    assert not (spliced.token_kind == splice.RETRIEVED).any() and "retrieved_ids" not in aux
    # Image tokens replace the image sentinel, the retrieval sentinel is removed, the text follows at once.
    num_image = setup["cfg"].num_image_tokens
    assert (spliced.token_kind[:, IMAGE_AT:IMAGE_AT + num_image] == splice.IMAGE).all()
    assert spliced.attention_mask.sum(1).tolist() == [10 - 2 + num_image] * B


def test_a_batch_padded_to_a_smaller_length_bucket_gives_the_same_loss(setup):
    # Rows hold 10 text positions (2 sentinels) -> at most 8 text + 4 image + 6 retrieved = 18 spliced positions: a
    # bucket of 20 holds them: the text is padded to 20 instead of 24 and the spliced sequence is cut at 20.
    cfg, params, memory, batch = setup["cfg"], setup["params"], setup["memory"], setup["batch"]
    assert 10 - 2 + cfg.num_image_tokens + cfg.num_retrieved_tokens == 18
    bucketed = {name: value[:, :20] if value.ndim == 2 else value for name, value in batch.items()}
    loss_fn = jax.jit(lambda p, b, m: loss_lib.make_loss_fn(cfg, m, train=True)(p, b, None))
    mesh = sharding.make_mesh((2, 4, 1))
    full_loss, full_metrics = loss_fn(params, sharding.global_batch(batch, mesh), memory)
    bucket_loss, bucket_metrics = loss_fn(params, sharding.global_batch(bucketed, mesh), memory)
    spliced, _ = jax.jit(lambda p, b, m: model_lib.build_lm_inputs(p, cfg, b, m, True))(
        params, sharding.global_batch(bucketed, mesh), memory)
    full = setup["outputs"]["train"][0]  # the same batch at width 24: only padding is cut off
    assert spliced.attention_mask.shape == (B, 20) and not full.attention_mask[:, 20:].any()
    np.testing.assert_array_equal(spliced.attention_mask, full.attention_mask[:, :20])
    np.testing.assert_array_equal(spliced.labels, full.labels[:, :20])
    np.testing.assert_allclose(spliced.inputs_embeds, full.inputs_embeds[:, :20], rtol=1e-6)
    assert float(bucket_metrics["num_tokens"]) == float(full_metrics["num_tokens"]) == B * 2
    np.testing.assert_allclose(float(bucket_loss), float(full_loss), rtol=1e-5)
