"""TinyAlign training stages and evaluation: `train_and_evaluate(config, workdir) -> results`.

One linear run, read top to bottom (big_vision style): mesh, input, model, memory bank (assembled by
`jaxalign.programs.tinyalign_setup.build_run`), optimizer and state, update step, training loop (resume,
checkpoints, metrics, NaN stop), evaluation. What every trainer shares (state on the mesh, timed jitted step,
loop, per-process data shards, process-0 outputs) is `jaxalign.programs.training`. The config files are `jaxalign/configs/tinyalign_*.py`; their
docstrings hold the commands.

Stages differ only by config: stage 1 (captions) trains the connector and the retrieval connector, stage 2
(instructions / questions) also trains the LM; the vision tower is always frozen. A stage-2 run starts from the
final checkpoint of a stage-1 workdir (`config.model.init_from`). With LoRA (`config.model.lora.targets`) stage 2
trains low-rank adapters in place of the LM's weights (`jaxalign.programs.tinyalign_lora`): the checkpoints hold
the adapters and connectors, and evaluation, `restore_run` and the export see the adapters merged into the LM.

Files of a run (`workdir/`): config.json (resolved config), tokenizer/ (tiny runs: the trained word-level
tokenizer), memory/ (the bank and its manifest, reused when the fingerprint matches), checkpoints/,
metrics.jsonl, tensorboard/, results.json.

Public API:
  train_and_evaluate(config, workdir) -> results dict (also written to workdir/results.json)
  evaluate_checkpoint(config, workdir) -> results dict of the latest checkpoint (no training)
  restore_run(config, workdir) -> (Run, params of the latest checkpoint, names of the restored params)
  make_evaluator(run) -> evaluate(params, progress=None) -> {loss, perplexity, num_tokens, vqa, vqa_accuracy}
  make_answer_generator(run) -> answer(params, batch, max_new_tokens) -> (tokens [B, T], aux): the greedy answers
    with retrieval that the VQA evaluation and `jaxalign predict` (`jaxalign.programs.predict`) both generate
Where each part of a run comes from (data sources, tokenizer, towers, model config, freeze rules, checkpoint
reading) is `jaxalign.programs.tinyalign_setup`.

Several processes (`launch/`) run one program: the rows of every training and evaluation batch depend on the
mesh, not on how many processes share it (`data_shards`: 2 processes x 4 devices see the rows 1 process x 8
devices sees; `tests/test_launch_tinyalign.py`), the loss, perplexity and VQA counts are global (every process
reports the same numbers), and process 0 alone writes files other than checkpoints and the memory bank (each
process writes its own shards of both). The data iterator's position is saved per data shard, so a checkpoint
resumes without replaying on any process count over the same shards. `config.train.batch_size` and
`config.eval.batch_size` are global.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from jaxalign import sharding
from jaxalign.align import loss as loss_lib
from jaxalign.align import model as model_lib
from jaxalign.align import update_step
from jaxalign.data import pipeline
from jaxalign.data.batching import SkipReport
from jaxalign.data.chat_templates import IGNORE_LABEL
from jaxalign.data.length_buckets import PaddingStats, max_over_processes
from jaxalign.evaluate import lm_loss, vqa
from jaxalign.models import generate
from jaxalign.programs import tinyalign_diagnostics, tinyalign_lora, training
from jaxalign.programs.tinyalign_setup import (Run, build_run, freeze_rules, overwrite_params, read_checkpoint_params,
                                               stage_optimizer, stop_token_ids, train_records_name,
                                               trainable_parts)

log = logging.getLogger(__name__)
ConfigDict = ml_collections.ConfigDict


# ================================================================================================ input order
def _device_batch(batch: dict, mesh) -> dict:
    return sharding.global_batch(model_lib.numpy_batch(batch), mesh)


def _pad_length(batch: dict, length: int, pad_id: int) -> dict:
    """A right-padded training batch padded on to `length` positions (labels ignored, attention off there)."""
    extra = length - batch["input_ids"].shape[1]
    if extra == 0:
        return batch
    fills = {"input_ids": pad_id, "labels": IGNORE_LABEL, "attention_mask": 0}
    return {**batch, **{name: np.pad(batch[name], ((0, 0), (0, extra)), constant_values=fill)
                        for name, fill in fills.items()}}


class ShardTrainBatches:
    """This process's rows of every training step: the batches of its data shards (`data_shards`), concatenated.

    With length buckets each shard picks its own bucket; the parts are padded to the largest bucket of any shard
    of any process (one all-gather of one integer per step with several processes), so every step has one
    length. `shards` are the shards' `pipeline.TrainBatches` (their reports and padding statistics; the latter
    count each shard's own bucket, before that agreement). `to_device`, if given, maps each joined batch (e.g.
    onto the mesh). `state` is {'shards': {shard number: that shard's `TrainBatches.state`}}, the position
    after the last batch: `pipeline.make_vqa_dataset(start_state=...)` of each shard resumes there. Keyed by
    the global shard number, the states of all processes merge into one (`jaxalign.train.loop`), so a run
    resumed on another number of processes over the same shards picks up each shard where it stopped."""

    def __init__(self, shards: list[pipeline.TrainBatches], pad_id: int, to_device=None,
                 numbers: Sequence[int] | None = None):
        self.shards, self.pad_id, self.to_device = shards, pad_id, to_device
        self.numbers = list(numbers) if numbers is not None else list(range(len(shards)))

    @property
    def state(self) -> dict[str, dict[str, dict[str, int]]]:
        return {"shards": {str(number): shard.state for number, shard in zip(self.numbers, self.shards)}}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(shard) for shard in self.shards]
        length = max(part["input_ids"].shape[1] for part in parts)
        if self.shards[0].length_buckets and jax.process_count() > 1:
            length = max_over_processes(length)
        parts = [_pad_length(part, length, self.pad_id) for part in parts]
        batch = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        return self.to_device(batch) if self.to_device is not None else batch


class ShardEvalBatches:
    """This process's rows of every evaluation batch: the batches of its data shards, concatenated; at most
    `max_batches` per pass (None: all)."""

    def __init__(self, shards: list[pipeline.EvalBatches], max_batches: int | None):
        self.shards, self.max_batches = shards, max_batches

    def __len__(self) -> int:
        return min(len(self.shards[0]), self.max_batches or len(self.shards[0]))

    def __iter__(self):
        for _, parts in zip(range(len(self)), zip(*self.shards)):
            yield {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def make_answer_generator(run: Run):
    """`answer(params, batch, max_new_tokens) -> (tokens, aux)`: greedy answers to a batch of prompts.

    `batch` is this process's rows of a generation batch (`pipeline.make_eval_dataset(for_generation=True)`,
    left-padded prompts). The prompt is spliced with the image tokens and the tokens retrieved from the run's
    bank (`model_lib.build_lm_inputs`, no leave-one-out: a test sample is not in the bank), then decoded with the
    KV cache until a stop token (`stop_token_ids`). Returns global arrays on the run's mesh: tokens
    [B, max_new_tokens] (pad after the stop token) and aux, `build_lm_inputs`'s: with retrieval on
    'retrieved_ids', 'scores', 'value_ids' [B, k], 'query' [B, key_dim] and, for token values,
    'value_token_ids' [B, k, Lv]; empty without retrieval. The prefill is jitted once per generator."""
    cfg, mesh = run.cfg, run.mesh
    prefill = jax.jit(sharding.trace_in_mesh(
        lambda p, b, m: model_lib.build_lm_inputs(p, cfg, b, m, False, "left"), mesh))
    stop_ids = stop_token_ids(run.tokenizer, run.template)

    def answer(params: dict, batch: dict, max_new_tokens: int) -> tuple[jax.Array, dict]:
        spliced, aux = prefill(params, _device_batch(batch, mesh), run.memory)
        out = generate.generate(params["lm"], cfg.lm, inputs_embeds=spliced.inputs_embeds,
                                attention_mask=spliced.attention_mask, max_new_tokens=max_new_tokens,
                                eos_id=stop_ids, pad_id=run.tokenizer.pad_id)
        return out.tokens, aux

    return answer


def make_evaluator(run: Run):
    """`evaluate(params, progress) -> results`: eval loss / perplexity and, when the config asks, VQA accuracy
    per question type. The jitted functions are made once, so periodic evaluations compile nothing new."""
    config, cfg, mesh = run.config, run.cfg, run.mesh
    options = dict(run.data_options, fraction=config.eval.fraction, fraction_seed=config.data.fraction_seed,
                   verbose=False)
    loss_step = jax.jit(sharding.trace_in_mesh(
        lambda p, b, m: loss_lib.make_loss_fn(cfg, m, train=False)(p, b, None)[1], mesh))
    answer = make_answer_generator(run)
    max_batches = config.eval.max_batches or None
    # config.eval.batch_size is global, like config.train.batch_size: one part per data shard.
    shard_count, own_shards = training.data_shards(mesh, config.eval.batch_size)
    if config.eval.batch_size % shard_count:
        raise ValueError(f"config.eval.batch_size={config.eval.batch_size} must divide over {shard_count} "
                         f"data shards ({jax.process_count()} processes)")

    passes: list[ShardEvalBatches] = []  # this evaluation's passes, for their skip reports

    def eval_batches(for_generation: bool) -> ShardEvalBatches:
        batches = ShardEvalBatches([pipeline.make_eval_dataset(
            run.sources["eval"], batch_size=config.eval.batch_size // shard_count, for_generation=for_generation,
            process_index=shard, process_count=shard_count, **options) for shard in own_shards], max_batches)
        passes.append(batches)
        return batches

    # Retrieval diagnostics (`jaxalign.programs.tinyalign_diagnostics`): made on first use, bank attributes once.
    probe: list[tinyalign_diagnostics.RetrievalProbe] = []
    # Not for the oracle: its values are each sample's own, not bank rows (its value ids are all -1), so there is no
    # retrieval to measure; its precision is 1 by construction.
    diagnose = (cfg.retrieval and cfg.control.kind != "oracle" and config.eval.get("retrieval_diagnostics", True))

    def evaluate(params: dict, progress: bool | None = None) -> dict[str, Any]:
        results: dict[str, Any] = {}
        show = progress is not False
        passes.clear()
        if config.eval.loss:
            results.update(lm_loss.evaluate_loss(lambda b: loss_step(params, b, run.memory), eval_batches(False),
                                                 to_device=lambda b: _device_batch(b, mesh), progress=show))
        if config.eval.vqa:
            def generate_fn(batch):
                tokens, _ = answer(params, batch, config.eval.max_new_tokens)
                return training.host_rows(tokens, mesh)

            # Each process scores its own rows; the counts are summed over processes (`evaluate_vqa`).
            accuracy, examples = vqa.evaluate_vqa(generate_fn, eval_batches(True), run.tokenizer, progress=show)
            results["vqa"] = accuracy
            results["vqa_accuracy"] = accuracy["accuracy"]
            results["vqa_examples"] = examples
        if diagnose:
            if not probe:
                probe.append(tinyalign_diagnostics.RetrievalProbe(run))
            results["retrieval_precision"] = probe[0](params, max_batches,
                                                      config.eval.get("diagnostic_batches", 0) or max_batches)
        # Every skipped test sample is counted (a missing image must not silently shrink the denominator): the
        # passes' reports, summed over this process's shards (each process reports its own rows).
        skipped = SkipReport()
        for batches in passes:
            for shard in batches.shards:
                skipped = skipped.merge(shard.report)
        results["skipped"] = skipped.to_json()
        if skipped.counts:
            log.warning("evaluation skipped samples: %s", skipped)
        return results

    return evaluate


# ================================================================================================ main
def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) one TinyAlign stage and evaluates it; returns the results dict (see module docstring).

    The dict holds: stage, control, mode, k, fraction, steps, process_count and device_count (where the run ran),
    train_loss_first / _last, loss_history,
    seconds_per_step, compile_seconds, eval (loss, perplexity, vqa), memory (path, reused, count, key_dim),
    data (tfds build reports, the skip reports of the training passes with sample ids, and `train_padding`: real
    spliced tokens against computed ones, rows x padded length, of this host's batches).
    """
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    log.info("TinyAlign stage %d (control %s, mode %s) in %s", config.stage, config.retrieval.control,
             config.retrieval.mode, workdir)

    # --- mesh, input, model, memory bank -------------------------------------------------------------------------
    run = build_run(config, workdir)
    cfg, mesh = run.cfg, run.mesh

    # --- optimizer (freeze rules of the stage, AdamW with warm-up and cosine decay), state on the mesh ----------
    train = config.train
    global_batch_size = train.batch_size
    if global_batch_size % jax.process_count():
        raise ValueError(f"config.train.batch_size={global_batch_size} must divide over "
                         f"{jax.process_count()} processes")
    selected = len(pipeline.select_fraction(len(run.sources["train"]), config.data.fraction,
                                            config.data.fraction_seed))
    total_steps = train.total_steps or max(1, int(train.num_epochs * selected // global_batch_size))
    trainable = trainable_parts(config)
    setup = training.setup_training(run.params, run.param_axes,
                                    freeze_rules(trainable, stage_optimizer(train, total_steps)), mesh,
                                    config.seed + 1)

    # --- update step: one jit over (state, batch, memory), the bank searched inside -----------------------------
    # The same jitted program bench/train_step.py times (`update_step.jit_update_step`).
    step = training.TimedStep(update_step.jit_update_step(
        tinyalign_lora.make_update_step(cfg, run.lora, setup.optimizer, setup.mask, train.accum_steps),
        setup.shardings, mesh, run.memory), every=train.log_every)

    def train_step(state, batch):
        return step(state, batch, run.memory)

    # --- input iterator, resumable at any step ------------------------------------------------------------------
    iterators: list[pipeline.TrainBatches] = []
    shard_count, own_shards = training.data_shards(mesh, global_batch_size)

    def batch_iterator_factory(start_step: int, start_state: dict | None = None):
        # A saved state ({'shards': {shard number: state}}, see ShardTrainBatches.state) restores each shard's
        # position directly, whichever process saved it; without one (older checkpoints, another shard count)
        # each shard replays steps 0..start_step-1.
        saved = (start_state or {}).get("shards", {}) if isinstance(start_state, dict) else {}
        if start_state is not None and not all(str(shard) in saved for shard in own_shards):
            log.warning("the checkpoint's data state does not cover this process's shards %s (saved: %s): "
                        "replaying the steps before step %d instead", list(own_shards), sorted(saved), start_step)
            saved = {}
        # ShardTrainBatches agrees on the step's length bucket over all shards, so each shard keeps its own.
        shards = [pipeline.make_vqa_dataset(
            run.sources["train"], batch_size=global_batch_size // shard_count, seed=config.seed,
            fraction=config.data.fraction, fraction_seed=config.data.fraction_seed, start_step=start_step,
            start_state=saved.get(str(shard)), process_index=shard, process_count=shard_count,
            agree_length=lambda length: length, cache_samples=config.data.get("cache_samples", False),
            share_cache_as=train_records_name(config.data) if config.data.get("share_sample_cache") else None,
            **run.data_options) for shard in own_shards]
        iterators.extend(shards)
        return ShardTrainBatches(shards, run.tokenizer.pad_id, to_device=lambda batch: _device_batch(batch, mesh),
                                 numbers=own_shards)

    # --- training loop ------------------------------------------------------------------------------------------
    evaluate = make_evaluator(run)

    def eval_fn(current):
        results = evaluate(tinyalign_lora.model_params(current.params, run.lora), progress=False)
        return {**{name: value for name, value in results.items() if isinstance(value, float)},
                **tinyalign_diagnostics.headline(results.get("retrieval_precision") or {})}

    settings = training.LoopSettings(
        log_every=train.log_every, checkpoint_every=train.checkpoint_every, keep=train.keep_checkpoints,
        eval_every=train.eval_every or None, progress=config.progress,
        # Several processes agree on each step's length bucket with an all-gather inside the iterator: that must
        # run in step order on the main thread, so no prefetching then.
        prefetch=0 if run.data_options.get("length_buckets") and jax.process_count() > 1 else 2)
    result = training.run_loop(setup, train_step, batch_iterator_factory, total_steps, workdir, config, settings,
                               examples_per_step=global_batch_size, eval_fn=eval_fn if train.eval_every else None)

    # --- evaluation ---------------------------------------------------------------------------------------------
    evaluation = (evaluate(tinyalign_lora.model_params(result.state.params, run.lora), progress=config.progress)
                  if config.eval.at_end else {})
    losses = [record["loss"] for record in result.history if "loss" in record]
    skipped, padding = SkipReport(), PaddingStats()
    for iterator in iterators:
        for report in iterator.reports + [iterator.report]:
            skipped = skipped.merge(report)
        padding = padding.merge(iterator.padding)  # this host's shards: real spliced tokens / rows x padded length
    results = {
        "workdir": workdir, "stage": config.stage, "control": cfg.control.kind, "mode": cfg.query.mode,
        "k": cfg.k, "fraction": config.data.fraction, "steps": int(result.state.step), "total_steps": total_steps,
        **training.where_it_ran(),
        "trainable": list(trainable), "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "loss_history": [(r["step"], r["loss"]) for r in result.history if "loss" in r],
        "seconds_per_step": step.seconds_per_step, "compile_seconds": step.compile_seconds,
        "eval": evaluation, "memory": run.memory_info, "init": run.init_info,
        "lora": None if run.lora is None else {"targets": list(run.lora.targets), "rank": run.lora.rank,
                                               "alpha": run.lora.alpha,
                                               "adapter_params": tinyalign_lora.adapter_count(run.params)},
        "data": {"build_reports": run.sources["build_reports"], "train_skipped": skipped.to_json(),
                 "train_padding": padding.to_json()},
    }
    training.write_json(workdir, "results.json", results)
    return results


def restore_run(config: ConfigDict, workdir: str) -> tuple[Run, dict, list[str]]:
    """(run, params, names of the params read from the checkpoint): a trained run as its latest checkpoint left
    it, its params sharded over the run's mesh (what `evaluate_checkpoint` and `jaxalign predict` start from).
    A LoRA run's params come with the adapters merged into the LM (`tinyalign_lora.model_params`)."""
    run = build_run(config, workdir)
    params, replaced = overwrite_params(run.params, read_checkpoint_params(workdir), workdir)
    params = sharding.shard_params(params, run.param_axes, run.mesh)
    return run, tinyalign_lora.model_params(params, run.lora), replaced


def evaluate_checkpoint(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the latest checkpoint of `workdir` (loss, perplexity, VQA accuracy) without training."""
    run, params, replaced = restore_run(config, workdir)
    evaluation = make_evaluator(run)(params, progress=config.progress)
    return {"workdir": workdir, "restored_params": len(replaced), **training.where_it_ran(), "eval": evaluation,
            "memory": run.memory_info}
