"""One entry point for every benchmark: score a model's answers file against the benchmark's question files.

Public API:
  BENCHMARKS: {name: one-line description}
  score_files(benchmark, predictions_path, questions_paths, annotations_path=None, split="test") -> dict
"""
from __future__ import annotations

import os
from typing import Sequence

from jaxalign.evaluate.benchmarks import files, gqa, mme, mmmu, pope, scienceqa, vqa

BENCHMARKS = {
    "vqav2": "VQAv2 soft accuracy: --questions the questions JSON, --annotations the annotations JSON",
    "textvqa": "TextVQA soft accuracy: --questions TextVQA_0.5.1_val.json (or the VQA layout with --annotations)",
    "gqa": "GQA exact match: --questions testdev_balanced_questions.json",
    "scienceqa": "ScienceQA-IMG letter accuracy: --questions problems.json [--annotations pid_splits.json] or "
                 "llava_test_CQM-A.json",
    "pope": "POPE accuracy / precision / recall / F1 / yes-ratio: --questions coco_pope_<split>.json",
    "mme": "MME perception and cognition scores: --questions MME_Benchmark_release_version (or task files, or "
           "llava_mme.jsonl with --annotations the release folder)",
    "mmmu": "MMMU accuracy: --questions the validation records [--annotations answer_dict_val.json]",
}
_SCORERS = {
    "vqav2": vqa.score_vqav2_files, "textvqa": vqa.score_textvqa_files, "gqa": gqa.score_files,
    "scienceqa": scienceqa.score_files, "pope": pope.score_files, "mme": mme.score_files, "mmmu": mmmu.score_files,
}


def score_files(benchmark: str, predictions_path: files.PathLike, questions_paths: files.PathLike | Sequence,
                annotations_path: files.PathLike | None = None, split: str = "test") -> dict:
    """The benchmark's metrics as a JSON-ready dict: `accuracy` (a fraction in [0, 1]) for every benchmark, POPE's
    `precision`, `recall`, `f1`, `yes_ratio`, MME's `perception` and `cognition`, `questions` and
    `missing_answers`, and per-type / per-split breakdowns under their own keys.

    Args:
      benchmark: one of BENCHMARKS.
      predictions_path: the model's answers, JSON lines with question_id and text.
      questions_paths: the benchmark's question file(s) (several only for POPE and MME).
      annotations_path: the annotations / ground-truth file where the benchmark keeps answers apart.
      split: ScienceQA's split in problems.json (default "test").

    Raises:
      BenchmarkInputError: an unknown benchmark or input that cannot be used (the message names file and line).
    """
    if benchmark not in _SCORERS:
        raise files.BenchmarkInputError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if not os.path.isfile(predictions_path):
        raise files.BenchmarkInputError(f"{os.fspath(predictions_path)}: no such file (the --predictions answers)")
    if annotations_path is not None and not os.path.exists(annotations_path):
        raise files.BenchmarkInputError(f"{os.fspath(annotations_path)}: no such file (the --annotations of "
                                        f"{benchmark})")
    if benchmark == "scienceqa":
        return scienceqa.score_files(predictions_path, questions_paths, annotations_path, split=split)
    return _SCORERS[benchmark](predictions_path, questions_paths, annotations_path)
