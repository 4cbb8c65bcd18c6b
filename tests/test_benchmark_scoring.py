"""The VLM benchmarks' official scoring (jaxalign.evaluate.benchmarks) and the `jaxalign score` command.

Every expected score is worked out by hand from the benchmark's published rules (the arithmetic is in the
comments), never computed by the scorer under test.
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib

import pytest

from jaxalign.commands import score as score_command
from jaxalign.evaluate.benchmarks import (files, gqa, mme, mmmu, normalize, pope, predictions, scienceqa, scoring,
                                          vqa)


def _write_jsonl(path: pathlib.Path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def _write_json(path: pathlib.Path, document) -> str:
    path.write_text(json.dumps(document))
    return str(path)


# ----------------------------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),          # number word to digit, final period removed
    ("isnt", "isn't"),                # contraction restored
    ("The red ball", "red ball"),     # article removed (after lower-casing)
    ("an apple", "apple"),
    ("yes!", "yes"),                  # "!" not next to a space: replaced by a space, then stripped by split/join
    ("left-hand", "left hand"),       # "-" between letters becomes a space
    ("3.5", "3.5"),                   # a period before a digit stays
    ("1,000", "1000"),                # a comma between digits: every mark deleted
    ("none", "0"),
])
def test_vqa_eval_normalisation(raw, expected):
    assert normalize.vqa_eval_answer(raw) == expected


def test_evalai_processor_drops_commas_and_question_marks_and_splits_possessives():
    assert normalize.evalai_answer("Two dogs.") == "2 dogs"
    assert normalize.evalai_answer("The dog's toy?") == "dog 's toy"
    assert normalize.evalai_answer("Red,\nblue") == "red blue"


def test_gqa_normalisation_strips_final_periods_and_lowercases():
    assert normalize.gqa_answer("Yes.") == "yes"
    assert normalize.gqa_answer("Left...") == "left"


# ----------------------------------------------------------------------------------------------- VQAv2 / TextVQA

@pytest.mark.parametrize("matching, expected", [
    # 3 of 10 annotators say "2": leaving out one of the 3 leaves 2 matches -> 2/3 (3 subsets); leaving out one of
    # the other 7 leaves 3 matches -> min(1, 3/3) = 1 (7 subsets): (3 * 2/3 + 7 * 1) / 10 = 9/10.
    (3, 0.9),
    # 1 of 10: leaving it out -> 0 (1 subset), otherwise 1/3 (9 subsets): 9 * 1/3 / 10 = 0.3.
    (1, 0.3),
    # 2 of 10: 2 subsets with 1 match (1/3), 8 with 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
    (2, 0.6),
    # 4 of 10: every subset keeps at least 3 matches -> 1.
    (4, 1.0),
    (0, 0.0),
])
def test_soft_accuracy_is_the_leave_one_annotator_out_mean(matching, expected):
    annotators = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa.vqav2_question_score("two", annotators) == pytest.approx(expected)
    assert vqa.textvqa_question_score("Two.", annotators) == pytest.approx(expected)


def test_vqav2_normalises_both_sides_when_annotators_disagree():
    # "Coca-Cola" -> "coca cola" ("-" between letters becomes a space): all ten match "coca cola" -> 1.
    assert vqa.vqav2_question_score("coca cola", ["Coca-Cola"] * 4 + ["coca cola"] * 6) == pytest.approx(1.0)
    # A blank answer is wrong, even against blank annotations.
    assert vqa.vqav2_question_score("  ", ["2"] * 10) == 0.0


def test_vqav2_files_score_missing_answers_as_wrong_and_break_down_by_type(tmp_path):
    questions = _write_json(tmp_path / "q.json", {"questions": [
        {"question_id": 1, "image_id": 10, "question": "How many dogs?"},
        {"question_id": 2, "image_id": 10, "question": "Is it red?"},
        {"question_id": 3, "image_id": 11, "question": "What color?"}]})
    annotations = _write_json(tmp_path / "a.json", {"annotations": [
        {"question_id": 1, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": "2", "answer_id": i} for i in range(3)] + [{"answer": "3"}] * 7},
        {"question_id": 2, "answer_type": "yes/no", "question_type": "is it",
         "answers": [{"answer": "yes"}] * 10},
        {"question_id": 3, "answer_type": "other", "question_type": "what color",
         "answers": [{"answer": "red"}] * 10}]})
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1, "text": "Two."},     # 3 of 10 say "2" -> 0.9 (see above)
        {"question_id": 2, "text": "Yes"},      # 10 of 10 -> 1
        {"question_id": 3, "text": ""}])        # blank -> 0, counted missing
    result = vqa.score_vqav2_files(answers, [questions], annotations)
    assert result["accuracy"] == pytest.approx((0.9 + 1.0 + 0.0) / 3)
    assert result["questions"] == 3 and result["missing_answers"] == 1
    assert result["by_answer_type"]["number"] == {"accuracy": pytest.approx(0.9), "questions": 1}
    assert result["by_answer_type"]["other"]["accuracy"] == 0.0
    assert result["by_question_type"]["is it"]["accuracy"] == 1.0


def test_textvqa_reads_its_data_layout_and_llava_image_id_predictions(tmp_path):
    questions = _write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "What brand is this camera?",
         "answers": ["Dakota"] * 4 + ["dakota digital"] * 6},
        {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "What does the sign say?",
         "answers": ["stop"] * 10}]})
    # LLaVA's TextVQA answers carry the image id as question_id; the question comes from the prompt.
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "003a8ae2ef43b901", "text": "Dakota.",
         "prompt": "What brand is this camera?\nReference OCR token: dakota, digital\n"
                   "Answer the question using a single word or phrase."}])
    result = vqa.score_textvqa_files(answers, [questions])
    # "Dakota." -> "dakota": 4 of 10 match -> 1 (every subset keeps >= 3); the sign question is missing -> 0.
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["missing_answers"] == 1


# ----------------------------------------------------------------------------------------------- GQA

def test_gqa_exact_match_on_balanced_questions(tmp_path):
    questions = _write_json(tmp_path / "testdev_balanced_questions.json", {
        "201": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"answer": "right", "isBalanced": True, "types": {"structural": "query", "semantic": "rel"}},
        "203": {"answer": "cat", "isBalanced": True, "types": {"structural": "query", "semantic": "obj"}},
        "204": {"answer": "dog", "isBalanced": False, "types": {"structural": "query", "semantic": "obj"}}})
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "201", "text": "Yes."},   # "yes" == "yes": right
        {"question_id": "202", "text": "left"},   # wrong
        {"question_id": "204", "text": "cat"}])   # unbalanced: not scored; 203 missing: wrong
    result = gqa.score_files(answers, [questions])
    assert result["accuracy"] == pytest.approx(1 / 3) and result["questions"] == 3
    assert result["missing_answers"] == 1
    assert result["binary"] == {"accuracy": 1.0, "questions": 1}     # verify: 1 of 1
    assert result["open"] == {"accuracy": 0.0, "questions": 2}       # query: 0 of 2


# ----------------------------------------------------------------------------------------------- ScienceQA

@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("B. a magnet", "B"), ("The answer is C.", "C"),
    ("The answer is A. No wait, The answer is B.", None),  # two matches: unparsed
    ("I think D", None), ("b", None),
])
def test_scienceqa_letter_extraction(text, letter):
    assert scienceqa.extract_option_letter(text) == letter


def test_scienceqa_img_accuracy_from_problems_json(tmp_path):
    problems = _write_json(tmp_path / "problems.json", {
        "1": {"choices": ["x", "y"], "answer": 0, "image": "image.png", "subject": "natural science", "split": "test"},
        "2": {"choices": ["x", "y", "z"], "answer": 1, "image": "image.png", "subject": "social science",
              "split": "test"},
        "3": {"choices": ["x", "y"], "answer": 1, "image": "image.png", "subject": "natural science", "split": "test"},
        "4": {"choices": ["x", "y"], "answer": 0, "image": None, "subject": "language science", "split": "test"},
        "5": {"choices": ["x", "y"], "answer": 0, "image": None, "subject": "language science", "split": "train"}})
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "1", "text": "A"},                 # right
        {"question_id": "2", "text": "B. y"},              # right
        {"question_id": "3", "text": "C"}])                # C is beyond its 2 choices: wrong; 4 missing: wrong
    result = scienceqa.score_files(answers, [problems])
    assert result["accuracy"] == pytest.approx(2 / 3)      # image questions 1, 2, 3: two right
    assert result["questions"] == 3 and result["missing_answers"] == 0
    assert result["all_questions"]["accuracy"] == pytest.approx(2 / 4)  # the test split: 1-4
    assert result["all_questions"]["missing_answers"] == 1
    assert result["by_subject"]["natural science"] == {"accuracy": 0.5, "questions": 2}


def test_scienceqa_reads_llava_cqm_a_json(tmp_path):
    questions = _write_json(tmp_path / "llava_test_CQM-A.json", [
        {"id": "7", "image": "7/image.png", "conversations": [
            {"from": "human", "value": "Context: N/A\nQuestion: Which?\nOptions: (A) x (B) y (C) z\n<image>"},
            {"from": "gpt", "value": "The answer is C."}]},
        {"id": "8", "conversations": [
            {"from": "human", "value": "Context: N/A\nQuestion: Which?\nOptions: (A) x (B) y"},
            {"from": "gpt", "value": "The answer is A."}]}])
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": "7", "text": "C"},
                                                       {"question_id": "8", "text": "B"}])
    result = scienceqa.score_files(answers, questions)
    assert result["accuracy"] == 1.0 and result["questions"] == 1          # only 7 has an image
    assert result["all_questions"]["accuracy"] == 0.5


# ----------------------------------------------------------------------------------------------- POPE

@pytest.mark.parametrize("text, is_yes", [
    ("Yes, there is a cat.", True), ("No, there is no cat.", False), ("There is not a cat in the image.", False),
    ("Yes. There is no dog.", True),   # only the first sentence counts
    ("NO", True), ("nope", True),      # only the words no / No / not mean no
])
def test_pope_answer_parsing(text, is_yes):
    assert pope.answer_is_yes(text) is is_yes


def test_pope_metrics_per_split_and_a_split_without_positives(tmp_path):
    random_split = _write_jsonl(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "text": "Is there a cat?", "label": "yes"},
        {"question_id": 2, "text": "Is there a dog?", "label": "yes"},
        {"question_id": 3, "text": "Is there a car?", "label": "no"},
        {"question_id": 4, "text": "Is there a cup?", "label": "no"}])
    negative_split = _write_jsonl(tmp_path / "coco_pope_adversarial.json", [
        {"question_id": 11, "text": "Is there a fork?", "label": "no"},
        {"question_id": 12, "text": "Is there a knife?", "label": "no"},
        {"question_id": 13, "text": "Is there a spoon?", "label": "no"}])
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1, "text": "Yes"}, {"question_id": 2, "text": "No"},
        {"question_id": 3, "text": "No"}, {"question_id": 4, "text": "Yes"},
        {"question_id": 11, "text": "No"}, {"question_id": 12, "text": "Yes, there is."}])   # 13 missing
    result = pope.score_files(answers, [random_split, negative_split])
    # random: TP=1 (q1), FN=1 (q2), TN=1 (q3), FP=1 (q4): accuracy 2/4, precision 1/2, recall 1/2,
    # F1 2*.5*.5/(.5+.5) = .5, yes-ratio 2/4.
    assert result["splits"]["random"] == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                                          "yes_ratio": 0.5, "questions": 4, "tp": 1, "fp": 1, "tn": 1, "fn": 1}
    # adversarial: no positive labels. q11 TN, q12 FP, q13 missing -> the opposite of "no" -> FP.
    # accuracy 1/3, precision 0/(0+2) = 0, recall 0/0 -> 0, F1 0, yes-ratio 2/3.
    adversarial = result["splits"]["adversarial"]
    assert adversarial["accuracy"] == pytest.approx(1 / 3) and adversarial["yes_ratio"] == pytest.approx(2 / 3)
    assert adversarial["precision"] == 0.0 and adversarial["recall"] == 0.0 and adversarial["f1"] == 0.0
    # Top level: means over the two splits.
    assert result["accuracy"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert result["f1"] == pytest.approx(0.25)
    assert result["missing_answers"] == 1 and result["questions"] == 7


# ----------------------------------------------------------------------------------------------- MME

@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No, it is not.", "no"), ("yes\n", "yes"), ("Not sure", "no"),  # "not " holds "no"
    ("I think yes", "other"),
])
def test_mme_answer_parsing(text, parsed):
    assert mme.parse_answer(text) == parsed


def _mme_release_folder(root: pathlib.Path) -> pathlib.Path:
    # existence keeps question files beside its images; code_reasoning under images/ + questions_answers_YN/.
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "0001.txt").write_text(
        "Is there a cat in this image? Please answer yes or no.\tYes\n"
        "Is there a dog in this image? Please answer yes or no.\tNo\n")
    (root / "existence" / "0002.txt").write_text(
        "Is there a car in this image? Please answer yes or no.\tYes\n"
        "Is there a bus in this image?  Please answer yes or no.\tNo\n")
    (root / "code_reasoning" / "images").mkdir(parents=True)
    (root / "code_reasoning" / "questions_answers_YN").mkdir()
    (root / "code_reasoning" / "questions_answers_YN" / "0020.txt").write_text(
        "Does the code print 3? Please answer yes or no.\tYes\nDoes the code print 4? Please answer yes or no.\tNo\n")
    return root


def test_mme_accuracy_plus_needs_both_questions_of_an_image_right(tmp_path):
    root = _mme_release_folder(tmp_path / "MME_Benchmark_release_version")
    suffix = "\nAnswer the question using a single word or phrase."
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "existence/0001.jpg", "prompt": "Is there a cat in this image?" + suffix, "text": "Yes"},
        {"question_id": "existence/0001.jpg", "prompt": "Is there a dog in this image?" + suffix, "text": "No"},
        {"question_id": "existence/0002.jpg", "prompt": "Is there a car in this image?" + suffix, "text": "Yes"},
        {"question_id": "existence/0002.jpg", "prompt": "Is there a bus in this image?" + suffix, "text": "Yes"},
        {"question_id": "code_reasoning/0020.png", "prompt": "Does the code print 3?" + suffix, "text": "yes"}])
    result = mme.score_files(answers, [str(root)])
    # existence: 3 of 4 right -> accuracy 0.75; image 0001 both right, 0002 one right -> accuracy+ 1/2;
    # score 100 * 0.75 + 100 * 0.5 = 125.
    existence = result["tasks"]["existence"]
    assert existence["accuracy"] == 0.75 and existence["accuracy_plus"] == 0.5 and existence["score"] == 125.0
    # code_reasoning: "print 4?" missing (wrong) -> accuracy 1/2, accuracy+ 0/1 -> score 50.
    assert result["tasks"]["code_reasoning"]["score"] == 50.0
    assert result["perception"] == 125.0 and result["cognition"] == 50.0
    assert result["accuracy"] == pytest.approx(4 / 6) and result["missing_answers"] == 1
    assert "count" in result["tasks_missing"]


def test_mme_reads_eval_tool_task_files_and_llava_jsonl_with_annotations(tmp_path):
    task_file = tmp_path / "count.txt"
    task_file.write_text("0005.jpg\tAre there two cats? Please answer yes or no.\tYes\n"
                         "0005.jpg\tAre there three cats? Please answer yes or no.\tNo\n")
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "count/0005.jpg", "prompt": "Are there two cats?", "text": "Yes"},
        {"question_id": "count/0005.jpg", "prompt": "Are there three cats?", "text": "No"}])
    assert mme.score_files(answers, [str(task_file)])["tasks"]["count"]["score"] == 200.0  # 100 + 100
    llava_questions = _write_jsonl(tmp_path / "llava_mme.jsonl", [
        {"question_id": "count/0005.jpg", "image": "count/0005.jpg", "category": "count",
         "text": "Are there two cats?\nAnswer the question using a single word or phrase."},
        {"question_id": "count/0005.jpg", "image": "count/0005.jpg", "category": "count",
         "text": "Are there three cats?\nAnswer the question using a single word or phrase."}])
    result = mme.score_files(answers, [llava_questions], str(task_file))
    assert result["perception"] == 200.0 and result["questions"] == 2


# ----------------------------------------------------------------------------------------------- MMMU

@pytest.mark.parametrize("response, letter", [
    ("(B)", "B"),
    ("The answer is C", "C"),                               # " C " stands alone
    ("(A) is wrong but (C) is right", "C"),                 # two bracketed: the last one wins
    ("I am quite sure it must be the red apple", "B"),      # > 5 words, option text "red apple" appears
    ("no idea", None),                                      # MMMU would guess at random: unparsed here
])
def test_mmmu_multiple_choice_parsing(response, letter):
    options = {"A": "green pear", "B": "red apple", "C": "blue plum"}
    assert mmmu.parse_multi_choice_response(response, list(options), options) == letter


def test_mmmu_open_parsing():
    # "the answer is 1,000": the shortest tail after an indicator is "1,000" (after "is "); its numbers "1,000"
    # (with commas) and "000" (a plain number) -> 1000.0 and 0.0; the string "1,000" is a number too -> 1000.0.
    assert set(mmmu.parse_open_response("The answer is 1,000.")) == {1000.0, 0.0}
    assert mmmu.eval_open("1000", mmmu.parse_open_response("The answer is 1,000."))
    assert mmmu.eval_open("Paris", mmmu.parse_open_response("It is Paris"))              # "paris" in "paris"
    assert mmmu.eval_open(["24/7", "3.429"], mmmu.parse_open_response("so x = 3.429"))   # 3.429 -> 3.43 both sides
    assert not mmmu.eval_open("12", mmmu.parse_open_response("The answer is 13"))


def test_mmmu_scores_per_subject_and_domain(tmp_path):
    questions = _write_jsonl(tmp_path / "mmmu_validation.jsonl", [
        {"id": "validation_Art_1", "question_type": "multiple-choice", "options": "['a', 'b']", "answer": "B"},
        {"id": "validation_Math_2", "question_type": "open", "options": "[]", "answer": "1000"},
        {"id": "validation_Math_3", "question_type": "multiple-choice", "options": ["x", "y"], "answer": "A"}])
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "validation_Art_1", "text": "(B)"},                   # right
        {"question_id": "validation_Math_2", "text": "The answer is 1,000."},  # right
        {"question_id": "validation_Math_3", "text": "no idea"}])              # unparsed: wrong
    result = mmmu.score_files(answers, [questions])
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["multiple_choice"] == {"accuracy": 0.5, "questions": 2, "unparsed_answers": 1}
    assert result["open"] == {"accuracy": 1.0, "questions": 1}
    assert result["by_subject"]["Math"] == {"accuracy": 0.5, "questions": 2}
    assert result["by_domain"]["Art and Design"]["accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------- the command

def _run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxalign")
    score_command.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _pope_files(tmp_path):
    questions = _write_jsonl(tmp_path / "coco_pope_popular.json", [
        {"question_id": 1, "text": "Is there a cat?", "label": "yes"},
        {"question_id": 2, "text": "Is there a dog?", "label": "no"}])
    return questions


def test_command_prints_the_headline_metrics_as_top_level_keys(tmp_path, capsys):
    questions = _pope_files(tmp_path)
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "Yes"},
                                                       {"question_id": 2, "text": "No"}])
    assert _run_command(["score", "pope", "--predictions", answers, "--questions", questions]) == 0
    output = json.loads(capsys.readouterr().out)
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio", "missing_answers", "splits"} <= set(output)
    assert output["accuracy"] == 1.0 and output["f1"] == 1.0 and "popular" in output["splits"]


def test_command_names_the_benchmarks_of_the_library():
    assert set(score_command.BENCHMARK_NAMES) == set(scoring.BENCHMARKS)


@pytest.mark.parametrize("bad, needle", [
    ("missing", "no such file"),
    ("not json", "line 2: not valid JSON"),
    ("unknown id", "line 2: question_id '99' is not in the questions"),
])
def test_command_reports_bad_input_in_one_line_with_exit_code_2(tmp_path, capsys, bad, needle):
    questions = _pope_files(tmp_path)
    answers = tmp_path / "answers.jsonl"
    if bad == "not json":
        answers.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 2, "text": \n')
    elif bad == "unknown id":
        _write_jsonl(answers, [{"question_id": 1, "text": "Yes"}, {"question_id": 99, "text": "No"}])
    assert _run_command(["score", "pope", "--predictions", str(answers), "--questions", questions]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(answers) in error and needle in error and "Traceback" not in error


def test_command_reports_a_missing_questions_file(tmp_path, capsys):
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "Yes"}])
    missing = str(tmp_path / "nowhere.json")
    assert _run_command(["score", "gqa", "--predictions", answers, "--questions", missing]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err


def test_command_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run_command(["score", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in score_command.BENCHMARK_NAMES) and "--annotations" in text


def test_duplicate_answers_are_an_error(tmp_path):
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "a"},
                                                       {"question_id": "1", "text": "b"}])
    with pytest.raises(files.BenchmarkInputError, match="line 2: a second answer"):
        predictions.match_answers(predictions.read_predictions(answers), {"1"}, answers, "questions.json")


def test_benchmarks_package_imports_no_command_line_code():
    package = pathlib.Path(scoring.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.startswith(("jaxalign.commands", "jaxalign.cli", "jaxalign.programs"))
                           for name in names), path


def test_vqa_questions_without_annotations_ask_for_them(tmp_path):
    questions = _write_json(tmp_path / "q.json", {"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]})
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "2"}])
    with pytest.raises(files.BenchmarkInputError, match="pass the matching annotations JSON with --annotations"):
        scoring.score_files("vqav2", answers, [questions])


def test_a_missing_predictions_file_is_named_before_any_questions_are_read(tmp_path):
    missing = str(tmp_path / "answers.jsonl")
    with pytest.raises(files.BenchmarkInputError, match="answers.jsonl: no such file"):
        scoring.score_files("gqa", missing, [str(tmp_path / "also_missing.json")])


def test_scienceqa_split_from_pid_splits(tmp_path):
    problems = _write_json(tmp_path / "problems.json", {
        "1": {"choices": ["x", "y"], "answer": 1, "image": "image.png", "split": "val"},
        "2": {"choices": ["x", "y"], "answer": 0, "image": "image.png", "split": "test"}})
    splits = _write_json(tmp_path / "pid_splits.json", {"val": ["1"], "test": ["2"]})
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": "1", "text": "B"}])
    result = scoring.score_files("scienceqa", answers, [problems], splits, split="val")
    assert result["accuracy"] == 1.0 and result["questions"] == 1   # problem 1 only; its answer B is index 1
