"""MMMU: multiple-choice and open answers parsed from free text as the benchmark's own evaluation parses them.

Rules followed (reference files: MMMU-Benchmark/MMMU `mmmu/utils/eval_utils.py` (parse_multi_choice_response,
parse_open_response, eval_multi_choice, eval_open), `mmmu/utils/data_utils.py` (get_multi_choice_info,
DOMAIN_CAT2SUB_CAT), `mmmu/main_eval_only.py` (per-subject and per-domain instance-level accuracy)):
  * multiple choice, over the letters A, B, ... of the question's options: strip , . ! ? ; : ' from both ends and
    pad with spaces; candidates are the letters written "(A)"; failing that, the letters standing alone " A ";
    failing that, when the answer has more than five words, the letters whose option text appears in it
    (case-insensitive). Several candidates: the one that occurs last wins. Right when it equals the answer letter
    (or one of a list of letters).
    DEVIATION: with no candidate the reference picks a random letter (random.seed(42), so the pick depends on the
    order questions are scored in); here such an answer is unparsed and scored wrong, deterministically
    (`multiple_choice.unparsed_answers` counts them).
  * open: the answer is lower-cased and split into sentences; from each, the shortest tail after an indicator
    ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", and "=" in the last
    sentence) is a key response (the whole answer when there is none); numbers are extracted from the keys; every
    string that is a number becomes a float rounded to 2 decimals, other strings stay lower-cased (a one-character
    string becomes " x" and "x " to avoid trivial matches). Right when a float equals a normalised gold number, or
    a normalised gold string is a substring of a string candidate.
  * a missing or blank answer is wrong.

Questions file: MMMU validation records (JSON array or JSON lines, e.g. exported from the MMMU/MMMU dataset) with
id, question_type ("multiple-choice", or "open" / "short-answer"), options (a list, or its Python repr as the
dataset stores it; or TinyLLaVA's `anns_for_eval.json` fields all_choices + index2ans) and answer (a letter, an
open answer, or a list / its repr). `mmmu/answer_dict_val.json`
({id: {question_type, ground_truth}}) may be given as annotations; its ground_truth then replaces the answers.

Public API:
  DOMAIN_SUBJECTS ; MmmuQuestion ; parse_multi_choice_response(response, choices, index_to_answer) -> str | None
  parse_open_response(response) -> list ; eval_multi_choice(gold, letter) ; eval_open(gold, parsed)
  score_mmmu(questions, answers) -> dict ; read_mmmu_questions(path, answers_path=None) ; score_files(...)
"""
from __future__ import annotations

import ast
import dataclasses
import os
import re
from typing import Mapping, Sequence

from jaxalign.evaluate.benchmarks import files, predictions, tally

DOMAIN_SUBJECTS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
_SUBJECT_DOMAIN = {subject: domain for domain, subjects in DOMAIN_SUBJECTS.items() for subject in subjects}
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


@dataclasses.dataclass(frozen=True)
class MmmuQuestion:
    question_id: str  # "validation_<Subject>_<n>"
    multiple_choice: bool
    answer: str | tuple[str, ...]  # the letter(s) for multiple choice, the open answer(s) otherwise
    options: tuple[str, ...] = ()

    @property
    def subject(self) -> str:
        return "_".join(self.question_id.split("_")[1:-1])


def parse_multi_choice_response(response: str, choices: Sequence[str], index_to_answer: Mapping[str, str]):
    """The letter an answer picks by MMMU's rules, or None where MMMU would pick at random."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = f" {response} "
    candidates = [choice for choice in choices if f"({choice})" in response]
    with_brackets, by_letter = bool(candidates), True
    if not candidates:
        candidates = [choice for choice in choices if f" {choice} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [index for index, answer in index_to_answer.items() if answer.lower() in response.lower()]
        by_letter = False
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if by_letter:
        starts = [response.rfind(f"({choice})" if with_brackets else f" {choice} ") for choice in candidates]
    else:
        starts = [response.lower().rfind(index_to_answer[choice].lower()) for choice in candidates]
    return candidates[starts.index(max(starts))]  # the first of equal maxima, as numpy.argmax


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_open(text: str) -> list:
    """MMMU's normalize_str: a number as a float rounded to 2 decimals, else the lower-cased string (a single
    character padded with a space on either side, as two strings)."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    """Numbers written with thousands commas, in scientific notation, or plainly (MMMU's extract_numbers)."""
    return (_NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text)
            + _NUMBER_SIMPLE.findall(text))


def _key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list:
    """The candidate answers (floats and strings) MMMU reads from an open answer."""
    keys = _key_responses(response)
    candidates = list(keys)
    for key in keys:
        candidates.extend(extract_numbers(key))
    normalized = []
    for candidate in candidates:
        normalized.extend(normalize_open(candidate))
    return list(dict.fromkeys(normalized))


def eval_multi_choice(gold: str | Sequence[str], letter: str | None) -> bool:
    golds = [gold] if isinstance(gold, str) else list(gold)
    return letter is not None and letter in golds


def eval_open(gold: str | Sequence[str], parsed: Sequence) -> bool:
    golds = [gold] if isinstance(gold, str) else list(gold)
    normalized = [value for answer in golds for value in normalize_open(str(answer))]
    for candidate in parsed:
        if isinstance(candidate, str):
            if any(isinstance(value, str) and value in candidate for value in normalized):
                return True
        elif candidate in normalized:
            return True
    return False


def score_mmmu(questions: Sequence[MmmuQuestion], answers: Mapping[str, str]) -> dict:
    """{"accuracy", "questions", "missing_answers", "multiple_choice": {accuracy, questions, unparsed_answers},
    "open": {accuracy, questions}, "by_subject", "by_domain"}."""
    overall, kinds, subjects, domains = (tally.GroupTally() for _ in range(4))
    missing = unparsed = 0
    for question in questions:
        text = answers.get(question.question_id)
        right = False
        if not predictions.is_answered(text):
            missing += 1
        elif question.multiple_choice:
            letters = [chr(ord("A") + index) for index in range(len(question.options))]
            letter = parse_multi_choice_response(text, letters, dict(zip(letters, question.options)))
            unparsed += letter is None
            right = eval_multi_choice(question.answer, letter)
        else:
            right = eval_open(question.answer, parse_open_response(text))
        for group_tally, group in ((overall, "all"), (kinds, "multiple_choice" if question.multiple_choice else "open"),
                                   (subjects, question.subject), (domains, _SUBJECT_DOMAIN.get(question.subject))):
            if group:
                group_tally.add(group, float(right))
    by_kind = kinds.result()
    empty = {"accuracy": 0.0, "questions": 0}
    return {"accuracy": overall.result().get("all", empty)["accuracy"], "questions": len(questions),
            "missing_answers": missing,
            "multiple_choice": {**by_kind.get("multiple_choice", empty), "unparsed_answers": unparsed},
            "open": by_kind.get("open", empty), "by_subject": subjects.result(), "by_domain": domains.result()}


def _literal_list(value, path: str, where: str, field: str):
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise files.BenchmarkInputError(f"{path}: {where}: {field} {value!r} is not a list") from None
    return value


def read_mmmu_questions(path: files.PathLike, answers_path: files.PathLike | None = None) -> list[MmmuQuestion]:
    """MMMU question records, their answers replaced by answer_dict_val.json's ground_truth where given."""
    path = os.fspath(path)
    records = files.read_json_records(path, "MMMU questions: records with id, question_type, options, answer")
    if len(records) == 1 and isinstance(records[0][1], dict) and "id" not in records[0][1]:
        raise files.BenchmarkInputError(f"{path}: a JSON object without 'id', like answer_dict_val.json, holds no "
                                        "options: pass the question records as --questions and it as --annotations")
    truth = None
    if answers_path is not None:
        truth = files.read_json(answers_path, "MMMU answer_dict_val.json: {id: {question_type, ground_truth}}")
        if not isinstance(truth, dict):
            raise files.BenchmarkInputError(f"{os.fspath(answers_path)}: expected {{id: {{ground_truth}}}}")
    out = []
    for number, record in records:
        where = f"record {number}"
        question_id = str(record.get("id", record.get("question_id"))) if isinstance(record, dict) else None
        if question_id in (None, "None"):
            raise files.BenchmarkInputError(f"{path}: {where}: no 'id' field (an MMMU question)")
        kind = str(files.require_field(record, "question_type", path, where, "an MMMU question"))
        if truth is not None and question_id in truth:
            answer = files.require_field(truth[question_id], "ground_truth", os.fspath(answers_path), question_id,
                                         "an MMMU answer")
        else:
            answer = _literal_list(files.require_field(record, "answer", path, where, "an MMMU question"), path, where,
                                   "answer")
        options = _literal_list(record.get("options") or [], path, where, "options")
        if not options and isinstance(record.get("index2ans"), dict):  # TinyLLaVA's anns_for_eval.json
            letters = record.get("all_choices") or sorted(record["index2ans"])
            options = [record["index2ans"].get(letter, "") for letter in letters]
        if kind == "multiple-choice" and not (isinstance(options, list) and options):
            raise files.BenchmarkInputError(f"{path}: {where}: a multiple-choice question without options")
        answer = tuple(map(str, answer)) if isinstance(answer, list) else str(answer)
        out.append(MmmuQuestion(question_id, kind == "multiple-choice", answer, tuple(map(str, options))))
    return out


def score_files(predictions_path: files.PathLike, questions_paths, annotations_path=None) -> dict:
    """MMMU accuracy of an answers file against MMMU question records (+ answer_dict_val.json)."""
    questions_path = files.single_path(questions_paths, "mmmu")
    questions = read_mmmu_questions(questions_path, annotations_path)
    answers = predictions.match_answers(predictions.read_predictions(predictions_path),
                                        {question.question_id for question in questions}, predictions_path,
                                        questions_path)
    return score_mmmu(questions, answers)
