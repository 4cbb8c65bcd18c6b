"""bench/train_step.py run as a user runs it, on tiny towers: the JSON contract of --estimate and --gpu."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "train_step.py")


def _run(*arguments: str) -> list[dict]:
    environment = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    environment["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, SCRIPT, *arguments], capture_output=True, text=True, timeout=900,
                          env=environment, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_estimate_prints_one_recipe_row_per_stage_a_micro_batch_16_row_and_a_lora_row():
    rows = _run("--estimate", "--tiny", "--stages", "2")
    assert [(r["stage"], r["per_device_batch"], r["recipe"]) for r in rows] == [(2, 4, True), (2, 16, False),
                                                                                 (2, 4, False)]
    for row in rows:
        assert {"stage", "per_device_batch", "devices", "recipe", "peak_bytes", "flops_per_sample",
                "model_flops_per_sample"} <= set(row)
        assert row["devices"] == 8  # the script makes its own fake devices, whatever XLA_FLAGS said
        # The compiled step does at least the model's products (2NT + 4 N_trainable T) and not wildly more.
        assert row["model_flops_per_sample"] <= row["flops_per_sample"] < 3 * row["model_flops_per_sample"]
    recipe, big, lora = rows
    # Four times the micro-batch: the same work per sample, more activation memory per device.
    assert abs(big["flops_per_sample"] / recipe["flops_per_sample"] - 1.0) < 0.01
    assert big["peak_bytes"] > recipe["peak_bytes"]
    # LoRA on every LM projection: adapters train, the LM's base weights are frozen in the compute dtype with no
    # optimizer state, so the step's arguments (params, Adam moments, batch, bank) are smaller than full stage 2's.
    assert lora["overrides"]["model.lora.targets"] and lora["overrides"]["model.lora.rank"] == 8  # --tiny's rank
    assert lora["lora_adapter_params"] > 0 and "overrides" not in recipe and "lora_adapter_params" not in recipe
    assert lora["argument_bytes"] < recipe["argument_bytes"]


def test_gpu_rows_run_on_tiny_towers_with_retrieval():
    rows = _run("--gpu", "--tiny", "--steps", "1", "--no-peer", "--rows", "s2b16r")
    assert len(rows) == 1 and "error" not in rows[0], rows
    row = rows[0]
    assert row["retrieval_k"] > 0 and row["batch"] == 16
    assert row["ms_per_step"] > 0 and row["samples_per_s"] > 0
    assert 0.0 < row["loss"] < 20.0
