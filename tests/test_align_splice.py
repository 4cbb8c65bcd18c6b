"""Splicing [prefix][image][retrieved][rest]: exact values against a pure-Python reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.align import splice
from jaxalign.align.splice import IMAGE, PAD, RETRIEVED, TEXT
from jaxalign.data.chat_templates import IGNORE_LABEL as IGNORE
from jaxalign.data.chat_templates import IMAGE_TOKEN_ID, RETRIEVAL_TOKEN_ID
WIDTH = 3
splice_jit = jax.jit(splice.splice_inputs, static_argnames=("max_length", "padding_side", "ignore_label"))


def reference_splice(text, attention, labels, image_index, image, retrieved, retrieved_mask, retrieval_index,
                     out_length, padding_side="right"):
    """Lists of (embedding, label, kind) per row, built token by token."""
    rows = []
    for b in range(text.shape[0]):
        def retrieved_tokens():
            return [(retrieved[b, j], IGNORE, RETRIEVED) for j in range(retrieved.shape[1]) if retrieved_mask[b, j]]

        has_sentinel = retrieval_index is not None and retrieval_index[b] >= 0
        row = []
        for t in range(text.shape[1]):
            if not attention[b, t]:
                continue
            if t == image_index[b]:
                row += [(image[b, i], IGNORE, IMAGE) for i in range(image.shape[1])]
                if not has_sentinel:
                    row += retrieved_tokens()
            elif has_sentinel and t == retrieval_index[b]:
                row += retrieved_tokens()
            else:
                row.append((text[b, t], labels[b, t], TEXT))
        row = row[:out_length]
        pad = [(np.zeros(WIDTH), IGNORE, PAD)] * (out_length - len(row))
        rows.append(pad + row if padding_side == "left" else row + pad)
    embeds = np.array([[e for e, _, _ in row] for row in rows])
    out_labels = np.array([[lab for _, lab, _ in row] for row in rows])
    kinds = np.array([[k for _, _, k in row] for row in rows])
    return embeds, out_labels, kinds


@pytest.fixture(scope="module")
def batch():
    """Four rows of length 8 (embedding value = 100 * row + position, so every token is recognisable):
    0: image at 2, retrieval sentinel at 3, no padding;   1: image at 1, no retrieval sentinel, 2 pad;
    2: no image, no sentinel, 3 pad;                      3: image at 0, retrieval sentinel at 5, 1 pad."""
    batch, length = 4, 8
    text = (100.0 * np.arange(batch)[:, None, None] + np.arange(length)[None, :, None]
            + np.zeros((1, 1, WIDTH))).astype(np.float32)
    text[..., 1] += 0.5
    attention = np.ones((batch, length), np.int32)
    attention[1, 6:] = 0
    attention[2, 5:] = 0
    attention[3, 7:] = 0
    labels = np.where(np.arange(length)[None, :] >= 5, 1000 + np.arange(length)[None, :], IGNORE).repeat(batch, 0)
    labels = np.where(attention == 1, labels, IGNORE).astype(np.int32)
    labels[3, 5] = IGNORE  # a sentinel is never supervised
    image = (-1.0 - np.arange(batch)[:, None, None] * 10 - np.arange(2)[None, :, None]
             + np.zeros((1, 1, WIDTH))).astype(np.float32)
    retrieved = (0.25 + np.arange(batch)[:, None, None] * 10 + np.arange(3)[None, :, None]
                 + np.zeros((1, 1, WIDTH))).astype(np.float32)
    retrieved_mask = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], bool)
    return dict(text=text, attention=attention, labels=labels, image_index=np.array([2, 1, -1, 0], np.int32),
                image=image, retrieved=retrieved, retrieved_mask=retrieved_mask,
                retrieval_index=np.array([3, -1, -1, 5], np.int32))


def _run(b, max_length=None, padding_side="right", with_retrieval=True, with_sentinels=True):
    retrieval_index = b["retrieval_index"] if with_sentinels else None
    out = splice_jit(jnp.asarray(b["text"]), jnp.asarray(b["attention"]), jnp.asarray(b["labels"]),
                     jnp.asarray(b["image_index"]), jnp.asarray(b["image"]),
                     jnp.asarray(b["retrieved"]) if with_retrieval else None,
                     jnp.asarray(b["retrieved_mask"]) if with_retrieval else None,
                     None if retrieval_index is None else jnp.asarray(retrieval_index),
                     max_length=max_length, padding_side=padding_side)
    out_length = out.inputs_embeds.shape[1]
    retrieved = b["retrieved"] if with_retrieval else np.zeros((4, 0, WIDTH))
    mask = b["retrieved_mask"] if with_retrieval else np.zeros((4, 0), bool)
    expected = reference_splice(b["text"], b["attention"], b["labels"], b["image_index"], b["image"], retrieved, mask,
                                retrieval_index, out_length, padding_side)
    return out, expected


def _check(out, expected):
    embeds, labels, kinds = expected
    np.testing.assert_array_equal(np.asarray(out.inputs_embeds), embeds)
    np.testing.assert_array_equal(np.asarray(out.labels), labels)
    np.testing.assert_array_equal(np.asarray(out.token_kind), kinds)
    np.testing.assert_array_equal(np.asarray(out.attention_mask), (kinds != PAD).astype(np.int32))
    real = kinds != PAD
    np.testing.assert_array_equal(np.asarray(out.positions), np.where(real, np.cumsum(real, 1) - 1, 0))


def test_splice_matches_reference(batch):
    out, expected = _run(batch)
    # L_out = 8 - 2 sentinels + 2 image + 3 retrieved.
    assert out.inputs_embeds.shape == (4, 11, WIDTH)
    _check(out, expected)
    # Row 0 spelled out: prefix 0 1, image, retrieved, rest 4..7.
    np.testing.assert_array_equal(np.asarray(out.inputs_embeds)[0, :, 0],
                                  [0, 1, -1, -2, 0.25, 1.25, 2.25, 4, 5, 6, 7])
    np.testing.assert_array_equal(np.asarray(out.token_kind)[0], [0, 0, 1, 1, 2, 2, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(out.labels)[0], [IGNORE] * 8 + [1005, 1006, 1007])


def test_masked_retrieved_tokens_are_compacted_and_rows_without_image_get_none(batch):
    out, _ = _run(batch)
    kinds = np.asarray(out.token_kind)
    # Row 1: text 0, image, retrieved tokens 0 and 2 (1 is masked), text 2..5, then padding.
    np.testing.assert_array_equal(np.asarray(out.inputs_embeds)[1, :9, 0],
                                  [100, -11, -12, 10.25, 12.25, 102, 103, 104, 105])
    np.testing.assert_array_equal(kinds[1], [0, 1, 1, 2, 2, 0, 0, 0, 0, -1, -1])
    # Row 2 has no image and no retrieval sentinel: its text only, padded at the end.
    np.testing.assert_array_equal(kinds[2], [0] * 5 + [-1] * 6)
    np.testing.assert_array_equal(np.asarray(out.inputs_embeds)[2, 5:], 0.0)


def test_image_and_retrieved_positions_carry_no_loss(batch):
    out, _ = _run(batch)
    kinds, labels = np.asarray(out.token_kind), np.asarray(out.labels)
    assert (labels[kinds != TEXT] == IGNORE).all()
    # Every supervised text label survives the splice, in order.
    for row in range(4):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE]
        np.testing.assert_array_equal(labels[row][labels[row] != IGNORE], kept)


def test_truncation_after_insertion(batch):
    out, expected = _run(batch, max_length=6)
    assert out.inputs_embeds.shape == (4, 6, WIDTH)
    _check(out, expected)
    np.testing.assert_array_equal(np.asarray(out.token_kind)[0], [0, 0, 1, 1, 2, 2])


def test_left_padding_for_generation(batch):
    out, expected = _run(batch, padding_side="left")
    _check(out, expected)
    np.testing.assert_array_equal(np.asarray(out.token_kind)[2], [-1] * 6 + [0] * 5)
    np.testing.assert_array_equal(np.asarray(out.positions)[2], [0] * 6 + [0, 1, 2, 3, 4])


def test_no_retrieval_removes_retrieval_sentinels(batch):
    out, expected = _run(batch, with_retrieval=False)
    assert out.inputs_embeds.shape == (4, 8, WIDTH)  # 8 - 2 sentinels + 2 image tokens
    _check(out, expected)
    assert not (np.asarray(out.token_kind) == RETRIEVED).any()


def test_without_retrieval_sentinels_retrieved_tokens_follow_the_image(batch):
    # The retrieval sentinel positions are then plain text tokens.
    out, expected = _run(batch, with_sentinels=False)
    assert out.inputs_embeds.shape == (4, 12, WIDTH)
    _check(out, expected)
    np.testing.assert_array_equal(np.asarray(out.token_kind)[0], [0, 0, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0])


def test_sentinel_helpers():
    ids = jnp.array([[5, IMAGE_TOKEN_ID, RETRIEVAL_TOKEN_ID, 7], [5, 6, 7, 8]])
    np.testing.assert_array_equal(np.asarray(splice.sentinel_index(ids, IMAGE_TOKEN_ID)), [1, -1])
    np.testing.assert_array_equal(np.asarray(splice.sentinel_index(ids, RETRIEVAL_TOKEN_ID)), [2, -1])
    np.testing.assert_array_equal(np.asarray(splice.replace_sentinels(ids, 0)), [[5, 0, 0, 7], [5, 6, 7, 8]])
    assert splice.spliced_length(8, 2, 3, True, None) == 11
    assert splice.spliced_length(8, 2, 3, True, 6) == 6
    assert splice.spliced_length(8, 1, 0, True, None) == 7  # a row without an image keeps up to 7 text tokens


def test_shape_errors(batch):
    with pytest.raises(ValueError, match="image_tokens"):
        splice.splice_inputs(jnp.asarray(batch["text"]), jnp.asarray(batch["attention"]),
                             jnp.asarray(batch["labels"]), jnp.asarray(batch["image_index"]), jnp.zeros((4, 2, 5)))
    with pytest.raises(ValueError, match="padding_side"):
        splice.splice_inputs(jnp.asarray(batch["text"]), jnp.asarray(batch["attention"]),
                             jnp.asarray(batch["labels"]), jnp.asarray(batch["image_index"]),
                             jnp.asarray(batch["image"]), padding_side="middle")
