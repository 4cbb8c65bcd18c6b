"""GQA: exact-match accuracy on the balanced questions, with GQA's per-type breakdowns.

Rules followed (reference files):
  * LLaVA's `scripts/convert_gqa_for_eval.py` (haotian-liu/LLaVA) turns each answer into
    `text.rstrip('.').lower()` (`normalize.gqa_answer`);
  * GQA's official `eval.py` (gqadataset.org, distributed with the questions; LLaVA's `scripts/v1_5/eval/gqa.sh`
    runs it) scores the questions whose `isBalanced` is true: 1 point when the prediction equals the question's
    `answer` exactly, else 0, averaged; it also reports `binary` and `open` accuracy (open: structural type
    "query") and accuracy per structural and per semantic type.

Questions file: `testdev_balanced_questions.json`, a JSON object keyed by question id, each with `answer`,
`isBalanced` and `types: {structural, semantic, detailed}` (a question without `isBalanced` is scored).

Public API:
  GqaQuestion ; read_gqa_questions(path) -> [GqaQuestion] ; score_gqa(questions, answers) -> dict ; score_files(...)
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from jaxalign.evaluate.benchmarks import files, normalize, predictions, tally


@dataclasses.dataclass(frozen=True)
class GqaQuestion:
    question_id: str
    answer: str
    structural_type: str | None = None
    semantic_type: str | None = None
    balanced: bool = True  # eval.py scores only balanced questions; the others may be answered but do not count


def read_gqa_questions(path: files.PathLike) -> list[GqaQuestion]:
    """The questions of a GQA questions file (a JSON object keyed by question id)."""
    document = files.read_json(path, "GQA questions JSON keyed by question id")
    if not isinstance(document, dict) or not all(isinstance(value, dict) for value in document.values()):
        raise files.BenchmarkInputError(f"{path}: not a GQA questions file: expected a JSON object keyed by question "
                                        "id, each value with 'answer' (testdev_balanced_questions.json)")
    out = []
    for question_id, record in document.items():
        answer = files.require_field(record, "answer", path, f"question {question_id}", "a GQA question")
        types = record.get("types") or {}
        out.append(GqaQuestion(str(question_id), str(answer), types.get("structural"), types.get("semantic"),
                               bool(record.get("isBalanced", True))))
    return out


def score_gqa(questions: Sequence[GqaQuestion], answers: Mapping[str, str]) -> dict:
    """{"accuracy", "questions", "missing_answers", "binary", "open", "by_structural_type", "by_semantic_type"},
    over the balanced questions."""
    questions = [question for question in questions if question.balanced]
    overall, binary_open, structural, semantic = (tally.GroupTally() for _ in range(4))
    missing = 0
    for question in questions:
        text = answers.get(question.question_id)
        answered = predictions.is_answered(text)
        missing += not answered
        score = float(answered and normalize.gqa_answer(text) == question.answer)
        overall.add("all", score)
        if question.structural_type is not None:
            binary_open.add("open" if question.structural_type == "query" else "binary", score)
            structural.add(question.structural_type, score)
        if question.semantic_type is not None:
            semantic.add(question.semantic_type, score)
    result = {"accuracy": overall.result().get("all", {"accuracy": 0.0})["accuracy"], "questions": len(questions),
              "missing_answers": missing}
    if binary_open.count:
        kinds = binary_open.result()
        result["binary"] = kinds.get("binary", {"accuracy": 0.0, "questions": 0})
        result["open"] = kinds.get("open", {"accuracy": 0.0, "questions": 0})
        result["by_structural_type"] = structural.result()
    if semantic.count:
        result["by_semantic_type"] = semantic.result()
    return result


def score_files(predictions_path: files.PathLike, questions_paths, annotations_path=None) -> dict:
    """GQA accuracy of an answers file against testdev_balanced_questions.json (no annotations file)."""
    questions_path = files.single_path(questions_paths, "gqa")
    if annotations_path is not None:
        raise files.BenchmarkInputError(f"{annotations_path}: GQA takes no annotations file: the answers are in "
                                        "the questions file")
    questions = read_gqa_questions(questions_path)
    answers = predictions.match_answers(predictions.read_predictions(predictions_path),
                                        {question.question_id for question in questions}, predictions_path,
                                        questions_path)
    return score_gqa(questions, answers)
