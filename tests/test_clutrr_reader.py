"""CLUTRR relations and the released-format reader: real released rows, malformed rows, skip-and-count."""
import csv
import hashlib
import io
import logging
import pathlib
import zipfile

import pytest

from jaxalign.clutrr import generator, reader, relations

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clutrr"
requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"released CLUTRR data folder {DATA} is absent")


def test_gendered_labels_and_inverses():
    assert relations.gendered_label("inv-child", "female") == "mother"
    assert relations.relation_type("granddaughter") == "grand"
    assert relations.inverse("grand") == "inv-grand"
    assert relations.inverse("child", head_gender="male") == "father"  # (a son b) -> (b father a) when a is male
    assert relations.inverse("SO") == "SO"
    assert relations.compose("child", "inv-child") is None
    assert relations.compose("sibling", "child") == "un"
    # 16 rules x 2 first-edge genders x 2 tail genders; the released data uses 62 of these 64 (no same-sex couples).
    assert len(relations.gendered_composition_table()) == 64
    assert relations.gendered_composition_table()[("wife", "father")] == "father-in-law"


@requires_data
def test_known_released_row():
    rows = reader.read_zip(DATA / "data_089907f8.zip", members=["1.2_test.csv", "1.3_test.csv"])
    row = rows["1.2_test.csv"][0]
    assert row.id == "a44d478f-c68e-4557-8750-1b2f6f17d705"
    assert row.query == ("Jason", "Lewis") and row.target == "grandson"
    assert row.story_edges == ((0, 1), (1, 2)) and row.edge_types == ("grandson", "brother")
    assert row.query_edge == (0, 2) and row.k == 2 and row.noise_task == 1
    assert row.genders == (("Jason", "male"), ("Scott", "male"), ("Lewis", "male"))
    assert row.node_mapping == {0: 0, 23: 1, 25: 2}
    assert row.proof_state == ({("Jason", "grandson", "Lewis"): [("Jason", "grandson", "Scott"),
                                                                ("Scott", "brother", "Lewis")]},)
    assert row.text_target == ("[Jason] took his grandson [Lewis] to a movie at the local theater.",)
    assert row.task_split == "test" and row.text_query == "" and row.syn_story == ""
    longer = rows["1.3_test.csv"][0]
    assert longer.f_comb == "sister-daughter-grandfather" and longer.target == "father"
    assert longer.query == ("Valerie", "Stanley") and longer.names[longer.query_edge[1]] == "Stanley"
    assert len(rows["1.3_test.csv"]) == 105


@requires_data
def test_released_noise_rows_keep_path_first_and_noise_after():
    rows = reader.read_zip(DATA / "data_7c5b0e70.zip", members=["2.3_test.csv", "3.3_test.csv", "4.3_test.csv"])
    for name, noise_edges in (("2.3_test.csv", 2), ("3.3_test.csv", 1), ("4.3_test.csv", 1)):
        assert {(row.noise_task, row.k, len(row.noise_edges)) for row in rows[name]} == {
            (int(name[0]), 3, noise_edges)}


@requires_data
def test_released_file_round_trips_byte_for_byte():
    with zipfile.ZipFile(DATA / "data_7c5b0e70.zip") as archive:
        original = archive.read("1.3_test.csv").decode()
    rows = reader.read_rows(io.StringIO(original, newline=""), "1.3_test.csv")
    written = io.StringIO()
    reader.write_rows(rows, written)
    assert written.getvalue() == original


# Read by the reader before it accepted the reference generator's files (recorded then, per zip): files, rows, and
# the sha256 of repr((file, id, target, edge_types, story_edges, query_edge, task_name)) over rows in file order.
RELEASED_READS = {
    "data_06b8f2a1": (6, 10601, "03b696f3faf0e2b836869887e4ccc0f3b4c2e42eaf47cd54855e574573f71b3b"),
    "data_089907f8": (10, 11240, "1b900189e70542e95237c0dee099b490491846e88b9df11e40ff0f2964369893"),
    "data_523348e6": (6, 10543, "897898a4b84a01ec6705961465a8e0ffc323f849f4e67d7e5cb9850913fe21dd"),
    "data_7c5b0e70": (6, 10571, "9d9f57f8c461ba3bb8fe9bd6fbb422f03cec26d814e0ba3b47a222a28b603ad1"),
    "data_d83ecc3e": (6, 10545, "f8dff3384a11cdf0bcc1edb730c30555c0ca0ba3c40c6a26ed2d8b8ad90bb2f3"),
    "data_db9b8f04": (10, 16131, "aeda6b48504bb632f3dd55808d50bbfe4ccd5d5ddfcd97d1d194791509bcae31"),
}


@requires_data
@pytest.mark.parametrize("name", sorted(RELEASED_READS))
def test_every_released_zip_reads_as_before(name):
    files = reader.read_zip(DATA / f"{name}.zip")
    digest = hashlib.sha256()
    for file_name, rows in files.items():
        for row in rows:
            digest.update(repr((file_name, row.id, row.target, row.edge_types, row.story_edges, row.query_edge,
                                row.task_name)).encode())
    assert (len(files), sum(len(rows) for rows in files.values()), digest.hexdigest()) == RELEASED_READS[name]
    assert not any(row.noise_labelled for rows in files.values() for row in rows)  # the zips label only paths


@pytest.fixture(scope="module")
def generated_csv(tmp_path_factory):
    """Records of a small generated file, to break on purpose."""
    path = tmp_path_factory.mktemp("clutrr") / "1.3_test.csv"
    reader.write_csv(generator.generate(5, [3], 1, seed=11), path)
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _write(records, path):
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(reader.COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    return path


def test_broken_path_names_file_row_and_field(generated_csv, tmp_path):
    records = [dict(r) for r in generated_csv]
    records[2]["story_edges"] = "[(0, 1), (2, 3), (1, 2)]"  # not a path 0 -> 3
    path = _write(records, tmp_path / "bad.csv")
    with pytest.raises(reader.ClutrrFormatError) as caught:
        reader.read_csv(path)
    assert caught.value.row_id == records[2]["id"] and caught.value.field == "story_edges"
    assert str(path) in str(caught.value) and records[2]["id"] in str(caught.value)


@pytest.mark.parametrize("field, value", [
    ("query", "('Anna', "), ("target", "cousin"), ("task_name", "task_9.x"), ("genders", "Anna-female"),
    ("edge_types", "['son', 'son']"), ("f_comb", "son-son-son")])
def test_each_malformed_field_is_named(generated_csv, tmp_path, field, value):
    records = [dict(r) for r in generated_csv]
    records[0][field] = value
    with pytest.raises(reader.ClutrrFormatError) as caught:
        reader.read_csv(_write(records, tmp_path / "bad.csv"))
    assert (caught.value.field, caught.value.row_id) == (field, records[0]["id"])


def test_skip_bad_skips_and_counts(generated_csv, tmp_path, caplog):
    records = [dict(r) for r in generated_csv]
    records[1]["query_edge"] = "(0, 99)"
    records[3]["proof_state"] = "[{"
    path = _write(records, tmp_path / "bad.csv")
    report = reader.ReadReport()
    rows = reader.read_csv(path, skip_bad=True, report=report)
    assert [row.id for row in rows] == [records[i]["id"] for i in (0, 2, 4)]
    assert (report.rows_read, report.rows_skipped) == (3, 2)
    assert records[1]["id"] in report.problems[0] and "query_edge" in report.problems[0]
    assert "proof_state" in report.problems[1]
    with caplog.at_level(logging.WARNING):
        assert len(reader.read_csv(path, skip_bad=True)) == 3  # no report: the skip is logged, not silent
    assert "skipped 2 malformed rows" in caplog.text


def test_missing_column_is_an_error(generated_csv, tmp_path):
    path = tmp_path / "no_genders.csv"
    with open(path, "w", newline="") as stream:
        fields = [c for c in reader.COLUMNS if c != "genders"]
        writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(generated_csv)
    with pytest.raises(reader.ClutrrFormatError, match="genders"):
        reader.read_csv(path)


def test_pair_table_from_generated_files_matches_the_rules(tmp_path):
    path = tmp_path / "1.2,1.3_train.csv"
    reader.write_csv(generator.generate(60, [2, 3], 1, seed=2), path)
    table = relations.pair_table_from_files([path])
    assert len(table) >= 20 and relations.check_pair_table(table) == []
    assert set(table) <= set(relations.gendered_composition_table())


@requires_data
def test_pair_table_from_a_released_zip():
    table = relations.pair_table_from_files([DATA / "data_7c5b0e70.zip"])
    assert len(table) == 62 and relations.check_pair_table(table) == []
    assert set(relations.gendered_composition_table()) - set(table) == {("son", "husband"), ("daughter", "wife")}
