"""Memory values (faithful random Perceiver, token-id values) and the retrieval controls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.align import controls, value_encoders
from jaxalign.align.controls import RetrievalControl
from jaxalign.align.value_encoders import PerceiverValueConfig
from jaxalign.configs.base import load_config
from jaxalign.data import length_buckets

# The official counts (32 latents x 96, 8 + 8 heads, 8 self-attention layers) on small images and captions.
CONFIG = PerceiverValueConfig(image_size=16, max_text_bytes=64)
CAPTIONS = ["a red circle", "a blue square on the left", "x", "green triangle", "two shapes", "nothing here at all"]
encode = jax.jit(value_encoders.perceiver_values, static_argnums=1)


@pytest.fixture(scope="module")
def entries():
    images = np.random.default_rng(0).uniform(size=(len(CAPTIONS), 16, 16, 3)).astype(np.float32)
    byte_ids, byte_mask = value_encoders.caption_bytes(CAPTIONS, CONFIG.max_text_bytes)
    return images, byte_ids, byte_mask


@pytest.fixture(scope="module")
def faithful_values(entries):
    params = value_encoders.init_perceiver_values(CONFIG)
    return params, np.asarray(encode(params, CONFIG, *entries))


def test_caption_bytes_are_perceiver_byte_ids():
    ids, mask = value_encoders.caption_bytes(["hi", "é", "abcdef"], max_length=6)
    np.testing.assert_array_equal(ids, [[4, 104 + 6, 105 + 6, 5, 0, 0],
                                        [4, 0xC3 + 6, 0xA9 + 6, 5, 0, 0],
                                        [4, 97 + 6, 98 + 6, 99 + 6, 100 + 6, 5]])
    np.testing.assert_array_equal(mask, ids != 0)


def test_faithful_values_shape_and_determinism(entries, faithful_values):
    params, values = faithful_values
    assert values.shape == (len(CAPTIONS), 32, 96) and values.dtype == np.float32
    again = np.asarray(encode(value_encoders.init_perceiver_values(CONFIG), CONFIG, *entries))
    np.testing.assert_array_equal(again, values)
    other_config = PerceiverValueConfig(image_size=16, max_text_bytes=64, seed=1)
    other = np.asarray(encode(value_encoders.init_perceiver_values(other_config), CONFIG, *entries))
    assert np.abs(other - values).max() > 1e-2


def test_official_input_width_and_initialisation(faithful_values):
    """Image 256 + 256 channels, padded by 4 (`min_padding_size=4`); tables N(0, 1), dense layers U(+-1/sqrt(fan_in))
    (tests/test_perceiver_official_parity.py checks them against the PyTorch module)."""
    params, _ = faithful_values
    assert PerceiverValueConfig().input_width == 516 and CONFIG.input_width == 516
    assert params["image_padding"].shape == (4,) and params["text_padding"].shape == (516 - 128,)
    assert float(jnp.std(params["latents"])) == pytest.approx(1.0, rel=0.05)
    key = np.asarray(params["cross"]["key"]["kernel"])   # [516, heads, head_dim]
    assert np.abs(key).max() <= 1 / np.sqrt(516) and key.std() == pytest.approx(1 / np.sqrt(3 * 516), rel=0.03)
    projection = np.asarray(params["image_position_projection"]["kernel"])
    assert projection.shape == (256, 256) and np.abs(projection).max() <= 1 / 16


@pytest.mark.parametrize("stage", [1, 2])
def test_faithful_config_pads_batches_to_length_buckets(stage):
    """Not to max_length: the faithful query pools the padding too, so less padding keeps it closer to the official
    one; the buckets bound the compiles."""
    config = load_config(f"jaxalign/configs/tinyalign_phi2_faithful.py:stage={stage}")
    buckets = length_buckets.check_buckets(config.data.length_buckets, config.model.max_length)
    assert buckets[-1] == config.model.max_length == 3072 and len(buckets) <= 8
    assert buckets[0] > 728 + 10 * 32   # every image sample holds 728 image and 320 retrieved positions
    assert config.data.group_by_length == (64 if stage == 2 else 0)   # as the official scripts group


def test_faithful_values_have_the_known_defect(faithful_values):
    """Different images and captions give nearly the same value: the official encoder is random and untrained."""
    _, values = faithful_values
    flat = values.reshape(len(values), -1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    cosine = unit @ unit.T
    pairs = cosine[np.triu_indices(len(values), 1)]
    assert pairs.mean() > 0.9
    assert np.abs(flat[0] - flat[1]).max() > 0  # nearly, not exactly: the inputs do reach the output


def test_caption_token_values_pad_and_cut():
    values = value_encoders.caption_token_values([[5, 6, 7], [8], [9, 10, 11, 12, 13]], max_len=4)
    np.testing.assert_array_equal(values, [[5, 6, 7, -1], [8, -1, -1, -1], [9, 10, 11, 12]])
    assert values.dtype == np.int32
    with pytest.raises(ValueError, match="entry 1"):
        value_encoders.caption_token_values([[1], [-3]], max_len=2)
    with pytest.raises(ValueError, match="pad_id=0"):
        value_encoders.caption_token_values([[0, 4]], max_len=3, pad_id=0)


def test_retrieved_tokens_from_ids_embed_with_the_lm_table():
    table = jnp.arange(20.0).reshape(10, 2) + 1.0
    ids = jnp.array([[[3, 4, -1], [7, -1, -1]]])  # one query, k = 2 neighbours, Lv = 3

    def embed(token_ids):
        return jnp.take(table, token_ids, axis=0)

    tokens, mask = value_encoders.retrieved_tokens_from_ids(embed, ids)
    assert tokens.shape == (1, 6, 2)
    np.testing.assert_array_equal(np.asarray(mask), [[True, True, False, True, False, False]])
    np.testing.assert_array_equal(np.asarray(tokens)[0], [[7, 8], [9, 10], [0, 0], [15, 16], [0, 0], [0, 0]])


def test_pooled_image_values_and_flatten():
    features = jnp.arange(24.0).reshape(1, 6, 4)
    pooled = value_encoders.pooled_image_values(features, 3)
    np.testing.assert_allclose(np.asarray(pooled)[0], [[2, 3, 4, 5], [10, 11, 12, 13], [18, 19, 20, 21]])
    with pytest.raises(ValueError, match="equal groups"):
        value_encoders.pooled_image_values(features, 4)
    gathered = jnp.arange(2 * 3 * 2 * 1).reshape(2, 3, 2, 1)  # [B, k, P, w]
    np.testing.assert_array_equal(np.asarray(value_encoders.flatten_retrieved(gathered))[1, :, 0],
                                  [6, 7, 8, 9, 10, 11])


# --------------------------------------------------------------------------------------------- controls

TABLE = jnp.arange(8)[:, None] * 10 + jnp.arange(3)[None, :]  # row r holds [10r, 10r + 1, 10r + 2]
IDS = jnp.array([[0, 5, 2], [7, 1, 3]])


def test_real_control_returns_the_retrieved_values():
    values = controls.controlled_values(RetrievalControl("real"), IDS, TABLE)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(TABLE)[np.asarray(IDS)])


def test_shuffled_control_is_a_fixed_seeded_derangement():
    permutation = controls.shuffle_permutation(8, seed=3)
    assert sorted(permutation.tolist()) == list(range(8))
    assert (permutation != np.arange(8)).all()
    # One cycle through all rows.
    row, seen = 0, set()
    for _ in range(8):
        seen.add(row)
        row = permutation[row]
    assert seen == set(range(8)) and row == 0
    np.testing.assert_array_equal(controls.shuffle_permutation(8, seed=3), permutation)
    assert (controls.shuffle_permutation(8, seed=4) != permutation).any()
    control = RetrievalControl("shuffled", seed=3)
    values = controls.controlled_values(control, IDS, TABLE, permutation)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(TABLE)[permutation[np.asarray(IDS)]])
    # Computed from the seed when not given: the same mapping.
    np.testing.assert_array_equal(np.asarray(controls.controlled_value_ids(control, IDS, 8)), permutation[IDS])


def test_shuffled_control_never_returns_the_query_own_row():
    permutation = controls.shuffle_permutation(8, seed=3)
    own = np.array([permutation[0], permutation[7]])  # the first neighbour would map onto the query itself
    rows = np.asarray(controls.controlled_value_ids(RetrievalControl("shuffled", seed=3), IDS, 8, permutation,
                                                    exclude_ids=jnp.asarray(own)))
    assert (rows != own[:, None]).all()
    np.testing.assert_array_equal(rows[:, 0], permutation[own])
    np.testing.assert_array_equal(rows[:, 1:], permutation[np.asarray(IDS)[:, 1:]])


def test_constant_control_gives_one_row_to_everyone():
    rows = controls.controlled_value_ids(RetrievalControl("constant", constant_row=4), IDS, 8)
    np.testing.assert_array_equal(np.asarray(rows), 4)
    rows = controls.controlled_value_ids(RetrievalControl("constant", constant_row=4), IDS, 8,
                                         exclude_ids=jnp.array([4, 0]))
    np.testing.assert_array_equal(np.asarray(rows), [[5, 5, 5], [4, 4, 4]])
    with pytest.raises(ValueError, match="outside"):
        controls.controlled_value_ids(RetrievalControl("constant", constant_row=8), IDS, 8)


def test_off_control_disables_retrieval():
    control = RetrievalControl("off")
    assert not controls.retrieval_enabled(control) and controls.retrieval_enabled(RetrievalControl())
    assert controls.controlled_values(control, IDS, TABLE) is None
    with pytest.raises(ValueError, match="retrieval_enabled"):
        controls.controlled_value_ids(control, IDS, 8)
    with pytest.raises(ValueError, match="kind"):
        RetrievalControl("random")


def test_controls_run_under_jit():
    permutation = jnp.asarray(controls.shuffle_permutation(8, seed=0))

    @jax.jit
    def gather(ids, perm, own):
        return controls.controlled_values(RetrievalControl("shuffled"), ids, TABLE, perm, own)

    got = np.asarray(gather(IDS, permutation, jnp.array([-1, -1])))
    np.testing.assert_array_equal(got, np.asarray(TABLE)[np.asarray(permutation)[np.asarray(IDS)]])


def test_token_values_are_the_answer_text_without_end_of_turn_tokens():
    """A bank value (and the oracle's) is text for the LM to read: the template's end-of-turn token is left out, or
    the LM would see a turn end in the middle of its prompt."""
    from jaxalign.align import memory_keys
    from jaxalign.data.chat_templates import IGNORE_LABEL

    labels = np.array([[IGNORE_LABEL, 8, 31, 21, 99, IGNORE_LABEL], [IGNORE_LABEL, 7, 99, IGNORE_LABEL, 5, 6]])
    assert memory_keys.answer_token_values(labels, 4, drop_ids=(99,)).tolist() == [[8, 31, 21, -1], [7, 5, 6, -1]]
    assert memory_keys.answer_token_values(labels, 4).tolist() == [[8, 31, 21, 99], [7, 99, 5, 6]]
