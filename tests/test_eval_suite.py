"""`jaxalign eval-suite`: a run trained through the command line answers the benchmarks of a small LLaVA evaluation
folder written in the benchmarks' real file formats; the answers files are LLaVA's, the scores are those of
`jaxalign score` on the files written, a missing benchmark file is a skip with its reason and a missing image a
counted bad row.

The folder (`eval_folder` fixture): POPE (llava_pope_test.jsonl whose question ids differ from those of
coco/coco_pope_random.json, as LLaVA's do, and one question whose image file is missing), TextVQA (LLaVA's OCR
question file, TextVQA_0.5.1_val.json), ScienceQA (llava_test_CQM-A.json, one question with an image, one without),
MM-Vet (answers only), a GQA folder without its question file, and no VQAv2 folder. The run is the tiny stage-2 run
of tests/test_predict.py (easy-vqa, 20 steps on 8 fake CPU devices, retrieval on).
"""
import contextlib
import io
import json

import pytest

from jaxalign import cli
from jaxalign.evaluate.benchmarks import answer_files, eval_folder, files

SHORT = eval_folder.SHORT_ANSWER
POPE = [  # (llava question id, coco question id, image, easy-vqa record whose question and image it asks, label)
    (101, 1, "COCO_val2014_000000000001.png", 0, "yes"),
    (102, 2, "COCO_val2014_000000000001.png", 1, "no"),
    (103, 3, "COCO_val2014_000000000002.png", 2, "yes"),
    (104, 4, "COCO_val2014_000000000404.png", 3, "no"),  # its image file is missing
]


def _easy_vqa(count):
    """(image PNG bytes, question) of the first easy-vqa test records: what the tiny run answers with words."""
    from jaxalign.data import easy_vqa

    records = easy_vqa.load_easy_vqa("questions", "test")
    return [(bytes(records[i]["image"]), bytes(records[i]["question"]).decode("utf-8")) for i in range(count)]


def _image(path, png):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)


def _json_lines(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _write_eval_folder(root):
    samples = _easy_vqa(6)
    pope = root / "pope"
    _json_lines(pope / "llava_pope_test.jsonl", [
        {"question_id": llava_id, "image": image, "text": f"{samples[sample][1]}\n{SHORT}", "category": "random"}
        for llava_id, _, image, sample, _ in POPE])
    _json_lines(pope / "coco" / "coco_pope_random.json", [
        {"question_id": coco_id, "image": image, "text": samples[sample][1], "label": label}
        for _, coco_id, image, sample, label in POPE])
    _image(pope / "val2014" / POPE[0][2], samples[0][0])
    _image(pope / "val2014" / POPE[2][2], samples[2][0])

    textvqa = root / "textvqa"
    _json_lines(textvqa / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": 34602, "image": "003a8ae2ef43b901.jpg",
         "text": f"{samples[4][1]}\nReference OCR token: red\n{SHORT}"},
        {"question_id": 34603, "image": "00685bc495504d61.jpg", "text": f"{samples[5][1]}\n{SHORT}"}])
    (textvqa / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": samples[4][1],
         "answers": ["yes"] * 2 + ["no"] * 8},
        {"question_id": 34603, "image_id": "00685bc495504d61", "question": samples[5][1],
         "answers": ["circle"] * 10}]}))
    _image(textvqa / "train_images" / "003a8ae2ef43b901.jpg", samples[4][0])
    _image(textvqa / "train_images" / "00685bc495504d61.jpg", samples[5][0])

    scienceqa = root / "scienceqa"
    scienceqa.mkdir()
    (scienceqa / "llava_test_CQM-A.json").write_text(json.dumps([
        {"id": "4", "image": "4/image.png", "conversations": [
            {"from": "human", "value": "color?\nOptions: (A) red (B) blue\n<image>"},
            {"from": "gpt", "value": "The answer is A."}]},
        {"id": "9", "conversations": [
            {"from": "human", "value": "Question: which is a shape?\nOptions: (A) circle (B) dog"},
            {"from": "gpt", "value": "The answer is A."}]}]))
    _image(scienceqa / "images" / "test" / "4" / "image.png", samples[0][0])

    mmvet = root / "mm-vet"
    _json_lines(mmvet / "llava-mm-vet.jsonl", [{"question_id": 0, "image": "v1_0.png", "text": samples[1][1]}])
    _image(mmvet / "images" / "v1_0.png", samples[1][0])

    _image(root / "gqa" / "images" / "n1.jpg", samples[0][0])  # GQA's folder without llava_gqa_testdev_balanced.jsonl
    return root


@pytest.fixture(scope="module")
def trained(trained_run):
    """A tiny stage-2 run trained through `jaxalign train` (conftest.trained_run)."""
    return trained_run


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    return _write_eval_folder(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def suite(trained, eval_dir, tmp_path_factory):
    """(exit code, printed table, results.json, output folder) of `jaxalign eval-suite`."""
    out_dir = tmp_path_factory.mktemp("suite_out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["eval-suite", "--workdir", str(trained), "--data", str(eval_dir), "--out", str(out_dir),
                         "--no-progress"])
    results = json.loads((out_dir / "results.json").read_text()) if code == 0 else None
    return code, printed.getvalue(), results, out_dir


def _score(benchmark, predictions, questions, annotations=None):
    """`jaxalign score` as a user runs it on the written answers file: its printed JSON."""
    printed = io.StringIO()
    arguments = ["score", benchmark, "--predictions", str(predictions), "--questions", str(questions)]
    with contextlib.redirect_stdout(printed):
        assert cli.main(arguments + (["--annotations", str(annotations)] if annotations else [])) == 0
    return json.loads(printed.getvalue())


def _read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_suite_runs_and_prints_one_row_per_benchmark(suite):
    code, printed, results, _ = suite
    assert code == 0
    assert list(results["benchmarks"]) == list(eval_folder.LAYOUTS)
    for name in eval_folder.LAYOUTS:
        assert any(line.startswith(name) for line in printed.splitlines()), name
    statuses = {name: result["status"] for name, result in results["benchmarks"].items()}
    assert statuses == {"vqav2": "skipped", "gqa": "skipped", "textvqa": "scored", "scienceqa": "scored",
                        "pope": "scored", "mme": "skipped", "mmvet": "answers only", "mmmu": "skipped"}


def test_answers_files_are_llava_answers_files(suite, eval_dir):
    _, _, results, out_dir = suite
    lines = _read_lines(out_dir / "pope" / "answers.jsonl")
    assert [line["question_id"] for line in lines] == [101, 102, 103]  # 104's image is missing
    for line in lines:
        assert set(line) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert isinstance(line["text"], str) and line["model_id"] == "run" and line["metadata"] == {}
    assert lines[0]["prompt"].endswith(f"?\n{SHORT}") and lines[0]["prompt"].count("\n") == 1
    assert len({line["answer_id"] for line in lines}) == 3
    science = _read_lines(out_dir / "scienceqa" / "answers.jsonl")
    assert [line["question_id"] for line in science] == ["4", "9"]
    # model_vqa_science.py: "<image>\n" before an image question, the option-letter instruction after every one.
    assert science[0]["prompt"].startswith("<image>\ncolor?\nOptions:") and science[1]["prompt"].startswith("Q")
    assert all(line["prompt"].endswith("\n" + eval_folder.OPTION_LETTER) for line in science)
    # POPE's split file carries the coco_pope question ids, paired by position as eval_pope.py pairs them.
    split = _read_lines(out_dir / "pope" / "coco_pope_random_answers.jsonl")
    assert [line["question_id"] for line in split] == [1, 2, 3]
    assert [line["text"] for line in split] == [line["text"] for line in lines]
    # MM-Vet: the judge's input, {"v1_<question_id>": answer}.
    mmvet = json.loads((out_dir / "mmvet" / "results.json").read_text())
    assert list(mmvet) == ["v1_0"]
    assert mmvet["v1_0"] == _read_lines(out_dir / "mmvet" / "answers.jsonl")[0]["text"]


def test_scores_are_those_of_jaxalign_score_on_the_written_files(suite, eval_dir):
    _, _, results, out_dir = suite
    benchmarks = results["benchmarks"]
    assert benchmarks["textvqa"]["scores"] == _score("textvqa", out_dir / "textvqa" / "answers.jsonl",
                                                     eval_dir / "textvqa" / "TextVQA_0.5.1_val.json")
    assert benchmarks["scienceqa"]["scores"] == _score("scienceqa", out_dir / "scienceqa" / "answers.jsonl",
                                                       eval_dir / "scienceqa" / "llava_test_CQM-A.json")
    random_split = _score("pope", out_dir / "pope" / "coco_pope_random_answers.jsonl",
                          eval_dir / "pope" / "coco" / "coco_pope_random.json")
    assert benchmarks["pope"]["scores"]["splits"] == {"random": random_split}
    for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio", "questions", "missing_answers"):
        assert benchmarks["pope"]["scores"][metric] == random_split[metric]  # one split: its mean is itself


def test_pope_scores_match_a_by_hand_count_of_the_written_answers(suite):
    """POPE's rules applied by hand to the answers the model wrote: the first sentence says "no" when one of its
    words is no / No / not; the question without an answer (its image is missing) is wrong."""
    _, _, results, out_dir = suite
    said = {line["question_id"]: line["text"]
            for line in _read_lines(out_dir / "pope" / "coco_pope_random_answers.jsonl")}
    tp = fp = tn = fn = 0
    for _, coco_id, _, _, label in POPE:
        positive = label == "yes"
        if said.get(coco_id, "").strip():
            words = said[coco_id].split(".")[0].replace(",", "").split(" ")
            yes = not {"no", "No", "not"} & set(words)
        else:
            yes = not positive  # unanswered (no line, or a blank answer): scored as the wrong answer
        tp, fp = tp + (yes and positive), fp + (yes and not positive)
        tn, fn = tn + (not yes and not positive), fn + (not yes and positive)
    scores = results["benchmarks"]["pope"]["scores"]
    assert scores["accuracy"] == pytest.approx((tp + tn) / 4)
    assert scores["yes_ratio"] == pytest.approx((tp + fp) / 4)
    assert scores["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert scores["recall"] == pytest.approx(tp / (tp + fn))
    assert scores["missing_answers"] == 1 + sum(not text.strip() for text in said.values())
    assert scores["questions"] == 4


def test_a_missing_image_is_a_counted_bad_row(suite):
    _, printed, results, _ = suite
    pope = results["benchmarks"]["pope"]
    assert pope["questions"] == 4 and pope["answered"] == 3
    assert pope["bad_rows"]["counts"] == {"image_not_found": 1}
    assert pope["bad_rows"]["skipped"] == {"image_not_found": ["104"]}
    assert "image_not_found 1" in next(line for line in printed.splitlines() if line.startswith("pope"))


def test_missing_benchmark_files_are_skips_with_their_reason(suite, eval_dir):
    _, printed, results, _ = suite
    benchmarks = results["benchmarks"]
    assert benchmarks["gqa"]["reason"] == f"no question file {eval_dir / 'gqa' / 'llava_gqa_testdev_balanced.jsonl'}"
    assert benchmarks["vqav2"]["reason"] == f"no folder {eval_dir / 'vqav2'}"
    assert "LLM judge" in benchmarks["mmvet"]["reason"]
    gqa_row = next(line for line in printed.splitlines() if line.startswith("gqa"))
    assert "skipped: no question file" in gqa_row


# ---------------------------------------------------------------------------------------- without a model
def _located(root, name):
    located = eval_folder.locate(eval_folder.LAYOUTS[name], root)
    assert isinstance(located, eval_folder.LocatedBenchmark), located
    return located


def test_vqav2_submission_lists_every_test_question_with_evalai_answers(tmp_path):
    """convert_vqav2_for_submission.py: every question of llava_vqav2_mscoco_test2015.jsonl, '' where test-dev did
    not answer it; test-dev has no public answers, so it is not scored."""
    folder = tmp_path / "vqav2"
    _json_lines(folder / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 7, "image": "COCO_test2015_000000000001.jpg", "text": f"How many dogs?\n{SHORT}"}])
    _json_lines(folder / "llava_vqav2_mscoco_test2015.jsonl", [{"question_id": 7}, {"question_id": 8}])
    (folder / "test2015").mkdir()
    located = _located(tmp_path, "vqav2")
    questions = eval_folder.read_questions(located)
    written = answer_files.write_outputs(located, questions, {0: "Two dogs."}, tmp_path / "out", "m")
    assert json.loads((tmp_path / "out" / "answers_upload.json").read_text()) == [
        {"question_id": 7, "answer": "2 dogs"}, {"question_id": 8, "answer": ""}]
    result = answer_files.score_outputs(located, questions, written)
    assert result["status"] == "answers only" and "EvalAI" in result["reason"]


def test_a_question_suffix_is_added_only_where_missing(tmp_path):
    _json_lines(tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "1", "image": "a.jpg", "text": f"Is it red?\n{SHORT}"},
        {"question_id": "2", "image": "b.jpg", "text": "Is it blue?"}])
    (tmp_path / "gqa" / "images").mkdir()
    texts = [question.text for question in eval_folder.read_questions(_located(tmp_path, "gqa"))]
    assert texts == [f"Is it red?\n{SHORT}", f"Is it blue?\n{SHORT}"]


def test_pope_files_that_do_not_line_up_are_an_error_naming_both(tmp_path):
    _json_lines(tmp_path / "pope" / "llava_pope_test.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "category": "random"}])
    _json_lines(tmp_path / "pope" / "coco" / "coco_pope_random.json", [
        {"question_id": 1, "image": "b.jpg", "text": "Is there a cat?", "label": "yes"}])
    (tmp_path / "pope" / "val2014").mkdir()
    located = _located(tmp_path, "pope")
    with pytest.raises(files.BenchmarkInputError, match="coco_pope_random.json.*same order"):
        answer_files.write_outputs(located, eval_folder.read_questions(located), {0: "yes"}, tmp_path / "out", "m")


def test_mmmu_reads_tinyllava_anns_for_eval(tmp_path):
    """TinyLLaVA's anns_for_eval.json (all_choices + index2ans, answers in answer_dict_val.json) is scored as MMMU
    records; its output.json holds the parsed letter, as model_vqa_mmmu.py writes it."""
    folder = tmp_path / "MMMU"
    (folder / "all_images").mkdir(parents=True)
    (folder / "anns_for_eval.json").write_text(json.dumps([
        {"id": "validation_Art_1", "prompt": "Which?\n(A) cat\n(B) dog\nAnswer with the option's letter.",
         "question_type": "multiple-choice", "all_choices": ["A", "B"], "index2ans": {"A": "cat", "B": "dog"}}]))
    (folder / "eval").mkdir()
    (folder / "eval" / "answer_dict_val.json").write_text(json.dumps(
        {"validation_Art_1": {"question_type": "multiple-choice", "ground_truth": "B"}}))
    located = _located(tmp_path, "mmmu")
    questions = eval_folder.read_questions(located)
    assert questions[0].image is None  # asked as text
    written = answer_files.write_outputs(located, questions, {0: "I think (B)."}, tmp_path / "out", "m")
    assert json.loads((tmp_path / "out" / "output.json").read_text()) == {"validation_Art_1": "B"}
    result = answer_files.score_outputs(located, questions, written)
    assert result["status"] == "scored" and result["scores"]["accuracy"] == 1.0


def test_gqa_predictions_file_and_score(tmp_path):
    """convert_gqa_for_eval.py's predictions ({questionId, prediction}: `text.rstrip('.').lower()`), and GQA's exact
    match against data/testdev_balanced_questions.json, LLaVA's place for it: 1 of 2 right."""
    folder = tmp_path / "gqa"
    _json_lines(folder / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201", "image": "n1.jpg", "text": f"Is it red?\n{SHORT}"},
        {"question_id": "202", "image": "n2.jpg", "text": f"What is it?\n{SHORT}"}])
    (folder / "data" / "images").mkdir(parents=True)
    (folder / "data" / "testdev_balanced_questions.json").write_text(json.dumps(
        {"201": {"answer": "yes", "isBalanced": True}, "202": {"answer": "cat", "isBalanced": True}}))
    located = _located(tmp_path, "gqa")
    assert located.image_folder == str(folder / "data" / "images")
    questions = eval_folder.read_questions(located)
    written = answer_files.write_outputs(located, questions, {0: "Yes.", 1: "A dog."}, tmp_path / "out", "m")
    assert json.loads((tmp_path / "out" / "testdev_balanced_predictions.json").read_text()) == [
        {"questionId": "201", "prediction": "yes"}, {"questionId": "202", "prediction": "a dog"}]
    result = answer_files.score_outputs(located, questions, written)
    assert result["scores"]["accuracy"] == 0.5
    assert result["scored_with"]["questions"] == [str(folder / "data" / "testdev_balanced_questions.json")]
