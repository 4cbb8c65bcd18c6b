"""`jaxalign hf-verify`: one JSON line comparing jaxalign with transformers, non-zero exit beyond tolerance."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_fixtures_lm
from jaxalign import cli


def _run(capsys, *argv) -> tuple[int, dict]:
    code = cli.main(["hf-verify", *argv])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    folder = str(tmp_path_factory.mktemp("siglip"))
    transformers.SiglipVisionModel(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def test_lm_folder_verifies_with_matching_logits_and_generation(capsys):
    folder, _ = hf_fixtures_lm.hf_model("qwen2")
    code, report = _run(capsys, folder)
    assert code == 0, report
    assert report["kind"] == "lm" and report["model_type"] == "qwen2"
    assert report["max_abs_diff"] < 1e-4
    assert report["generation_agrees"] is True and report["ok"] is True
    assert report["reference"].startswith("transformers")


def test_vision_folder_verifies(capsys, siglip_folder):
    code, report = _run(capsys, siglip_folder)
    assert code == 0, report
    assert report["kind"] == "vision" and report["max_abs_diff"] < 1e-4 and report["generation_agrees"] is None


def test_difference_beyond_tolerance_exits_with_status_one(capsys):
    """Both sides read the same file, so a real mismatch is forced by asking for an exact (zero) tolerance."""
    folder, _ = hf_fixtures_lm.hf_model("llama")
    code, report = _run(capsys, folder, "--tolerance", "0")
    assert report["max_abs_diff"] > 0.0
    assert code == 1 and report["ok"] is False


def test_without_transformers_nothing_is_compared_and_exit_status_is_three(capsys, monkeypatch, siglip_folder):
    """A check that could not run must not pass: no ok, no number, a non-zero exit and what to install."""
    import importlib.util

    from jaxalign.io import hf_verify

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "transformers" else real_find_spec(name, *args))
    code = cli.main(["hf-verify", siglip_folder])
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert code == hf_verify.NOT_COMPARED_EXIT_STATUS == 3
    assert report["max_abs_diff"] is None and report["ok"] is False and report["reference"] == "unavailable"
    assert report["kind"] == "vision" and "transformers not installed" in report["problem"]
    assert "NOT checked" in captured.err and "pip install torch==2.13.0" in captured.err


def test_unreadable_folder_reports_the_problem_with_exit_status_two(capsys, tmp_path):
    code, report = _run(capsys, str(tmp_path))
    assert code == 2 and report["ok"] is False
    assert "config.json" in report["error"]


def test_wrong_tensor_shape_names_the_tensor(capsys, tmp_path, siglip_folder):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in os.listdir(siglip_folder):
        (folder / name).write_bytes((open(os.path.join(siglip_folder, name), "rb")).read())
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("post_layernorm.weight"))
    tensors[name] = np.zeros((7,), np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    code, report = _run(capsys, str(folder))
    assert code == 2 and name in report["error"]
