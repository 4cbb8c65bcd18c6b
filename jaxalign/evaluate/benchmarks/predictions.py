"""Model answers files as LLaVA's evaluation writes them, and matching their lines to a benchmark's questions.

An answers file is JSON lines, one object a question: `{"question_id": ..., "text": "the model's answer", ...}`
(LLaVA's `model_vqa_loader.py` also writes `prompt`, `answer_id`, `model_id`, `metadata`). `answer` is accepted in
place of `text` (the VQA results layout). Question ids are compared as strings, so `123` and `"123"` are the same
question. A question with no line, or whose text is empty, is unanswered: every scorer counts it as wrong (never
skips it) and reports how many there were as `missing_answers`.

Public API:
  Prediction(question_id, text, prompt, line)
  read_predictions(path) -> [Prediction]
  is_answered(text) -> bool
  match_answers(predictions, question_ids, predictions_path, questions_label, resolve=None) -> {uid: text}
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Collection, Sequence

from jaxalign.evaluate.benchmarks import files

WHAT = "a model answers file: JSON lines with question_id and text"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One line of an answers file: the question it answers, the model's text, the prompt if the file kept it, and
    the line number (for error messages)."""
    question_id: str
    text: str
    prompt: str | None
    line: int


def read_predictions(path: files.PathLike) -> list[Prediction]:
    """The lines of an answers file; a line that is not JSON or lacks question_id / text is an error naming it."""
    predictions = []
    for number, record in files.read_json_records(path, WHAT):
        question_id = files.require_field(record, "question_id", path, f"line {number}", WHAT)
        if "text" in record:
            text = record["text"]
        elif "answer" in record:
            text = record["answer"]
        else:
            raise files.BenchmarkInputError(f"{os.fspath(path)}: line {number}: no 'text' field (the model's answer)")
        prompt = record.get("prompt")
        predictions.append(Prediction(str(question_id), "" if text is None else str(text),
                                      None if prompt is None else str(prompt), number))
    return predictions


def is_answered(text: str | None) -> bool:
    """Whether a question has an answer to score: a missing or blank answer is not one (and is scored wrong)."""
    return text is not None and bool(text.strip())


def match_answers(predictions: Sequence[Prediction], question_ids: Collection[str], predictions_path: files.PathLike,
                  questions_label: str, resolve: Callable[[Prediction], str | None] | None = None) -> dict[str, str]:
    """{question id: answer text} for the predictions, checked against the benchmark's questions.

    Args:
      predictions: the lines of an answers file.
      question_ids: the ids of the questions being scored.
      predictions_path: the answers file, for error messages.
      questions_label: the questions file(s), for error messages.
      resolve: maps a prediction to the id of the question it answers, or None when it answers none; by default
        its own question_id. (TextVQA's LLaVA files and MME's need more: see their modules.)

    Raises:
      BenchmarkInputError: a prediction answers no known question, or two lines answer the same question.
    """
    resolve = resolve or (lambda prediction: prediction.question_id if prediction.question_id in question_ids
                          else None)
    answers: dict[str, str] = {}
    lines: dict[str, int] = {}
    for prediction in predictions:
        uid = resolve(prediction)
        if uid is None:
            raise files.BenchmarkInputError(
                f"{os.fspath(predictions_path)}: line {prediction.line}: question_id {prediction.question_id!r} is "
                f"not in the questions ({questions_label}); are the predictions and questions of the same split?")
        if uid in lines:
            raise files.BenchmarkInputError(
                f"{os.fspath(predictions_path)}: line {prediction.line}: a second answer to question "
                f"{prediction.question_id!r} (the first is on line {lines[uid]}); keep one line a question")
        answers[uid] = prediction.text
        lines[uid] = prediction.line
    return answers
