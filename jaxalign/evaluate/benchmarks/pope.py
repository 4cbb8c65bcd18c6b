"""POPE (object hallucination): yes/no answers scored as accuracy, precision, recall, F1 and yes-ratio per split.

Rules followed (reference files: haotian-liu/LLaVA `llava/eval/eval_pope.py`, the same parsing as POPE's own
`evaluate.py`, RUCAIBox/POPE):
  * an answer keeps only its first sentence (the text before its first "."), loses its commas and is split on
    spaces; it means "no" when one of the words is exactly "No", "no" or "not", and "yes" otherwise;
  * a label "no" is negative and any other label positive; with "yes" as the positive class, TP, FP, TN, FN give
    accuracy (TP+TN)/all, precision TP/(TP+FP), recall TP/(TP+FN), F1 2PR/(P+R) and yes-ratio (answers "yes")/all.
    Where a denominator is 0 (a split without positive labels, or a model that never says "yes") the metric is
    0.0, sklearn's zero_division=0, where the reference would divide by zero;
  * a missing or blank answer is scored wrong, never skipped: it counts as the opposite of its label (FN for a
    "yes" question, FP, and so a "yes", for a "no" question), and is counted in `missing_answers`.
Splits: the questions' `category` field where they have one, else the split in the file name
(`coco_pope_<split>.json`). With several splits the top-level metrics are the means over splits (LLaVA-1.5 reports
the mean over the three COCO splits); each split's own metrics are under `splits`.

Question files: POPE's `coco_pope_{random,popular,adversarial}.json`, JSON lines of {question_id, image, text,
label}; several may be given when their question ids differ (POPE numbers each split from 1, so usually one split
is scored at a time).

Public API:
  PopeQuestion ; answer_is_yes(text) -> bool ; binary_metrics(tp, fp, tn, fn) -> dict
  score_pope(questions, answers) -> dict ; read_pope_questions(paths) ; score_files(...)
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Mapping, Sequence

from jaxalign.evaluate.benchmarks import files, predictions, tally

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_SPLIT_IN_NAME = re.compile(r"coco_pope_(\w+)\.jsonl?$")


@dataclasses.dataclass(frozen=True)
class PopeQuestion:
    question_id: str
    positive: bool  # the label is "yes"
    split: str


def answer_is_yes(text: str) -> bool:
    """POPE's reading of an answer: "no" when the first sentence has the word no / No / not, else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def binary_metrics(tp: int, fp: int, tn: int, fn: int) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of a confusion matrix ("yes" positive), 0.0 where undefined."""
    total = tp + fp + tn + fn
    precision, recall = tally.fraction(tp, tp + fp), tally.fraction(tp, tp + fn)
    return {"accuracy": tally.fraction(tp + tn, total), "precision": precision, "recall": recall,
            "f1": tally.fraction(2 * precision * recall, precision + recall),
            "yes_ratio": tally.fraction(tp + fp, total), "questions": total, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(questions: Sequence[PopeQuestion], answers: Mapping[str, str]) -> dict:
    """{"accuracy", "precision", "recall", "f1", "yes_ratio", "questions", "missing_answers", "splits": {split:
    the same five metrics with the confusion counts}}."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    missing = 0
    for question in questions:
        text = answers.get(question.question_id)
        if predictions.is_answered(text):
            says_yes = answer_is_yes(text)
        else:
            missing += 1
            says_yes = not question.positive  # wrong by construction
        key = ("tp" if question.positive else "fp") if says_yes else ("fn" if question.positive else "tn")
        counts[question.split][key] += 1
    splits = {split: binary_metrics(c["tp"], c["fp"], c["tn"], c["fn"]) for split, c in sorted(counts.items())}
    result = {name: tally.fraction(sum(split[name] for split in splits.values()), len(splits)) for name in METRICS}
    result.update({"questions": len(questions), "missing_answers": missing, "splits": splits})
    return result


def _split_name(path: str) -> str:
    match = _SPLIT_IN_NAME.search(os.path.basename(path))
    return match.group(1) if match else os.path.splitext(os.path.basename(path))[0]


def read_pope_questions(paths: Sequence[files.PathLike]) -> list[PopeQuestion]:
    """The questions of one or more POPE label files; a question id in two files is an error."""
    out, seen = [], {}
    for path in map(os.fspath, paths):
        for number, record in files.read_json_records(path, "POPE questions: JSON lines with question_id and label"):
            where = f"line {number}"
            question_id = str(files.require_field(record, "question_id", path, where, "a POPE question"))
            label = files.require_field(record, "label", path, where, "a POPE question with its yes/no label")
            if question_id in seen:
                raise files.BenchmarkInputError(
                    f"{path}: {where}: question_id {question_id} is also in {seen[question_id]}; POPE numbers each "
                    "split from 1, so score each split with its own predictions file")
            seen[question_id] = f"{path}"
            out.append(PopeQuestion(question_id, str(label) != "no", str(record.get("category") or _split_name(path))))
    return out


def score_files(predictions_path: files.PathLike, questions_paths, annotations_path=None) -> dict:
    """POPE metrics of an answers file against one or more coco_pope_<split>.json label files."""
    paths = [questions_paths] if isinstance(questions_paths, (str, os.PathLike)) else list(questions_paths)
    if annotations_path is not None:
        raise files.BenchmarkInputError(f"{os.fspath(annotations_path)}: POPE takes no annotations file: the labels "
                                        "are in the coco_pope_<split>.json questions")
    questions = read_pope_questions(paths)
    answers = predictions.match_answers(predictions.read_predictions(predictions_path),
                                        {question.question_id for question in questions}, predictions_path,
                                        ", ".join(map(os.fspath, paths)))
    return score_pope(questions, answers)
