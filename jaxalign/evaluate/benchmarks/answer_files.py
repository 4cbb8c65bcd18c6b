"""The files an evaluation suite writes for one benchmark, in the formats of the benchmark's reference scripts, and
their scoring by the scorers of `jaxalign score` (`scoring.score_files`), on the files as written.

The answers file, `<out>/<benchmark>/answers.jsonl`, is what LLaVA's `model_vqa_loader.py` writes: one JSON line a
question answered, in question-file order, {question_id, prompt, text, answer_id, model_id, metadata}. A question
the model was not asked (a bad row: missing or unreadable image, a prompt longer than the model) has no line; the
scorers count it as unanswered, i.e. wrong. `answer_id` is a deterministic UUID of (model, benchmark, row), where
LLaVA draws a random one.

Result files besides the answers (`CONVERTERS`, named by `BenchmarkLayout.converted`):
  vqav2_submission  answers_upload.json, [{question_id, answer}] over every question of
                    llava_vqav2_mscoco_test2015.jsonl when the folder has it (else over the questions asked), the
                    answers through EvalAI's processor and '' where there is none (convert_vqav2_for_submission.py);
                    the file the EvalAI server scores test-dev from
  gqa_predictions   testdev_balanced_predictions.json, [{questionId, prediction}] with the prediction
                    `text.rstrip('.').lower()` (convert_gqa_for_eval.py); GQA's own eval.py reads it
  mmvet_results     results.json, {"v1_<question_id>": text} (convert_mmvet_for_eval.py), for the MM-Vet judge
  mmmu_output       output.json, {id: answer} with multiple-choice answers parsed to their letter as TinyLLaVA's
                    model_vqa_mmmu.py does (an unparsed one kept as written, where TinyLLaVA picks a random letter),
                    for MMMU's main_eval_only.py
  pope_splits       coco_pope_<split>_answers.jsonl, answers-file lines under the question ids of
                    coco/coco_pope_<split>.json: LLaVA's eval_pope.py pairs the i-th question of a category in
                    llava_pope_test.jsonl with the i-th line of that split's file; so does this, and checks that
                    both name the same image. These are the files POPE is scored from, one split at a time.

Public API:
  answer_lines(questions, answers, model_id, benchmark) -> {question index: answers-file line}
  write_outputs(located, questions, answers, out_folder, model_id) -> {file role: path}
  score_outputs(located, questions, written) -> {"status", "reason" | "scores", "scored_with"}
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, Mapping, Sequence

from jaxalign.evaluate.benchmarks import files, mmmu, normalize, pope, scoring, tally
from jaxalign.evaluate.benchmarks.eval_folder import (SPLIT, BenchmarkQuestion, LocatedBenchmark, Missing,
                                                      scorer_files)

ANSWERS = "answers"  # the role of the answers file in `write_outputs`' result
VQAV2_ALL_TEST_QUESTIONS = "llava_vqav2_mscoco_test2015.jsonl"


def answer_lines(questions: Sequence[BenchmarkQuestion], answers: Mapping[int, str], model_id: str,
                 benchmark: str) -> dict[int, dict[str, Any]]:
    """{question index: its answers-file line} of the answered questions (`answers`: question index -> text), in
    question order."""
    return {index: {"question_id": question.question_id, "prompt": question.prompt, "text": answers[index],
                    "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"jaxalign/{model_id}/{benchmark}/{index}").hex,
                    "model_id": model_id, "metadata": {}}
            for index, question in enumerate(questions) if index in answers}


def _write_json_lines(path: str, lines: Sequence[Mapping[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def _write_json(path: str, value: Any) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
    return path


# ------------------------------------------------------------------------------------------- converters
# Each: (located, questions, {question index: answers-file line}, output folder) -> {file role: path written}.
def _vqav2_submission(located, questions, lines, out_folder) -> dict[str, str]:
    results = {str(line["question_id"]): line["text"] for line in lines.values()}
    all_questions = os.path.join(located.folder, VQAV2_ALL_TEST_QUESTIONS)
    if os.path.isfile(all_questions):
        ids = [files.require_field(record, "question_id", all_questions, f"line {number}", "a VQAv2 test question")
               for number, record in files.read_json_records(all_questions, "LLaVA's VQAv2 test questions")]
    else:
        ids = [question.question_id for question in questions]
    submission = [{"question_id": question_id, "answer": normalize.evalai_answer(results[str(question_id)])
                   if str(question_id) in results else ""} for question_id in ids]
    return {"submission": _write_json(os.path.join(out_folder, "answers_upload.json"), submission)}


def _gqa_predictions(located, questions, lines, out_folder) -> dict[str, str]:
    predictions = [{"questionId": line["question_id"], "prediction": normalize.gqa_answer(line["text"])}
                   for line in lines.values()]
    return {"predictions": _write_json(os.path.join(out_folder, "testdev_balanced_predictions.json"), predictions)}


def _mmvet_results(located, questions, lines, out_folder) -> dict[str, str]:
    return {"results": _write_json(os.path.join(out_folder, "results.json"),
                                   {f"v1_{line['question_id']}": line["text"] for line in lines.values()})}


def _mmmu_answer(record: Any, text: str) -> str:
    if not isinstance(record, dict) or record.get("question_type") != "multiple-choice":
        return text
    index_to_answer = record.get("index2ans") or {}
    letters = record.get("all_choices") or sorted(index_to_answer)
    return mmmu.parse_multi_choice_response(text, letters, index_to_answer) or text


def _mmmu_output(located, questions, lines, out_folder) -> dict[str, str]:
    output = {str(line["question_id"]): _mmmu_answer(questions[index].record, line["text"])
              for index, line in lines.items()}
    return {"output": _write_json(os.path.join(out_folder, "output.json"), output)}


def _splits(questions: Sequence[BenchmarkQuestion], question_file: str) -> list[str]:
    missing = [number for number, question in enumerate(questions, start=1) if not question.category]
    if missing:
        raise files.BenchmarkInputError(f"{question_file}: question {missing[0]} has no 'category' (its POPE split: "
                                        "random, popular or adversarial)")
    return list(dict.fromkeys(question.category for question in questions))


def _pope_splits(located, questions, lines, out_folder) -> dict[str, str]:
    splits = _splits(questions, located.question_file)
    found = scorer_files(located, splits)
    if isinstance(found, Missing):
        return {}
    written = {}
    for split in splits:
        labels_path = found.questions.replace(SPLIT, split)
        if not os.path.isfile(labels_path):
            continue
        labels = files.read_json_records(labels_path, "POPE questions: JSON lines with question_id, image, label")
        members = [index for index, question in enumerate(questions) if question.category == split]
        if len(members) != len(labels):
            raise files.BenchmarkInputError(
                f"{located.question_file}: {len(members)} questions of category {split!r}, but {labels_path} has "
                f"{len(labels)}; eval_pope.py pairs them line by line, so they must be the same questions")
        split_lines = []
        for position, (index, (number, label)) in enumerate(zip(members, labels), start=1):
            image = os.path.basename(str(files.require_field(label, "image", labels_path, f"line {number}",
                                                             "a POPE question")))
            if image != os.path.basename(questions[index].image or ""):
                raise files.BenchmarkInputError(
                    f"{located.question_file}: question {index + 1} (the {position}th of {split!r}) asks about "
                    f"{questions[index].image!r}, but line {number} of {labels_path} about {image!r}; the two files "
                    "must list a split's questions in the same order (eval_pope.py pairs them by position)")
            if index in lines:
                split_lines.append({**lines[index], "question_id": files.require_field(
                    label, "question_id", labels_path, f"line {number}", "a POPE question")})
        written[f"{split} answers"] = _write_json_lines(
            os.path.join(out_folder, f"coco_pope_{split}_answers.jsonl"), split_lines)
    return written


CONVERTERS: dict[str, Callable[..., dict[str, str]]] = {
    "vqav2_submission": _vqav2_submission, "gqa_predictions": _gqa_predictions, "mmvet_results": _mmvet_results,
    "mmmu_output": _mmmu_output, "pope_splits": _pope_splits}


def write_outputs(located: LocatedBenchmark, questions: Sequence[BenchmarkQuestion], answers: Mapping[int, str],
                  out_folder: files.PathLike, model_id: str) -> dict[str, str]:
    """Writes the answers file and the benchmark's result files into `out_folder` (made if needed).

    Args:
      located: the benchmark in the evaluation folder.
      questions: its questions (`eval_folder.read_questions`).
      answers: question index -> the model's answer, for the questions that were asked.
      out_folder: where to write (one folder a benchmark).
      model_id: the answers file's `model_id`.
    Returns:
      {file role: path}: "answers", and the converter's ("submission", "<split> answers", ...).
    Raises:
      BenchmarkInputError: a file a converter reads cannot be used (e.g. POPE files that do not line up).
    """
    out_folder = os.fspath(out_folder)
    os.makedirs(out_folder, exist_ok=True)
    lines = answer_lines(questions, answers, model_id, located.layout.name)
    written = {ANSWERS: _write_json_lines(os.path.join(out_folder, "answers.jsonl"), list(lines.values()))}
    if located.layout.converted:
        written.update(CONVERTERS[located.layout.converted](located, questions, lines, out_folder))
    return written


# ------------------------------------------------------------------------------------------- scoring
def _score_splits(located: LocatedBenchmark, splits: Sequence[str], found, written: Mapping[str, str]) -> dict:
    """POPE: each split's answers against its own question file; the headline metrics are the means over the
    splits scored (pope.score_pope's rule for several splits)."""
    per_split, scored_with, unscored = {}, {}, {}
    for split in splits:
        labels_path = found.questions.replace(SPLIT, split)
        if f"{split} answers" not in written:
            unscored[split] = f"no {labels_path}"
            continue
        predictions = written[f"{split} answers"]
        per_split[split] = scoring.score_files(located.layout.scorer, predictions, [labels_path])
        scored_with[split] = {"predictions": predictions, "questions": [labels_path], "annotations": None}
    scores = {name: tally.fraction(sum(result[name] for result in per_split.values()), len(per_split))
              for name in pope.METRICS}
    scores.update(questions=sum(result["questions"] for result in per_split.values()),
                  missing_answers=sum(result["missing_answers"] for result in per_split.values()), splits=per_split)
    result = {"status": "scored", "scores": scores, "scored_with": scored_with}
    if unscored:
        result["unscored_splits"] = unscored
    return result


def score_outputs(located: LocatedBenchmark, questions: Sequence[BenchmarkQuestion],
                  written: Mapping[str, str]) -> dict[str, Any]:
    """Scores the written files as `jaxalign score` would.

    Returns {"status": "scored", "scores": the scorer's dict, "scored_with": {predictions, questions, annotations}}
    (POPE: per split, see `_score_splits`), or {"status": "answers only", "reason": ...} when the benchmark is not
    scored here or a file its scorer needs is missing.
    Raises BenchmarkInputError where the scorer finds the files unusable.
    """
    layout = located.layout
    template_paths = [choice.questions for choice in layout.scorer_files]
    splits = _splits(questions, located.question_file) if any(SPLIT in path for path in template_paths) else []
    found = scorer_files(located, splits)
    if isinstance(found, Missing):
        return {"status": "answers only", "reason": found.reason}
    if SPLIT in found.questions:
        return _score_splits(located, splits, found, written)
    scores = scoring.score_files(layout.scorer, written[ANSWERS], [found.questions], found.annotations)
    return {"status": "scored", "scores": scores,
            "scored_with": {"predictions": written[ANSWERS], "questions": [found.questions],
                            "annotations": found.annotations}}
