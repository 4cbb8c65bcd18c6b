"""The standard benchmarks in one go: a trained TinyAlign run answers every benchmark of a LLaVA evaluation
folder, its answers are written in each benchmark's formats and scored by the scorers of `jaxalign score`.

    jaxalign eval-suite --workdir runs/s2 --data playground/data/eval [--out DIR] [--benchmarks pope textvqa]

Which benchmarks there are, where their files lie and how their questions are prompted is data
(`jaxalign.evaluate.benchmarks.eval_folder.LAYOUTS`); the files written and their scoring are
`jaxalign.evaluate.benchmarks.answer_files`. This module asks the questions. The run is rebuilt from its workdir as
`jaxalign predict` rebuilds it (`tinyalign_trainer.restore_run`), each question becomes a LLaVA-format record (an
`<image>` line, then the question with the benchmark's instruction) batched by the evaluation pipeline
(`pipeline.make_eval_dataset(for_generation=True)`, `config.eval.batch_size` rows a batch over the mesh's data
shards, as `jaxalign eval`), and answered by the evaluation's generator (`tinyalign_trainer.make_answer_generator`:
retrieval at prefill, greedy decoding with the KV cache, at most `config.eval.max_new_tokens` tokens).

Nothing is dropped silently: a benchmark whose folder, question file or image folder is missing is `skipped`, one
whose scorer files are missing (or that has no scorer here: MM-Vet, VQAv2 test-dev) is `answers only`, one whose
files cannot be used is `error`, each with its reason; a question whose image file is missing (`image_not_found`)
or cannot be used (`corrupt_image`, `missing_image` for an unreadable file, `truncated` for a prompt longer than
the model) is a bad row, counted with its id, left out of the answers file and scored as unanswered (wrong).

Outputs (`out`, by default `<workdir>/eval_suite/`): `<benchmark>/answers.jsonl` and the benchmark's own result
files, and `results.json`: {workdir, data, out, model_id, batch_size, max_new_tokens, benchmarks: {name: {status,
reason?, questions, answered, bad_rows, files, scores, scored_with}}}. With several processes each answers its rows,
the answers are gathered, and process 0 writes and scores.

Public API:
  SuiteError
  BenchmarkAnswerer(workdir, overrides=(), batch_size=None, max_new_tokens=None)
      .answer(located, questions, progress=None) -> ({question index: answer}, SkipReport)
  run_suite(workdir, data_dir, out_dir=None, benchmarks=None, overrides=(), batch_size=None,
            max_new_tokens=None, progress=None) -> the results.json dict
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxalign.data import chat_templates
from jaxalign.data.batching import SkipReport
from jaxalign.evaluate.benchmarks import answer_files, eval_folder, files

RESULTS_FILE = "results.json"


class SuiteError(ValueError):
    """The suite cannot start (a missing data folder, a workdir without a trained run, an unknown benchmark); the
    message is one line naming the argument."""


class _QuestionRecords:
    """The questions to ask as LLaVA-format records for the evaluation pipeline (a random-access data source),
    each image read from its file when its row is taken. `rows` are the indexes of the questions asked; an image
    that cannot be read gives no bytes, which the pipeline counts as `missing_image`."""

    def __init__(self, image_folder: str, questions: Sequence[eval_folder.BenchmarkQuestion], rows: Sequence[int]):
        self.image_folder, self.questions, self.rows = image_folder, questions, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        question = self.questions[self.rows[position]]
        image, value = b"", question.text
        if question.image is not None:
            value = f"{chat_templates.IMAGE_PLACEHOLDER}\n{question.text}"
            try:
                with open(os.path.join(self.image_folder, question.image), "rb") as handle:
                    image = handle.read()
            except OSError:
                image = b""
        conversation = [{"from": chat_templates.HUMAN, "value": value}, {"from": chat_templates.ASSISTANT, "value": ""}]
        return {"id": str(question.question_id), "image": image, "conversations": json.dumps(conversation),
                "answer": "", "question_type": ""}


class BenchmarkAnswerer:
    """A trained run, loaded once, that answers benchmark questions in batches.

    Args:
      workdir: the run's folder (config.json, checkpoints/, memory/, tokenizer/ for tiny towers).
      overrides: `--config.a.b=value` items applied to the saved config.
      batch_size: global rows a generation batch (default `config.eval.batch_size`).
      max_new_tokens: longest answer in tokens (default `config.eval.max_new_tokens`).
    """

    def __init__(self, workdir: str, overrides: Sequence[str] = (), batch_size: int | None = None,
                 max_new_tokens: int | None = None):
        from jaxalign.configs.base import load_resolved_config
        from jaxalign.programs import tinyalign_trainer, training

        try:
            config = load_resolved_config(workdir, overrides)
        except (FileNotFoundError, KeyError, ValueError) as error:
            raise SuiteError(f"--workdir {workdir}: {error}") from None
        if config.retrieval.control == "oracle":
            raise SuiteError(f"--workdir {workdir}: the run's retrieval control is 'oracle' (each sample is given its "
                             "own answer), which a benchmark question does not have; evaluate a run of another control")
        self.config = config
        self.batch_size = int(batch_size or config.eval.batch_size)
        self.max_new_tokens = int(max_new_tokens or config.eval.max_new_tokens)
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise SuiteError(f"--batch-size {self.batch_size} and --max-new-tokens {self.max_new_tokens} must be "
                             "at least 1")
        self.run, self.params, _ = tinyalign_trainer.restore_run(config, workdir)
        self.generate = tinyalign_trainer.make_answer_generator(self.run)
        self.shard_count, self.own_shards = training.data_shards(self.run.mesh, self.batch_size)
        if self.batch_size % self.shard_count:
            raise SuiteError(f"--batch-size {self.batch_size} must divide over the {self.shard_count} data shards of "
                             f"the mesh {tuple(self.run.mesh.shape.values())}")

    def answer(self, located: eval_folder.LocatedBenchmark, questions: Sequence[eval_folder.BenchmarkQuestion],
               progress: bool | None = None) -> tuple[dict[int, str], SkipReport]:
        """({question index: the model's answer} of every question asked, the bad rows), the same on every
        process. Questions whose image file does not exist are not asked (`image_not_found`)."""
        import jax

        from jaxalign.data import pipeline
        from jaxalign.programs import tinyalign_trainer, training

        report, rows = SkipReport(), []
        for index, question in enumerate(questions):
            if question.image is not None and not os.path.isfile(os.path.join(located.image_folder, question.image)):
                report.total += 1
                report.add(chat_templates.MaskingError(str(question.question_id), "image_not_found",
                                                       os.path.join(located.image_folder, question.image)))
            else:
                rows.append(index)
        answers: dict[int, str] = {}
        if rows:
            source = _QuestionRecords(located.image_folder, questions, rows)
            options = dict(self.run.data_options, fraction=1.0, verbose=False)
            batches = tinyalign_trainer.ShardEvalBatches([pipeline.make_eval_dataset(
                source, batch_size=self.batch_size // self.shard_count, for_generation=True, process_index=shard,
                process_count=self.shard_count, **options) for shard in self.own_shards], None)
            # disable=None: tqdm shows the bar when stderr is a terminal.
            for batch in tqdm(batches, total=len(batches), desc=located.layout.name, unit="batch",
                              disable=True if progress is False or jax.process_index() else None):
                tokens, _ = self.generate(self.params, batch, self.max_new_tokens)
                tokens = training.host_rows(tokens, self.run.mesh)
                for row, position, valid in zip(tokens, batch["sample_index"], batch["valid"]):
                    if valid:
                        answers[rows[int(position)]] = self.run.tokenizer.decode(np.asarray(row).tolist()).strip()
            for shard in batches.shards:
                report = report.merge(shard.report)
        gathered = training.gather_json({"answers": answers, "report": report.to_json()})
        if len(gathered) > 1:  # each process asked its own rows: every process gets all of them
            answers = {int(index): text for part in gathered for index, text in part["answers"].items()}
            report = SkipReport()
            for part in gathered:
                report = report.merge(SkipReport.from_json(part["report"]))
        return answers, report


def _check_arguments(workdir: str, data_dir: str, benchmarks: Sequence[str] | None) -> list:
    from jaxalign.programs import predict

    try:
        layouts = eval_folder.select(benchmarks)
    except files.BenchmarkInputError as error:
        raise SuiteError(f"--benchmarks: {error}") from None
    if not os.path.isdir(data_dir):
        raise SuiteError(f"--data {data_dir}: no such folder (give LLaVA's evaluation folder, e.g. "
                         "./playground/data/eval, holding pope/, textvqa/, ...)")
    try:
        predict.check_run(workdir)
    except predict.PredictError as error:
        raise SuiteError(str(error)) from None
    return layouts


def run_suite(workdir: str, data_dir: str, out_dir: str | None = None, benchmarks: Sequence[str] | None = None,
              overrides: Sequence[str] = (), batch_size: int | None = None, max_new_tokens: int | None = None,
              progress: bool | None = None) -> dict[str, Any]:
    """Answers, writes and scores every benchmark of `benchmarks` (default all of `eval_folder.LAYOUTS`) found in
    `data_dir`; returns the results.json dict (see the module docstring) and writes it to `out_dir`.

    Raises:
      SuiteError: bad arguments, or `data_dir` holds none of the benchmarks asked for (checked before the run is
        loaded).
    """
    import jax

    from jaxalign.programs import training

    layouts = _check_arguments(workdir, data_dir, benchmarks)
    out_dir = out_dir or os.path.join(workdir, "eval_suite")
    model_id = os.path.basename(os.path.normpath(workdir))
    results: dict[str, dict[str, Any]] = {}
    asked = []
    for layout in layouts:
        located = eval_folder.locate(layout, data_dir)
        if isinstance(located, eval_folder.Missing):
            results[layout.name] = {"status": "skipped", "reason": located.reason}
            continue
        try:
            questions = eval_folder.read_questions(located)
        except files.BenchmarkInputError as error:
            results[layout.name] = {"status": "skipped", "reason": str(error)}
            continue
        if not questions:
            results[layout.name] = {"status": "skipped", "reason": f"{located.question_file} holds no questions"}
            continue
        results[layout.name] = {"status": "answered", "folder": located.folder, "question_file": located.question_file,
                                "image_folder": located.image_folder, "questions": len(questions)}
        asked.append((located, questions))
    if not asked:
        raise SuiteError(f"--data {data_dir}: none of the benchmarks asked for can be run there: " + "; ".join(
            f"{name}: {result['reason']}" for name, result in results.items()))

    answerer = BenchmarkAnswerer(workdir, overrides, batch_size, max_new_tokens)
    for located, questions in asked:
        answers, bad_rows = answerer.answer(located, questions, progress)
        entry = results[located.layout.name]
        entry.update(answered=len(answers), bad_rows=bad_rows.to_json())
        if jax.process_index() != 0:
            continue
        try:
            entry["files"] = answer_files.write_outputs(located, questions, answers,
                                                        os.path.join(out_dir, located.layout.name), model_id)
            entry.update(answer_files.score_outputs(located, questions, entry["files"]))
        except files.BenchmarkInputError as error:
            entry.update(status="error", reason=str(error))
    summary = {"workdir": os.fspath(workdir), "data": os.fspath(data_dir), "out": os.fspath(out_dir),
               "model_id": model_id, "batch_size": answerer.batch_size, "max_new_tokens": answerer.max_new_tokens,
               "benchmarks": {layout.name: results[layout.name] for layout in layouts}}
    training.write_json(out_dir, RESULTS_FILE, summary)
    return summary
