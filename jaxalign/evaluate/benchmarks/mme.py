"""MME: yes/no questions, two an image, scored per task as accuracy + accuracy+ and summed into perception and
cognition scores.

Rules followed (reference file: MME's evaluation tool `eval_tool/calculation.py`, in `tools/eval_tool.zip` of
BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation; run by LLaVA's `scripts/v1_5/eval/mme.sh`):
  * an answer is lower-cased; "yes" or "no" is itself; otherwise its first four characters decide: "yes" in them
    means yes, else "no" in them means no, else it is "other" (wrong whatever the label). A missing answer is
    wrong too;
  * per task: accuracy = right answers / questions; accuracy+ = images whose questions are all right / images;
    task score = 100 * accuracy + 100 * accuracy+ (at most 200);
  * perception = the sum of the task scores of existence, count, position, color, posters, celebrity, scene,
    landmark, artwork and OCR (at most 2000); cognition = the sum over commonsense_reasoning,
    numerical_calculation, text_translation and code_reasoning (at most 800). Tasks absent from the questions add
    nothing and are listed under `tasks_missing`.
  * calculation.py pairs the lines of a task file two by two; here the questions of an image are grouped by image
    name, which is the same for the released files (each image's two questions are adjacent).

Question files (any of):
  * the released `MME_Benchmark_release_version` folder: one folder per task, holding `<image>.txt` files of
    "question<TAB>answer" lines, directly or under `questions_answers_YN/`;
  * the evaluation tool's task files `<task>.txt` of "image<TAB>question<TAB>answer" lines (a fourth column, a
    model's response, is ignored), or a folder of them;
  * JSON lines with question_id, category, text (or question) and answer; LLaVA's `llava_mme.jsonl` has no answer,
    which is then looked up in `--annotations` (the release folder or task files), as LLaVA's
    `convert_answer_to_mme.py` does.
Predictions are matched as LLaVA's convert_answer_to_mme.py matches them: the question_id "<task>/<image>" names
the image and the `prompt` (without "Answer the question using a single word or phrase." / "Please answer yes or
no.") tells its two questions apart; a question_id that names one question on its own needs no prompt.

Public API:
  PERCEPTION_TASKS ; COGNITION_TASKS ; MmeQuestion ; question_key(text) ; parse_answer(text)
  score_mme(questions, answers) -> dict ; read_mme_questions(paths, annotations_path=None) ; score_files(...)
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from typing import Callable, Mapping, Sequence

from jaxalign.evaluate.benchmarks import files, predictions, tally

PERCEPTION_TASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                    "artwork", "OCR")
COGNITION_TASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
TASKS = PERCEPTION_TASKS + COGNITION_TASKS
_PROMPT_PHRASES = ("<image>", "Answer the question using a single word or phrase.", "Please answer yes or no.")


@dataclasses.dataclass(frozen=True)
class MmeQuestion:
    task: str
    image: str  # the image's file name without extension: an image's questions share it
    question: str  # `question_key` of the question text
    answer: str  # "yes" or "no"
    question_id: str | None = None  # an id of its own, when a JSON-lines questions file gave one

    @property
    def uid(self) -> str:
        return f"{self.task}/{self.image}\t{self.question}"


def question_key(text: str) -> str:
    """A question without the prompt's instructions and with single spaces, to match prompts to questions."""
    for phrase in _PROMPT_PHRASES:
        text = text.replace(phrase, " ")
    return " ".join(text.split())


def parse_answer(text: str) -> str:
    """MME's reading of an answer: "yes", "no" or "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def score_mme(questions: Sequence[MmeQuestion], answers: Mapping[str, str]) -> dict:
    """{"accuracy" (all questions, in [0, 1]), "perception", "cognition", "questions", "missing_answers",
    "tasks": {task: {"accuracy", "accuracy_plus", "score", "questions", "images", "other_answers"}},
    "tasks_missing"}."""
    right = collections.Counter()
    asked = collections.Counter()
    other = collections.Counter()
    image_all_right: dict[tuple[str, str], bool] = {}
    missing = 0
    for question in questions:
        text = answers.get(question.uid)
        if predictions.is_answered(text):
            parsed = parse_answer(text)
            other[question.task] += parsed == "other"
        else:
            missing += 1
            parsed = "missing"
        correct = parsed == question.answer
        right[question.task] += correct
        asked[question.task] += 1
        image = (question.task, question.image)
        image_all_right[image] = image_all_right.get(image, True) and correct
    images, images_right = collections.Counter(), collections.Counter()
    for (task, _), all_right in image_all_right.items():
        images[task] += 1
        images_right[task] += all_right
    tasks = {}
    for task in [task for task in TASKS if asked[task]]:
        accuracy = tally.fraction(right[task], asked[task])
        accuracy_plus = tally.fraction(images_right[task], images[task])
        tasks[task] = {"accuracy": accuracy, "accuracy_plus": accuracy_plus,
                       "score": 100 * accuracy + 100 * accuracy_plus, "questions": asked[task],
                       "images": images[task], "other_answers": other[task]}
    return {"accuracy": tally.fraction(sum(right.values()), len(questions)),
            "perception": sum(tasks[task]["score"] for task in PERCEPTION_TASKS if task in tasks),
            "cognition": sum(tasks[task]["score"] for task in COGNITION_TASKS if task in tasks),
            "questions": len(questions), "missing_answers": missing, "tasks": tasks,
            "tasks_missing": [task for task in TASKS if task not in tasks]}


def _task(name: str, path: str) -> str:
    if name not in TASKS:
        raise files.BenchmarkInputError(f"{path}: {name!r} is not an MME task; the tasks are {', '.join(TASKS)}")
    return name


def _answer(text: str, path: str, where: str) -> str:
    answer = text.strip().lower()
    if answer not in ("yes", "no"):
        raise files.BenchmarkInputError(f"{path}: {where}: the answer must be Yes or No, got {text!r}")
    return answer


def _read_task_file(path: str, task: str) -> list[MmeQuestion]:
    out = []
    for number, line in files.read_text_lines(path, "an MME task file: image<TAB>question<TAB>answer lines"):
        fields = line.split("\t")
        if len(fields) < 3:
            raise files.BenchmarkInputError(f"{path}: line {number}: expected image<TAB>question<TAB>answer")
        out.append(MmeQuestion(task, pathlib.Path(fields[0]).stem, question_key(fields[1]),
                               _answer(fields[2], path, f"line {number}")))
    return out


def _read_release_folder(root: pathlib.Path) -> list[MmeQuestion]:
    out = []
    for task in TASKS:
        folder = root / task
        if not folder.is_dir():
            continue
        qa_folder = folder / "questions_answers_YN" if (folder / "images").is_dir() else folder
        for path in sorted(qa_folder.glob("*.txt")):
            for number, line in files.read_text_lines(path, "an MME question file: question<TAB>answer lines"):
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise files.BenchmarkInputError(f"{path}: line {number}: expected question<TAB>answer")
                out.append(MmeQuestion(task, path.stem, question_key(fields[0]),
                                       _answer(fields[1], str(path), f"line {number}")))
    return out


def _read_ground_truth(path: str) -> list[MmeQuestion]:
    folder = pathlib.Path(path)
    if not folder.exists():
        raise files.BenchmarkInputError(f"{path}: no such file or folder (expected MME questions)")
    if folder.is_dir():
        if any((folder / task).is_dir() for task in TASKS):
            return _read_release_folder(folder)
        task_files = [folder / f"{task}.txt" for task in TASKS if (folder / f"{task}.txt").is_file()]
        if not task_files:
            raise files.BenchmarkInputError(f"{path}: neither MME_Benchmark_release_version (task folders) nor a "
                                            "folder of evaluation-tool task files (<task>.txt)")
        return [question for task_file in task_files for question in _read_task_file(str(task_file), task_file.stem)]
    if folder.suffix == ".txt":
        return _read_task_file(path, _task(folder.stem, path))
    raise files.BenchmarkInputError(f"{path}: expected an MME folder or task file (.txt)")


def _read_json_lines(path: str, ground_truth: Mapping[str, MmeQuestion] | None, truth_label: str | None):
    out = []
    for number, record in files.read_json_records(path, "MME questions: JSON lines with question_id and category"):
        where = f"line {number}"
        question_id = str(files.require_field(record, "question_id", path, where, "an MME question"))
        task = _task(str(files.require_field(record, "category", path, where, "an MME question")), path)
        image = pathlib.Path(str(record.get("image") or question_id)).stem
        text = record.get("text", record.get("question"))
        if text is None:
            raise files.BenchmarkInputError(f"{path}: {where}: no 'text' or 'question' field (an MME question)")
        question = MmeQuestion(task, image, question_key(str(text)), "", question_id)
        if record.get("answer") is not None:
            out.append(dataclasses.replace(question, answer=_answer(str(record["answer"]), path, where)))
        elif ground_truth is None:
            raise files.BenchmarkInputError(f"{path}: {where}: no answer; pass the MME_Benchmark_release_version "
                                            "folder (or the task files) with --annotations")
        elif question.uid not in ground_truth:
            raise files.BenchmarkInputError(f"{path}: {where}: question not found in {truth_label}")
        else:
            out.append(dataclasses.replace(question, answer=ground_truth[question.uid].answer))
    return out


def read_mme_questions(paths: Sequence[files.PathLike], annotations_path: files.PathLike | None = None):
    """The questions of MME folders, task files or JSON lines (answers from `annotations_path` where absent)."""
    ground_truth, truth_label = None, None if annotations_path is None else os.fspath(annotations_path)
    if annotations_path is not None:
        ground_truth = {question.uid: question for question in _read_ground_truth(os.fspath(annotations_path))}
    out = []
    for path in map(os.fspath, paths):
        if path.endswith((".json", ".jsonl")):
            out += _read_json_lines(path, ground_truth, truth_label)
        else:
            out += _read_ground_truth(path)
    return out


def _resolver(questions: Sequence[MmeQuestion], predictions_path) -> Callable[[predictions.Prediction], str | None]:
    by_id, by_image = collections.defaultdict(list), collections.defaultdict(list)
    for question in questions:
        if question.question_id is not None:
            by_id[question.question_id].append(question)
        by_image[(question.task, question.image)].append(question)

    def resolve(prediction: predictions.Prediction) -> str | None:
        candidates = by_id.get(prediction.question_id)
        if not candidates:
            task, _, image = prediction.question_id.partition("/")
            candidates = by_image.get((task, pathlib.Path(image).stem))
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0].uid
        where = f"{os.fspath(predictions_path)}: line {prediction.line}"
        if prediction.prompt is None:
            raise files.BenchmarkInputError(f"{where}: question_id {prediction.question_id!r} names "
                                            f"{len(candidates)} questions; a 'prompt' field must tell which")
        key = question_key(prediction.prompt)
        match = [question for question in candidates if question.question == key]
        if not match:
            raise files.BenchmarkInputError(f"{where}: the prompt matches none of the questions of "
                                            f"{prediction.question_id!r}")
        return match[0].uid

    return resolve


def score_files(predictions_path: files.PathLike, questions_paths, annotations_path=None) -> dict:
    """MME scores of an answers file against MME's question folders / files."""
    paths = [questions_paths] if isinstance(questions_paths, (str, os.PathLike)) else list(questions_paths)
    questions = read_mme_questions(paths, annotations_path)
    if not questions:
        raise files.BenchmarkInputError(f"{', '.join(map(os.fspath, paths))}: no MME questions found")
    answers = predictions.match_answers(predictions.read_predictions(predictions_path),
                                        {question.uid for question in questions}, predictions_path,
                                        ", ".join(map(os.fspath, paths)), _resolver(questions, predictions_path))
    return score_mme(questions, answers)
