"""ScienceQA-IMG: the option letter read from the model's answer, and accuracy on the questions with an image.

Rules followed (reference file: haotian-liu/LLaVA `llava/eval/eval_science_qa.py`, run by
`scripts/v1_5/eval/sqa.sh` with the options A-E):
  * the letter is the whole answer when the answer is one of A-E; else its first character when that is one of
    A-E and is followed by ". " ("B. a magnet"); else the one match of `The answer is ([A-Z]).` when there is
    exactly one; otherwise the answer is unparsed (LLaVA's "FAILED");
  * the letter counts only when it is among the first len(choices) options; it is right when its index equals the
    problem's `answer` index; a missing answer is "FAILED", i.e. wrong;
  * `accuracy` is over the questions with an image (LLaVA's "IMG-Accuracy", the ScienceQA-IMG column of the
    LLaVA papers). LLaVA tells those apart by "<image>" in the answer's prompt, which a missing answer lacks;
    here the problem's own image field decides, so a missing answer to an image question still counts (wrong).
    `all_questions` holds the accuracy over every question of the split.

Question files: ScienceQA's `problems.json` (keyed by problem id: choices, answer index, image, subject, split),
with `pid_splits.json` as annotations or, without it, the problems whose `split` is the one asked for (default
"test"); or LLaVA's `llava_test_CQM-A.json` (a list of {id, image?, conversations}: the options are read from the
human turn's "Options: (A) ... (B) ...", the answer from the gpt turn's "The answer is X.").

Public API:
  ScienceQaQuestion ; extract_option_letter(text) -> str | None ; score_scienceqa(questions, answers) -> dict
  read_scienceqa_questions(questions_path, splits_path=None, split="test") ; score_files(...)
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Sequence

from jaxalign.evaluate.benchmarks import files, predictions, tally

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


@dataclasses.dataclass(frozen=True)
class ScienceQaQuestion:
    question_id: str
    answer_index: int  # index of the right choice: 0 for A
    choice_count: int
    has_image: bool
    subject: str | None = None


def extract_option_letter(text: str) -> str | None:
    """The option letter of an answer by LLaVA's rules ("B", "B. magnet", "... The answer is B."), or None."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    matches = _ANSWER_IS.findall(text)
    return matches[0] if len(matches) == 1 else None


def _subset_result(questions: Sequence[ScienceQaQuestion], answers: Mapping[str, str]) -> dict:
    overall, by_subject = tally.GroupTally(), tally.GroupTally()
    missing = unparsed = 0
    for question in questions:
        text = answers.get(question.question_id)
        letter = None
        if not predictions.is_answered(text):
            missing += 1
        else:
            letter = extract_option_letter(text)
            unparsed += letter is None
        right = letter in OPTIONS[:question.choice_count] and OPTIONS.index(letter) == question.answer_index
        overall.add("all", float(right))
        if question.subject is not None:
            by_subject.add(question.subject, float(right))
    result = {"accuracy": overall.result().get("all", {"accuracy": 0.0})["accuracy"], "questions": len(questions),
              "missing_answers": missing, "unparsed_answers": unparsed}
    if by_subject.count:
        result["by_subject"] = by_subject.result()
    return result


def score_scienceqa(questions: Sequence[ScienceQaQuestion], answers: Mapping[str, str]) -> dict:
    """{"accuracy" (questions with an image), "questions", "missing_answers", "unparsed_answers", "by_subject",
    "all_questions": the same over every question}."""
    result = _subset_result([question for question in questions if question.has_image], answers)
    result["all_questions"] = _subset_result(questions, answers)
    return result


def _from_problems(path: str, problems: dict, splits_path, split: str) -> list[ScienceQaQuestion]:
    if splits_path is not None:
        splits = files.read_json(splits_path, "ScienceQA pid_splits.json")
        if not isinstance(splits, dict) or split not in splits:
            raise files.BenchmarkInputError(f"{os.fspath(splits_path)}: no split {split!r} (has "
                                            f"{sorted(splits) if isinstance(splits, dict) else 'no splits'})")
        ids = [str(pid) for pid in splits[split]]
    else:
        ids = [pid for pid, problem in problems.items() if isinstance(problem, dict) and problem.get("split") == split]
    if not ids:
        raise files.BenchmarkInputError(f"{path}: no problems in split {split!r}")
    out = []
    for pid in ids:
        if pid not in problems:
            raise files.BenchmarkInputError(f"{path}: no problem {pid!r} (listed in {os.fspath(splits_path)})")
        where = f"problem {pid}"
        choices = files.require_field(problems[pid], "choices", path, where, "a ScienceQA problem")
        answer = files.require_field(problems[pid], "answer", path, where, "a ScienceQA problem")
        out.append(ScienceQaQuestion(pid, int(answer), len(choices), problems[pid].get("image") is not None,
                                     problems[pid].get("subject")))
    return out


def _from_llava(path: str, records: list) -> list[ScienceQaQuestion]:
    out = []
    for number, record in enumerate(records, start=1):
        where = f"record {number}"
        question_id = str(files.require_field(record, "id", path, where, "a LLaVA ScienceQA question"))
        turns = files.require_field(record, "conversations", path, where, "a LLaVA ScienceQA question")
        if not isinstance(turns, list) or len(turns) < 2:
            raise files.BenchmarkInputError(f"{path}: {where}: expected a human turn and a gpt turn")
        human, reply = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
        options_line = next((line for line in human.split("\n") if line.startswith("Options:")), "")
        choice_count = 0
        while choice_count < len(OPTIONS) and f"({OPTIONS[choice_count]})" in options_line:
            choice_count += 1
        letter = _ANSWER_IS.findall(reply)
        if choice_count == 0 or len(letter) != 1 or letter[0] not in OPTIONS[:choice_count]:
            raise files.BenchmarkInputError(f"{path}: {where} (id {question_id}): cannot read the options ('Options: "
                                            "(A) ...') and the answer ('The answer is X.'); is it llava_test_CQM-A?")
        out.append(ScienceQaQuestion(question_id, OPTIONS.index(letter[0]), choice_count, "image" in record))
    return out


def read_scienceqa_questions(questions_path: files.PathLike, splits_path: files.PathLike | None = None,
                             split: str = "test") -> list[ScienceQaQuestion]:
    """The questions of one split from problems.json (+ pid_splits.json), or of LLaVA's llava_test_CQM-A.json."""
    path = os.fspath(questions_path)
    document = files.read_json(path, "ScienceQA problems.json or LLaVA's llava_test_CQM-A.json")
    if isinstance(document, dict):
        return _from_problems(path, document, splits_path, split)
    if isinstance(document, list):
        return _from_llava(path, document)
    raise files.BenchmarkInputError(f"{path}: expected problems.json (an object keyed by problem id) or "
                                    "llava_test_CQM-A.json (a list)")


def score_files(predictions_path: files.PathLike, questions_paths, annotations_path=None, split: str = "test") -> dict:
    """ScienceQA-IMG accuracy of an answers file; `annotations_path` is pid_splits.json (optional)."""
    questions_path = files.single_path(questions_paths, "scienceqa")
    questions = read_scienceqa_questions(questions_path, annotations_path, split)
    answers = predictions.match_answers(predictions.read_predictions(predictions_path),
                                        {question.question_id for question in questions}, predictions_path,
                                        f"{questions_path}, split {split!r}")
    return score_scienceqa(questions, answers)
