"""LLaVA's evaluation folder as data: where each benchmark keeps its questions, images and scoring files, and how
its questions are prompted.

The folder is the one LLaVA's `scripts/v1_5/eval/*.sh` read as `./playground/data/eval` and TinyLLaVA Factory's
`scripts/eval/*.sh` as `$EVAL_DIR` (LLaVA's `eval.zip` plus each benchmark's public files):

    DIR/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl + test2015/      (llava_vqav2_mscoco_test2015.jsonl: submission)
    DIR/gqa/llava_gqa_testdev_balanced.jsonl + data/images/ (TinyLLaVA: images/), data/testdev_balanced_questions.json
    DIR/textvqa/llava_textvqa_val_v051_ocr.jsonl + train_images/, TextVQA_0.5.1_val.json
    DIR/scienceqa/llava_test_CQM-A.json + images/test/, problems.json + pid_splits.json
    DIR/pope/llava_pope_test.jsonl + val2014/, coco/coco_pope_{random,popular,adversarial}.json
    DIR/MME/llava_mme.jsonl + MME_Benchmark_release_version/
    DIR/mm-vet/llava-mm-vet.jsonl + images/
    DIR/MMMU/anns_for_eval.json + all_images/, eval/answer_dict_val.json              (TinyLLaVA's MMMU.zip)

`LAYOUTS` holds that knowledge, one `BenchmarkLayout` a benchmark; nothing else in jaxalign names these files.
How a question becomes a prompt follows the script that asks it:
  * `model_vqa_loader.py` (VQAv2, GQA, TextVQA, POPE, MME) and `model_vqa.py` (MM-Vet): the question file's `text`
    after an `<image>` line; LLaVA's files already end with the benchmark's instruction ("Answer the question using
    a single word or phrase."), which is appended here only to a question that lacks it (a file of another origin);
  * `model_vqa_science.py --single-pred-prompt` (ScienceQA): the human turn without `<image>`, then "Answer with the
    option's letter from the given choices directly."; questions without an image are asked as text;
  * TinyLLaVA's `model_vqa_mmmu.py` (MMMU): the record's `prompt`, which holds its options and instruction; records
    without an image are asked as text (TinyLLaVA answers those at random: see `jaxalign.evaluate.benchmarks.mmmu`).
A literal `<image>` inside a question is removed (the image goes where the run's chat template puts it).

Public API:
  SHORT_ANSWER, OPTION_LETTER ; ScorerFiles ; BenchmarkLayout ; LAYOUTS: {name: BenchmarkLayout}
  BenchmarkQuestion(question_id, image, text, prompt, category, record)
  LocatedBenchmark(layout, folder, question_file, image_folder) ; Missing(reason)
  select(names) -> [BenchmarkLayout] ; locate(layout, data_dir) -> LocatedBenchmark | Missing
  read_questions(located) -> [BenchmarkQuestion]
  scorer_files(located, splits=()) -> ScorerFiles (absolute paths) | Missing
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from jaxalign.evaluate.benchmarks import files

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
IMAGE_MARKER = "<image>"
SPLIT = "{split}"  # in a scorer path: one file per split (POPE), named by the questions' category


@dataclasses.dataclass(frozen=True)
class ScorerFiles:
    """The files `jaxalign score` reads besides the answers, relative to the benchmark's folder: `questions` (may
    hold `{split}`: one file per split of the questions' `category`) and `annotations` (None: none)."""
    questions: str
    annotations: str | None = None


@dataclasses.dataclass(frozen=True)
class BenchmarkLayout:
    """One benchmark of the evaluation folder.

    Attributes:
      name: the benchmark's name here (`jaxalign score`'s, and `mmvet`).
      folders: its folder under DIR, alternatives in order (LLaVA's name first).
      question_files / image_folders: relative to the folder, alternatives in order.
      question_format: how the question file reads (a key of `_READERS`).
      prompt_suffix: the instruction that ends every prompt ("" for none).
      scorer: the `jaxalign score` benchmark that scores it; None: not scored here (`unscored_reason` says why).
      scorer_files: alternatives, in order of preference; the first whose files all exist is used.
      converted: the benchmark's own result file besides the answers (a key of
        `jaxalign.evaluate.benchmarks.answer_files.CONVERTERS`), or None.
      unscored_reason: shown when it cannot be scored (no scorer, or none of `scorer_files` exists).
    """
    name: str
    folders: tuple[str, ...]
    question_files: tuple[str, ...]
    image_folders: tuple[str, ...]
    question_format: str
    prompt_suffix: str
    scorer: str | None
    scorer_files: tuple[ScorerFiles, ...]
    converted: str | None = None
    unscored_reason: str = ""


LAYOUTS: dict[str, BenchmarkLayout] = {layout.name: layout for layout in (
    BenchmarkLayout(
        "vqav2", ("vqav2",), ("llava_vqav2_mscoco_test-dev2015.jsonl",), ("test2015",), "llava_jsonl", SHORT_ANSWER,
        "vqav2", (ScorerFiles("v2_OpenEnded_mscoco_test-dev2015_questions.json",
                              "v2_mscoco_test-dev2015_annotations.json"),),
        converted="vqav2_submission",
        unscored_reason="test-dev answers are not public: submit the submission file to the EvalAI VQAv2 server"),
    BenchmarkLayout(
        "gqa", ("gqa",), ("llava_gqa_testdev_balanced.jsonl",), ("data/images", "images"), "llava_jsonl",
        SHORT_ANSWER, "gqa", (ScorerFiles("data/testdev_balanced_questions.json"),
                              ScorerFiles("testdev_balanced_questions.json")),
        converted="gqa_predictions"),
    BenchmarkLayout(
        "textvqa", ("textvqa",), ("llava_textvqa_val_v051_ocr.jsonl",), ("train_images",), "llava_jsonl",
        SHORT_ANSWER, "textvqa", (ScorerFiles("TextVQA_0.5.1_val.json"),)),
    BenchmarkLayout(
        "scienceqa", ("scienceqa",), ("llava_test_CQM-A.json",), ("images/test",), "scienceqa_json", OPTION_LETTER,
        "scienceqa", (ScorerFiles("problems.json", "pid_splits.json"), ScorerFiles("llava_test_CQM-A.json"))),
    BenchmarkLayout(
        "pope", ("pope",), ("llava_pope_test.jsonl",), ("val2014",), "llava_jsonl", SHORT_ANSWER,
        "pope", (ScorerFiles(f"coco/coco_pope_{SPLIT}.json"),), converted="pope_splits"),
    BenchmarkLayout(
        "mme", ("MME", "mme"), ("llava_mme.jsonl",), ("MME_Benchmark_release_version",), "llava_jsonl", SHORT_ANSWER,
        "mme", (ScorerFiles("llava_mme.jsonl", "MME_Benchmark_release_version"),)),
    BenchmarkLayout(
        "mmvet", ("mm-vet", "mmvet"), ("llava-mm-vet.jsonl",), ("images",), "llava_jsonl", "", None, (),
        converted="mmvet_results",
        unscored_reason="MM-Vet is scored by an LLM judge: submit the results file to the MM-Vet evaluator"),
    BenchmarkLayout(
        "mmmu", ("MMMU", "mmmu"), ("anns_for_eval.json",), ("all_images",), "mmmu_json", "", "mmmu",
        (ScorerFiles("anns_for_eval.json", "eval/answer_dict_val.json"),), converted="mmmu_output"),
)}


@dataclasses.dataclass(frozen=True)
class BenchmarkQuestion:
    """One question as the model is asked it.

    Attributes:
      question_id: as the question file writes it (int or str; written back unchanged).
      image: the image's path relative to the image folder; None for a text-only question.
      text: the question as the model reads it, instruction included, without `<image>`.
      prompt: what LLaVA's answers file records as `prompt` for it.
      category: the question's `category` (POPE's split, MME's task), if any.
      record: the question file's record, for the result files that need more of it (MMMU's choices).
    """
    question_id: Any
    image: str | None
    text: str
    prompt: str
    category: str | None = None
    record: Any = None


@dataclasses.dataclass(frozen=True)
class LocatedBenchmark:
    """A benchmark found in DIR: its layout, folder, question file and image folder (absolute paths)."""
    layout: BenchmarkLayout
    folder: str
    question_file: str
    image_folder: str


@dataclasses.dataclass(frozen=True)
class Missing:
    """Why a benchmark (or its scoring) cannot go on: a needed file or folder is not there."""
    reason: str


def select(names: Sequence[str] | None = None) -> list[BenchmarkLayout]:
    """The layouts of `names` (all of them, in table order, for None); an unknown name is a BenchmarkInputError."""
    if not names:
        return list(LAYOUTS.values())
    unknown = [name for name in names if name not in LAYOUTS]
    if unknown:
        raise files.BenchmarkInputError(f"unknown benchmark {', '.join(map(repr, unknown))}; choose from "
                                        f"{', '.join(LAYOUTS)}")
    return [LAYOUTS[name] for name in dict.fromkeys(names)]


def _first(folder: str, candidates: Sequence[str], exists: Callable[[str], bool]) -> str | None:
    return next((os.path.join(folder, name) for name in candidates if exists(os.path.join(folder, name))), None)


def _alternatives(folder: str, candidates: Sequence[str]) -> str:
    return " or ".join(os.path.join(folder, name) for name in candidates)


def locate(layout: BenchmarkLayout, data_dir: files.PathLike) -> LocatedBenchmark | Missing:
    """Where `layout`'s benchmark lies in `data_dir`, or what is missing (the folder, question file or images)."""
    data_dir = os.fspath(data_dir)
    folder = _first(data_dir, layout.folders, os.path.isdir)
    if folder is None:
        return Missing(f"no folder {_alternatives(data_dir, layout.folders)}")
    question_file = _first(folder, layout.question_files, os.path.isfile)
    if question_file is None:
        return Missing(f"no question file {_alternatives(folder, layout.question_files)}")
    image_folder = _first(folder, layout.image_folders, os.path.isdir)
    if image_folder is None:
        return Missing(f"no image folder {_alternatives(folder, layout.image_folders)}")
    return LocatedBenchmark(layout, folder, question_file, image_folder)


# ------------------------------------------------------------------------------------------- questions
def _with_suffix(text: str, suffix: str) -> str:
    text = text.replace(IMAGE_MARKER, "").strip()
    if not suffix or text.endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def _image(record: dict, path: str, where: str) -> str | None:
    image = record.get("image")
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise files.BenchmarkInputError(f"{path}: {where}: 'image' must be one file name, got {image!r}")
    return image


def _llava_jsonl(path: str, layout: BenchmarkLayout) -> list[BenchmarkQuestion]:
    """model_vqa_loader.py / model_vqa.py: {question_id, image, text, category?} a line; prompt = the text."""
    out = []
    for number, record in files.read_json_records(path, "LLaVA questions: JSON lines with question_id, image, text"):
        where = f"line {number}"
        question_id = files.require_field(record, "question_id", path, where, "a LLaVA question")
        text = _with_suffix(str(files.require_field(record, "text", path, where, "a LLaVA question")),
                            layout.prompt_suffix)
        category = record.get("category")
        out.append(BenchmarkQuestion(question_id, _image(record, path, where), text, text,
                                     None if category is None else str(category), record))
    return out


def _scienceqa_json(path: str, layout: BenchmarkLayout) -> list[BenchmarkQuestion]:
    """model_vqa_science.py: the human turn without <image>, then the option-letter instruction; its prompt starts
    with "<image>\\n" when the question has an image (eval_science_qa.py tells ScienceQA-IMG questions so)."""
    document = files.read_json(path, "LLaVA's ScienceQA questions: a list of {id, image?, conversations}")
    if not isinstance(document, list):
        raise files.BenchmarkInputError(f"{path}: expected a JSON list of {{id, image?, conversations}} "
                                        "(llava_test_CQM-A.json)")
    out = []
    for number, record in enumerate(document, start=1):
        where = f"record {number}"
        question_id = files.require_field(record, "id", path, where, "a LLaVA ScienceQA question")
        turns = files.require_field(record, "conversations", path, where, "a LLaVA ScienceQA question")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            raise files.BenchmarkInputError(f"{path}: {where}: 'conversations' must start with the human turn")
        text = _with_suffix(str(turns[0].get("value", "")), layout.prompt_suffix)
        image = _image(record, path, where)
        prompt = f"{IMAGE_MARKER}\n{text}" if image is not None else text
        out.append(BenchmarkQuestion(question_id, image, text, prompt, None, record))
    return out


def _mmmu_json(path: str, layout: BenchmarkLayout) -> list[BenchmarkQuestion]:
    """TinyLLaVA's model_vqa_mmmu.py: records {id, prompt, image?, question_type, all_choices, index2ans}."""
    out = []
    for number, record in files.read_json_records(path, "MMMU questions: records with id and prompt"):
        where = f"record {number}"
        question_id = files.require_field(record, "id", path, where, "an MMMU question")
        text = _with_suffix(str(files.require_field(record, "prompt", path, where, "an MMMU question")),
                            layout.prompt_suffix)
        out.append(BenchmarkQuestion(question_id, _image(record, path, where), text, text, None, record))
    return out


_READERS: dict[str, Callable[[str, BenchmarkLayout], list[BenchmarkQuestion]]] = {
    "llava_jsonl": _llava_jsonl, "scienceqa_json": _scienceqa_json, "mmmu_json": _mmmu_json}


def read_questions(located: LocatedBenchmark) -> list[BenchmarkQuestion]:
    """The benchmark's questions in file order; a malformed file or a question listed twice is a
    BenchmarkInputError naming the file and line. (A question_id alone need not be unique: MME asks two questions
    an image under one id, LLaVA's TextVQA file uses the image id; with the prompt it must be.)"""
    questions = _READERS[located.layout.question_format](located.question_file, located.layout)
    seen: dict[tuple[str, str], int] = {}
    for number, question in enumerate(questions, start=1):
        key = (str(question.question_id), question.prompt)
        if key in seen:
            raise files.BenchmarkInputError(f"{located.question_file}: question {number} repeats question "
                                            f"{seen[key]} (question_id {question.question_id!r}, the same prompt)")
        seen[key] = number
    return questions


def scorer_files(located: LocatedBenchmark, splits: Sequence[str] = ()) -> ScorerFiles | Missing:
    """The first of the layout's scorer files that all exist, as absolute paths, or what is missing. A `{split}`
    path stays a template and counts as there when the file of at least one of `splits` is (each split is then
    scored or reported on its own)."""
    layout = located.layout
    if layout.scorer is None:
        return Missing(layout.unscored_reason)

    def exists(path: str) -> bool:
        full = os.path.join(located.folder, path)
        return any(os.path.exists(full.replace(SPLIT, split)) for split in splits) if SPLIT in path else \
            os.path.exists(full)

    for choice in layout.scorer_files:
        if all(exists(path) for path in (choice.questions, choice.annotations) if path is not None):
            return ScorerFiles(os.path.join(located.folder, choice.questions),
                               None if choice.annotations is None else os.path.join(located.folder, choice.annotations))
    wanted = " or ".join(" + ".join(os.path.join(located.folder, path) for path in (choice.questions,
                                                                                      choice.annotations) if path)
                         for choice in layout.scorer_files)
    if any(SPLIT in choice.questions for choice in layout.scorer_files):
        wanted += f" for any of the splits {', '.join(splits)}" if splits else " (the questions name no split)"
    reason = f"no {wanted}"
    return Missing(f"{reason}; {layout.unscored_reason}" if layout.unscored_reason else reason)
