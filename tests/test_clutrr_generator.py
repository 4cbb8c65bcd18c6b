"""The seeded CLUTRR generator: family trees, released-format output, noise types, hold-outs, reproducibility."""
import collections
import io
import json
import random

import pytest

from jaxalign.clutrr import family, generator, reader, relations, solver

KS = [2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def rows_by_task():
    return {task: generator.generate(len(KS) * 4, KS, task, seed=task) for task in (1, 2, 3, 4)}


def _csv_text(rows):
    stream = io.StringIO()
    reader.write_rows(rows, stream)
    return stream.getvalue()


def test_family_tree_is_a_married_three_generation_tree():
    graph = family.build_family_tree(random.Random(0))
    assert len(graph.names) == 42 and len(set(graph.names)) == 42
    couples = [pair for pair, relation in graph.relation.items() if relation == "SO"]
    assert len(couples) == 42  # 21 couples, both directions
    assert all(graph.genders[a] != graph.genders[b] for a, b in couples)
    assert sum(relation == "child" for relation in graph.relation.values()) == 2 * (4 + 16)
    # Closed: every composable pair of adjacent edges has a relation between its ends.
    for (head, middle), first in graph.relation.items():
        for tail in graph.neighbors[middle]:
            if tail != head and relations.compose(first, graph.relation[(middle, tail)]):
                assert (head, tail) in graph.relation
    flipped = family.build_family_tree(random.Random(0), flip_genders=True)
    assert [g == "male" for g in flipped.genders] == [g == "female" for g in graph.genders]


@pytest.mark.parametrize("task", [1, 2, 3, 4])
def test_output_passes_the_reader_for_every_k(rows_by_task, task):
    rows = rows_by_task[task]
    back = reader.read_rows(io.StringIO(_csv_text(rows), newline=""), f"task {task}")  # validates every row
    assert back == rows
    assert collections.Counter(row.k for row in rows) == {k: 4 for k in KS}
    assert {row.task_name for row in rows} == {f"task_{task}.{k}" for k in KS}
    assert [row.index for row in rows] == list(range(len(rows)))


def test_noise_edges_have_their_kind(rows_by_task):
    for row in rows_by_task[1]:
        assert row.noise_edges == ()
    for row in rows_by_task[2]:  # a second route a -> z -> b around one path edge (a, b)
        (a, z), (z2, b) = row.noise_edges
        path_nodes = {n for edge in row.path_edges for n in edge}
        assert z == z2 and z not in path_nodes and (a, b) in row.path_edges
    for row in rows_by_task[3]:  # dangling from a path person
        (head, tail), = row.noise_edges
        path_nodes = {n for edge in row.path_edges for n in edge}
        assert head in path_nodes and tail not in path_nodes
    for row in rows_by_task[4]:  # between two people off the path
        (head, tail), = row.noise_edges
        path_nodes = {n for edge in row.path_edges for n in edge}
        assert head not in path_nodes and tail not in path_nodes


def test_solver_labels_generated_rows(rows_by_task):
    for rows in rows_by_task.values():
        result = solver.agreement(rows)
        assert result.agree_unambiguous == result.unambiguous > 0 and result.unsolvable == 0
        assert result.target_among_ambiguous == result.ambiguous
        assert [solver.proof_problems(row) for row in rows] == [[]] * len(rows)


def test_story_has_one_sentence_per_edge_and_clean_story_the_path(rows_by_task):
    row = rows_by_task[2][0]
    assert row.story.count(".") == len(row.story_edges) and row.clean_story.count(".") == row.k
    story_sentences = {sentence.strip(". ") for sentence in row.story.split(". ")}
    assert {sentence.strip(". ") for sentence in row.clean_story.split(". ")} < story_sentences
    assert all(f"[{name}]" in row.story for name in row.names)


def test_same_seed_same_bytes_different_seed_different():
    first = _csv_text(generator.generate(12, [2, 4], 2, seed=5))
    assert first == _csv_text(generator.generate(12, [2, 4], 2, seed=5))
    assert first != _csv_text(generator.generate(12, [2, 4], 2, seed=6))


def test_holdout_patterns_are_kept_out_and_test_side_uses_only_them():
    held = generator.choose_holdout_patterns(3, 1, seed=0, sample_rows=100)
    assert held
    train = generator.generate(40, [3], 1, seed=1, holdout_patterns=held)
    assert not {row.f_comb for row in train} & held
    test = generator.generate(10, [3], 1, seed=2, patterns=held, split="test")
    assert {row.f_comb for row in test} <= held and {row.task_split for row in test} == {"test"}


def test_patterns_are_balanced():
    counts = collections.Counter(row.f_comb for row in generator.generate(120, [2], 1, seed=0))
    assert len(counts) >= 40 and max(counts.values()) <= 4


def test_bad_arguments_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="noise_task"):
        generator.generate(4, [2], 7, seed=0)
    with pytest.raises(ValueError, match="has k = 2 edges"):
        generator.generate(2, [2], 1, seed=0, patterns={"son-son-son"})
    monkeypatch.setattr(generator, "MAX_TREES_PER_ROW", 1)  # (x husband y husband x) never exists: give up soon
    with pytest.raises(ValueError, match="could only generate 0 of 2 rows"):
        generator.generate(2, [2], 1, seed=0, patterns={"husband-husband"})


def test_generate_dataset_writes_released_names(tmp_path):
    written = generator.generate_dataset(tmp_path, train_ks=(2, 3), test_ks=(2, 3, 4), tasks=(1, 3),
                                         rows_per_file=6, seed=3, train_rows_per_k=20)
    assert sorted(written) == sorted([
        "1.2,1.3_train.csv", "1.2_test.csv", "1.3_test.csv", "1.4_test.csv",
        "3.2,3.3_train.csv", "3.2_test.csv", "3.3_test.csv", "3.4_test.csv", "config.json"])
    train = reader.read_csv(written["1.2,1.3_train.csv"])
    test = reader.read_csv(written["1.3_test.csv"])
    assert len(train) == 40 and len(test) == 6 and {row.task_name for row in test} == {"task_1.3"}
    assert not {row.f_comb for row in test} & {row.f_comb for row in train if row.k == 3}
    assert {row.noise_task for row in reader.read_csv(written["3.4_test.csv"])} == {3}
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 3
