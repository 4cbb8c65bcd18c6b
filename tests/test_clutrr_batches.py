"""Graph and text featurisation of CLUTRR rows: exact ids and masks for hand-written stories."""
import dataclasses
import os

import numpy as np
import pytest

from jaxalign.clutrr import reader, relations
from jaxalign.distill import clutrr_batches as cb


@dataclasses.dataclass
class Row:
    id: str
    story: str
    query: tuple
    target: str
    story_edges: tuple
    edge_types: tuple
    query_edge: tuple
    genders: tuple


AUNT = Row("r-aunt", "[Dorothy]'s brother [Michael] and her went to get ice cream. [Michael] is the proud father "
           "of the lovely [Donald]", ("Donald", "Dorothy"), "aunt", ((0, 1), (1, 2)), ("father", "sister"), (0, 2),
           (("Donald", "male"), ("Michael", "male"), ("Dorothy", "female")))
IN_LAW = Row("r-inlaw", "[Angela] showed up with her husband [Jeffrey]. [Christopher] hugged his daughter "
             "[Angela].", ("Christopher", "Jeffrey"), "son-in-law", ((0, 1), (1, 2), (2, 3)),
             ("daughter", "husband", "sister"), (0, 2),
             (("Christopher", "male"), ("Angela", "female"), ("Jeffrey", "male"), ("Zoe", "female")))


def test_label_and_edge_vocabularies_are_fixed_and_round_trip(tmp_path):
    labels = cb.label_vocabulary()
    assert len(labels) == 18 and labels.id("son") == 0 and labels.id("aunt") == 17
    assert labels.id("mother-in-law") == 13
    with pytest.raises(ValueError, match="'husband' is not in the labels vocabulary"):
        labels.id("husband")
    edges = cb.edge_type_vocabulary()
    assert len(edges) == 22 and edges.id("wife") == 5
    path = tmp_path / "labels.json"
    labels.save(path)
    assert cb.Vocabulary.load(path, kind="labels") == labels
    with pytest.raises(ValueError, match="expected a words vocabulary"):
        cb.Vocabulary.load(path, kind="words")


def test_edge_types_cover_every_relation_label_of_the_rules():
    assert set(cb.EDGE_TYPE_LABELS) == set(relations.LABELS)
    assert set(cb.CLUTRR_LABELS) <= set(relations.LABELS)


def test_graph_batch_exact_arrays_with_padding():
    batch = cb.graph_batch([AUNT, IN_LAW], cb.label_vocabulary(), cb.edge_type_vocabulary(), max_nodes=5,
                           max_edges=4, batch_size=3)
    np.testing.assert_array_equal(batch["node_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["senders"], [[0, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["receivers"], [[1, 2, 0, 0], [1, 2, 3, 0], [0, 0, 0, 0]])
    # father=2, sister=7, daughter=1, husband=4 in EDGE_TYPE_LABELS order.
    np.testing.assert_array_equal(batch["edge_types"], [[2, 7, 0, 0], [1, 4, 7, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["edge_mask"], [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["source"], [0, 0, 0])
    np.testing.assert_array_equal(batch["target"], [2, 2, 0])
    np.testing.assert_array_equal(batch["label"], [17, 10, 0])
    np.testing.assert_array_equal(batch["example_mask"], [1, 1, 0])


def test_graph_batch_errors_name_the_row():
    with pytest.raises(ValueError, match="row r-inlaw: graph has 4 nodes and 3 edges, over the budget"):
        cb.graph_batch([IN_LAW], cb.label_vocabulary(), cb.edge_type_vocabulary(), max_nodes=3, max_edges=4)
    wrong = dataclasses.replace(AUNT, target="husband")
    with pytest.raises(ValueError, match="row r-aunt: target 'husband'"):
        cb.graph_batch([wrong], cb.label_vocabulary(), cb.edge_type_vocabulary(), 5, 4)


def test_tokenize_and_word_vocabulary():
    assert cb.tokenize("@ent3's brother [X], 2 Cats.") == ["@ent3", "'s", "brother", "[", "x", "]", ",", "2",
                                                           "cats", "."]
    vocab = cb.build_word_vocabulary([AUNT.story, "the the ice"], num_slots=3)
    assert vocab.tokens[:5] == ("<pad>", "<unk>", "@ent0", "@ent1", "@ent2")
    # 'the' occurs 3 times, then words seen twice (alphabetical), names never enter the vocabulary.
    assert vocab.tokens[5:8] == ("the", "ice", "'s")
    assert "dorothy" not in vocab and "michael" not in vocab
    assert vocab.id("zebra") == 1 and cb.entity_slots(vocab) == 3


def test_text_batch_exact_ids_for_a_known_story(tmp_path):
    vocab = cb.build_word_vocabulary([AUNT.story], num_slots=4)
    slots = np.random.default_rng(7).permutation(4)[:3]          # Dorothy, Michael, Donald in order of appearance
    report = cb.TextReport()
    batch = cb.text_batch([AUNT], vocab, cb.label_vocabulary(), max_length=24, rng=7, report=report,
                          batch_size=2)
    dorothy, michael, donald = (f"@ent{s}" for s in slots)
    expected = [dorothy, "'s", "brother", michael, "and", "her", "went", "to", "get", "ice", "cream", ".",
                michael, "is", "the", "proud", "father", "of", "the", "lovely", donald]
    np.testing.assert_array_equal(batch["tokens"][0, :21], [vocab.id(t) for t in expected])
    assert batch["tokens"][0, 21:].tolist() == [0, 0, 0] and batch["tokens"][1].tolist() == [0] * 24
    np.testing.assert_array_equal(batch["token_mask"][0], [True] * 21 + [False] * 3)
    node = np.full(24, -1)
    node[[0]], node[[3, 12]], node[[20]] = 2, 1, 0                 # Dorothy is node 2, Michael 1, Donald 0
    np.testing.assert_array_equal(batch["token_node"][0], node)
    np.testing.assert_array_equal(np.flatnonzero(batch["source_mentions"][0]), [20])   # Donald
    np.testing.assert_array_equal(np.flatnonzero(batch["target_mentions"][0]), [0])    # Dorothy
    assert batch["label"].tolist() == [17, 0] and batch["example_mask"].tolist() == [True, False]
    assert (report.stories, report.truncated, report.unknown_tokens, report.query_mentions_lost) == (1, 0, 0, 0)
    path = tmp_path / "words.json"
    vocab.save(path)
    assert cb.Vocabulary.load(path, kind="words") == vocab


def test_text_batch_is_deterministic_under_a_seed_and_permutes_entities():
    vocab = cb.build_word_vocabulary([AUNT.story, IN_LAW.story])
    labels = cb.label_vocabulary()
    first = cb.text_batch([AUNT, IN_LAW], vocab, labels, 40, rng=3)
    again = cb.text_batch([AUNT, IN_LAW], vocab, labels, 40, rng=3)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other_seeds = [cb.text_batch([AUNT], vocab, labels, 40, rng=seed)["tokens"][0, 0] for seed in range(8)]
    assert len(set(other_seeds)) > 1            # Dorothy's entity token varies with the seed


def test_text_batch_counts_truncation_and_lost_mentions():
    vocab = cb.build_word_vocabulary([AUNT.story])
    report = cb.TextReport()
    batch = cb.text_batch([AUNT, IN_LAW], vocab, cb.label_vocabulary(), max_length=8, rng=0, report=report)
    assert batch["token_mask"].sum() == 16
    assert report.truncated == 2 and report.truncated_rows == ["r-aunt", "r-inlaw"]
    assert report.query_mentions_lost == 2       # Donald (at token 20) and Christopher (token 8) are cut off
    assert report.unknown_tokens > 0 and "2 truncated" in report.summary()


def test_too_many_people_for_the_entity_slots_is_an_error():
    vocab = cb.build_word_vocabulary([], num_slots=2)
    with pytest.raises(ValueError, match="row r-aunt: 3 people but only 2 entity slots"):
        cb.text_batch([AUNT], vocab, cb.label_vocabulary(), 30, rng=0)


RELEASED_ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "clutrr", "data_089907f8.zip")


@pytest.mark.skipif(not os.path.exists(RELEASED_ZIP), reason=f"released CLUTRR data {RELEASED_ZIP} is absent")
def test_released_rows_featurise_without_truncation_at_256_tokens():
    rows = reader.read_zip(RELEASED_ZIP)["1.10_test.csv"]
    vocab = cb.build_word_vocabulary(row.story for row in rows)
    report = cb.TextReport()
    text = cb.text_batch(rows, vocab, cb.label_vocabulary(), 256, rng=0, report=report)
    graph = cb.graph_batch(rows, cb.label_vocabulary(), cb.edge_type_vocabulary(), 16, 16)
    assert report.truncated == 0 and report.query_mentions_lost == 0 and report.unknown_tokens == 0
    np.testing.assert_array_equal(text["label"], graph["label"])
    # Every query mention sits on a token naming the query's graph node.
    source_nodes = np.where(text["source_mentions"], text["token_node"], -2)
    assert np.all((source_nodes == -2) | (source_nodes == graph["source"][:, None]))
    assert graph["edge_mask"].sum(1).max() >= 10


# Files written by the reference CLUTRR generator label every story edge (see tests/fixtures/clutrr_generator/).
GENERATOR_FILES = os.path.join(os.path.dirname(__file__), "fixtures", "clutrr_generator")


def _supporting_row():
    """Path sister-father-father (0 -> 3); supporting facts (0, 4) mother and (4, 1) daughter."""
    return reader.read_csv(os.path.join(GENERATOR_FILES, "2.3_test.csv"))[0]


def test_graph_rows_give_labelled_noise_edges_their_relation():
    from jaxalign.distill import evaluate
    row = _supporting_row()
    graph_row, = evaluate.graph_rows([row])
    assert graph_row.edge_types == ("sister", "father", "father", "mother", "daughter")
    assert evaluate.graph_rows([graph_row]) == [graph_row]  # idempotent
    vocabulary = evaluate.teacher_edge_vocabulary()
    batch = cb.graph_batch([graph_row], cb.label_vocabulary(), vocabulary, max_nodes=6, max_edges=6)
    # sister=7, father=2, mother=3, daughter=1 in EDGE_TYPE_LABELS order; no edge is 'unlabelled' (22).
    np.testing.assert_array_equal(batch["edge_types"], [[7, 2, 2, 3, 1, 0]])
    np.testing.assert_array_equal(batch["senders"], [[0, 1, 2, 0, 4, 0]])
    np.testing.assert_array_equal(batch["receivers"], [[1, 2, 3, 4, 1, 0]])
    # A reader row goes straight into graph_batch too: path labels, then its noise labels.
    np.testing.assert_array_equal(
        cb.graph_batch([row], cb.label_vocabulary(), vocabulary, 6, 6)["edge_types"], batch["edge_types"])


def test_without_noise_labels_types_only_noise_edges_unlabelled():
    from jaxalign.distill import evaluate
    row = _supporting_row()
    hidden, = evaluate.without_noise_labels([row])
    assert hidden.edge_types == ("sister", "father", "father", evaluate.UNLABELLED_EDGE, evaluate.UNLABELLED_EDGE)
    assert hidden.noise_edge_types == () and not hidden.noise_labelled
    assert evaluate.graph_rows([hidden]) == [hidden]
    assert row.noise_edge_types == ("mother", "daughter")  # the input rows are not changed
    batch = cb.graph_batch([hidden], cb.label_vocabulary(), evaluate.teacher_edge_vocabulary(), 6, 6)
    np.testing.assert_array_equal(batch["edge_types"], [[7, 2, 2, 22, 22, 0]])
    # Released rows (noise unlabelled) look the same before and after.
    released = dataclasses.replace(row, noise_edge_types=())
    assert evaluate.graph_rows([released]) == [hidden] == evaluate.without_noise_labels([released])


def test_graph_batch_asks_for_graph_rows_when_noise_edges_have_no_type():
    released = dataclasses.replace(_supporting_row(), noise_edge_types=())
    with pytest.raises(ValueError, match="5 story_edges but 3 edge types.*graph_rows"):
        cb.graph_batch([released], cb.label_vocabulary(), cb.edge_type_vocabulary(), 6, 6)
