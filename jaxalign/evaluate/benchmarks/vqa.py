"""VQAv2 and TextVQA: the official soft accuracy over ten annotators' answers.

Rules followed (reference files):
  * Soft accuracy, GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (`evaluate`) and
    haotian-liu/LLaVA `llava/eval/m4c_evaluator.py` (`TextVQAAccuracyEvaluator._compute_answer_scores`): for each
    of the n annotators, leave that annotator out and score min(1, matches / 3), where matches counts the other
    annotators whose answer equals the prediction; the question's score is the mean over the n subsets. With m of
    the n answers equal to the prediction that mean is (m * min(1, (m-1)/3) + (n-m) * min(1, m/3)) / n, which is
    how it is computed here. The benchmark score is the mean over questions.
  * VQAv2 normalisation: the prediction goes through EvalAI's processor first (LLaVA's
    `scripts/convert_vqav2_for_submission.py`), then vqaEval.py: newlines / tabs to spaces and strip on both sides;
    and only when the annotators do not all agree, vqaEval's punctuation and digit/article processing of every
    annotator answer and of the prediction (a quirk of the reference, kept). Per answer type and per question type
    means as vqaEval reports them.
  * TextVQA normalisation: EvalAI's processor on the prediction and on every annotator answer
    (`TextVQAAccuracyEvaluator.eval_pred_list`); LLaVA's `llava/eval/eval_textvqa.py` matches a prediction whose
    question_id is an image id by (image id, question read from its prompt), which is supported too.

Question files: the official VQA layout, `--questions {"questions": [{question_id, image_id, question}]}` plus
`--annotations {"annotations": [{question_id, answers: [{answer}] x10, answer_type, question_type}]}`, for VQAv2
and for TextVQA; or TextVQA's own `TextVQA_0.5.1_val.json` (`{"data": [{question_id, image_id, question,
answers: [str] x10}]}`), which holds its answers (no annotations file).

Public API:
  VqaQuestion ; leave_one_out_accuracy(prediction, references) -> float
  vqav2_question_score(text, answers) -> float ; textvqa_question_score(text, answers) -> float
  score_vqa(questions, answers, question_score) -> dict
  read_vqa_questions(questions_path, annotations_path) -> [VqaQuestion]
  score_vqav2_files(...) ; score_textvqa_files(...)
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Mapping, Sequence

from jaxalign.evaluate.benchmarks import files, normalize, predictions, tally


@dataclasses.dataclass(frozen=True)
class VqaQuestion:
    """One question with its annotators' raw answers (ten in VQAv2 and TextVQA) and, where known, its types."""
    question_id: str
    answers: tuple[str, ...]
    answer_type: str | None = None
    question_type: str | None = None
    image_id: str | None = None
    question: str | None = None


def leave_one_out_accuracy(prediction: str, references: Sequence[str]) -> float:
    """The mean over leave-one-annotator-out subsets of min(1, matches / 3); inputs already normalised."""
    total = len(references)
    if total == 0:
        return 0.0
    equal = sum(reference == prediction for reference in references)
    # `equal` subsets leave out a matching annotator (equal - 1 matches remain), the others keep all `equal`.
    return (equal * min(1.0, (equal - 1) / 3) + (total - equal) * min(1.0, equal / 3)) / total


def _spaces(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqav2_question_score(text: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy of one raw model answer against the raw annotator answers."""
    if not predictions.is_answered(text):
        return 0.0
    prediction = _spaces(normalize.evalai_answer(text))
    references = [_spaces(answer) for answer in answers]
    if len(set(references)) > 1:
        references = [normalize.vqa_eval_answer(reference) for reference in references]
        prediction = normalize.vqa_eval_answer(prediction)
    return leave_one_out_accuracy(prediction, references)


def textvqa_question_score(text: str, answers: Sequence[str]) -> float:
    """TextVQA soft accuracy (LLaVA's m4c evaluator) of one raw model answer against the raw annotator answers."""
    if not predictions.is_answered(text):
        return 0.0
    return leave_one_out_accuracy(normalize.evalai_answer(text), [normalize.evalai_answer(a) for a in answers])


def score_vqa(questions: Sequence[VqaQuestion], answers: Mapping[str, str],
              question_score: Callable[[str, Sequence[str]], float]) -> dict:
    """{"accuracy", "questions", "missing_answers", "by_answer_type", "by_question_type"}; a question absent from
    `answers` (or answered with blank text) scores 0."""
    overall, by_answer_type, by_question_type = tally.GroupTally(), tally.GroupTally(), tally.GroupTally()
    missing = 0
    for question in questions:
        text = answers.get(question.question_id)
        missing += not predictions.is_answered(text)
        score = question_score(text or "", question.answers)
        overall.add("all", score)
        if question.answer_type is not None:
            by_answer_type.add(question.answer_type, score)
        if question.question_type is not None:
            by_question_type.add(question.question_type, score)
    result = {"accuracy": overall.result().get("all", {"accuracy": 0.0})["accuracy"], "questions": len(questions),
              "missing_answers": missing}
    if by_answer_type.count:
        result["by_answer_type"] = by_answer_type.result()
    if by_question_type.count:
        result["by_question_type"] = by_question_type.result()
    return result


def _answer_texts(raw_answers, path, where) -> tuple[str, ...]:
    if not isinstance(raw_answers, list) or not raw_answers:
        raise files.BenchmarkInputError(f"{path}: {where}: 'answers' must be a non-empty list of annotator answers")
    texts = []
    for answer in raw_answers:
        if isinstance(answer, dict):
            answer = files.require_field(answer, "answer", path, where, "an annotator answer {'answer': ...}")
        texts.append(str(answer))
    return tuple(texts)


def _read_annotations(path: str, records) -> dict[str, VqaQuestion]:
    questions = {}
    for number, record in enumerate(records, start=1):
        where = f"annotation {number}"
        question_id = str(files.require_field(record, "question_id", path, where, "a VQA annotation"))
        answers = _answer_texts(files.require_field(record, "answers", path, where, "a VQA annotation"), path, where)
        questions[question_id] = VqaQuestion(question_id, answers, record.get("answer_type"),
                                             record.get("question_type"))
    return questions


def read_vqa_questions(questions_path: files.PathLike, annotations_path: files.PathLike | None) -> list[VqaQuestion]:
    """The scored questions of a VQA-layout questions + annotations pair, or of a TextVQA `data` file."""
    questions_path = os.fspath(questions_path)
    document = files.read_json(questions_path, "VQA questions JSON")
    if isinstance(document, dict) and "data" in document:
        if annotations_path is not None:
            raise files.BenchmarkInputError(f"{os.fspath(annotations_path)}: not used: {questions_path} (TextVQA's "
                                            "'data' layout) holds its answers; drop --annotations")
        out = []
        for number, record in enumerate(document["data"], start=1):
            where = f"data record {number}"
            question_id = str(files.require_field(record, "question_id", questions_path, where, "a TextVQA question"))
            answers = _answer_texts(files.require_field(record, "answers", questions_path, where,
                                                        "a TextVQA question"), questions_path, where)
            image_id = record.get("image_id")
            out.append(VqaQuestion(question_id, answers, record.get("answer_type"), record.get("question_type"),
                                   None if image_id is None else str(image_id), record.get("question")))
        return out
    if isinstance(document, dict) and "annotations" in document and annotations_path is None:
        return list(_read_annotations(questions_path, document["annotations"]).values())
    if not isinstance(document, dict) or "questions" not in document:
        raise files.BenchmarkInputError(
            f"{questions_path}: not a VQA questions file: expected {{\"questions\": [...]}} (with --annotations), "
            "{\"annotations\": [...]} or TextVQA's {\"data\": [...]}; LLaVA's .jsonl question files hold no answers")
    if annotations_path is None:
        raise files.BenchmarkInputError(f"{questions_path}: the questions hold no answers; pass the matching "
                                        "annotations JSON with --annotations")
    annotations_path = os.fspath(annotations_path)
    annotation_document = files.read_json(annotations_path, "VQA annotations JSON")
    if not isinstance(annotation_document, dict) or "annotations" not in annotation_document:
        raise files.BenchmarkInputError(f"{annotations_path}: not a VQA annotations file: expected "
                                        "{\"annotations\": [{\"question_id\", \"answers\", ...}]}")
    annotations = _read_annotations(annotations_path, annotation_document["annotations"])
    out = []
    for number, record in enumerate(document["questions"], start=1):
        question_id = str(files.require_field(record, "question_id", questions_path, f"question {number}",
                                              "a VQA question"))
        if question_id not in annotations:
            raise files.BenchmarkInputError(f"{annotations_path}: no annotation for question_id {question_id} of "
                                            f"{questions_path}; are they the same split?")
        image_id = record.get("image_id")
        out.append(dataclasses.replace(annotations[question_id], image_id=None if image_id is None else str(image_id),
                                       question=record.get("question")))
    return out


def textvqa_prompt_question(prompt: str) -> str | None:
    """The question inside one of LLaVA's TextVQA prompts, lower-cased, as `eval_textvqa.prompt_processor` reads
    it; None for a prompt of another shape."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def _textvqa_resolver(questions: Sequence[VqaQuestion]) -> Callable[[predictions.Prediction], str | None]:
    ids = {question.question_id for question in questions}
    by_image_and_text = {(question.image_id, (question.question or "").lower()): question.question_id
                         for question in questions if question.image_id is not None}

    def resolve(prediction: predictions.Prediction) -> str | None:
        if prediction.question_id in ids:
            return prediction.question_id
        if prediction.prompt is None:
            return None
        return by_image_and_text.get((prediction.question_id, textvqa_prompt_question(prediction.prompt)))

    return resolve


def _score_files(predictions_path, questions_paths, annotations_path, benchmark: str, question_score,
                 resolver=None) -> dict:
    questions_path = files.single_path(questions_paths, benchmark)
    questions = read_vqa_questions(questions_path, annotations_path)
    label = questions_path + (f" + {os.fspath(annotations_path)}" if annotations_path else "")
    answers = predictions.match_answers(predictions.read_predictions(predictions_path),
                                        {question.question_id for question in questions}, predictions_path, label,
                                        resolver(questions) if resolver else None)
    return score_vqa(questions, answers, question_score)


def score_vqav2_files(predictions_path: files.PathLike, questions_paths, annotations_path=None) -> dict:
    """VQAv2 soft accuracy of an answers file against the official questions + annotations JSON."""
    return _score_files(predictions_path, questions_paths, annotations_path, "vqav2", vqav2_question_score)


def score_textvqa_files(predictions_path: files.PathLike, questions_paths, annotations_path=None) -> dict:
    """TextVQA soft accuracy of an answers file against TextVQA_0.5.1_val.json (or the VQA layout)."""
    return _score_files(predictions_path, questions_paths, annotations_path, "textvqa", textvqa_question_score,
                        _textvqa_resolver)
