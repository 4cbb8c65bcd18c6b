"""LoRA for stage 2: adapters on chosen LM kernels (jaxalign/train/lora.py) and their TinyAlign run
(jaxalign/programs/tinyalign_lora.py): the merged model is the adapter model, a LoRA run trains only adapters and
connectors, checkpoints them without the LM, resumes, and exports the merged LM as a Hugging Face folder.

The run: tiny random towers, stage 2 on 1% of the easy-vqa questions (tfds data built from the `easy-vqa` package,
nothing downloaded), `jaxalign train` with `lora=qv`, 4 steps then 2 more from its checkpoint, 8 fake CPU devices.
"""
import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.configs.base import load_config
from jaxalign.io import hf_lm
from jaxalign.models import decoder
from jaxalign.programs import tinyalign_lora
from jaxalign.programs import tinyalign_setup as setup
from jaxalign.train import lora

LM = decoder.DecoderConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=2, attention_bias=True)
QV = ("lm/layers/attention/(query|value)/kernel",)


def _lm_with_adapters(targets=QV, rank=4, alpha=8.0):
    """({'lm': params, 'lora': adapters with random non-zero B}, LoraConfig)."""
    config = lora.LoraConfig(targets=targets, rank=rank, alpha=alpha)
    params, axes = {"lm": decoder.init(LM, jax.random.PRNGKey(0))}, {"lm": decoder.logical_axes(LM)}
    params, _ = tinyalign_lora.add_adapters(params, axes, config, jax.random.PRNGKey(1))
    # B starts at zero (the adapted model equals its base); a trained one is not.
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 16))
    params["lora"] = jax.tree_util.tree_map_with_path(
        lambda path, leaf: 0.1 * jax.random.normal(next(keys), leaf.shape) if path[-1].key == "b" else leaf,
        params["lora"])
    return params, config


def _ids():
    return jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, LM.vocab_size)


# ============================================================================================== the library
def test_adapters_start_at_zero_so_the_adapted_model_is_its_base():
    config = lora.LoraConfig(targets=QV, rank=4, alpha=8.0)
    params, axes = {"lm": decoder.init(LM, jax.random.PRNGKey(0))}, {"lm": decoder.logical_axes(LM)}
    adapters = lora.init_adapters(params, axes, config, jax.random.PRNGKey(1))
    query = adapters["lm"]["layers"]["attention"]["query"]["kernel"]
    # Query kernel [L, E, H, D] = [2, 32, 4, 8]: A [L, E, r], B [L, r, H, D].
    assert query["a"].shape == (2, 32, 4) and query["b"].shape == (2, 4, 4, 8)
    assert float(jnp.std(query["a"])) == pytest.approx(1 / np.sqrt(32), rel=0.2)
    assert not np.any(np.asarray(query["b"]))
    merged = lora.merge(params, adapters, config.scale)
    np.testing.assert_array_equal(merged["lm"]["layers"]["attention"]["query"]["kernel"],
                                  params["lm"]["layers"]["attention"]["query"]["kernel"])
    # Untargeted parameters are returned as they are.
    assert merged["lm"]["layers"]["attention"]["key"]["kernel"] is params["lm"]["layers"]["attention"]["key"]["kernel"]


def test_adapter_forward_equals_numpy_x_times_w_plus_scaled_a_b():
    """Layer 0's query and attention-output projections: x @ (W + alpha/r A B) by hand in NumPy."""
    targets = ("lm/layers/attention/(query|output)/kernel",)
    params, config = _lm_with_adapters(targets, rank=4, alpha=8.0)
    merged = tinyalign_lora.model_params(params, config)
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    base, adapters = params["lm"]["layers"]["attention"], params["lora"]["lm"]["layers"]["attention"]
    # query: [E, H, D] = [32, 4, 8], input E, output (H, D)
    w = np.asarray(base["query"]["kernel"][0]).reshape(32, 32)
    a, b = np.asarray(adapters["query"]["kernel"]["a"][0]), np.asarray(adapters["query"]["kernel"]["b"][0])
    expected = x @ (w + 8.0 / 4 * a @ b.reshape(4, 32))
    got = np.einsum("te,ehd->thd", x, np.asarray(merged["lm"]["layers"]["attention"]["query"]["kernel"][0]))
    np.testing.assert_allclose(got.reshape(5, 32), expected, rtol=1e-5, atol=1e-5)
    # output: [H, D, E] = [4, 8, 32], input (H, D), output E
    w = np.asarray(base["output"]["kernel"][0]).reshape(32, 32)
    a, b = np.asarray(adapters["output"]["kernel"]["a"][0]), np.asarray(adapters["output"]["kernel"]["b"][0])
    assert a.shape == (4, 8, 4) and b.shape == (4, 32)
    expected = x @ (w + 2.0 * a.reshape(32, 4) @ b)
    got = np.einsum("thd,hde->te", x.reshape(5, 4, 8), np.asarray(merged["lm"]["layers"]["attention"]["output"]
                                                                  ["kernel"][0]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_merged_hf_folder_gives_the_adapter_models_logits(tmp_path):
    """The adapter model (what the training loss runs: `model_params`) against its merged weights written as a
    Hugging Face folder and read back, with non-zero B: the same logits to 1e-5, and not the base model's."""
    params, config = _lm_with_adapters()
    adapted = decoder.forward(tinyalign_lora.model_params(params, config)["lm"], LM, input_ids=_ids()).logits
    hf_lm.export(str(tmp_path), LM, tinyalign_lora.model_params(params, config)["lm"])
    cfg, loaded = hf_lm.load(str(tmp_path))
    exported = decoder.forward(loaded, cfg, input_ids=_ids()).logits
    np.testing.assert_allclose(exported, adapted, atol=1e-5, rtol=1e-5)
    base = decoder.forward(params["lm"], LM, input_ids=_ids()).logits
    assert float(jnp.max(jnp.abs(base - adapted))) > 1e-3


def test_gradients_reach_the_adapters_and_not_the_base():
    params, config = _lm_with_adapters()

    def loss(adapters, base):
        merged = tinyalign_lora.model_params({"lm": base, "lora": adapters}, config)["lm"]
        return jnp.mean(decoder.forward(merged, LM, input_ids=_ids()).logits ** 2)

    grads = jax.grad(loss)(params["lora"], params["lm"])
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
    assert sorted(jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]) == [
        f"['lm']['layers']['attention']['{name}']['kernel']['{role}']" for name in ("query", "value")
        for role in ("a", "b")]


def test_a_target_that_matches_nothing_is_an_error_naming_it():
    params, axes = {"lm": decoder.init(LM, jax.random.PRNGKey(0))}, {"lm": decoder.logical_axes(LM)}
    config = lora.LoraConfig(targets=("lm/.*/(q_proj|v_proj)/kernel",))
    with pytest.raises(ValueError, match=r"'lm/\.\*/\(q_proj\|v_proj\)/kernel' matches no parameter") as error:
        lora.init_adapters(params, axes, config, jax.random.PRNGKey(0))
    assert "lm/layers/attention/query/kernel" in str(error.value)  # the names there are
    with pytest.raises(ValueError, match="not a kernel"):
        lora.init_adapters(params, axes, lora.LoraConfig(targets=("lm/layers/attention/query/bias",)),
                           jax.random.PRNGKey(0))


def test_lora_trains_in_place_of_the_lm_and_only_where_the_lm_trains():
    config = load_config("jaxalign/configs/tinyalign_tiny.py:stage=2,lora=qv")
    assert setup.trainable_parts(config) == ("connector", "retrieval_connector", "lora")
    assert setup.stored_dtypes(config)["lm"] == config.model.dtype  # frozen: stored as it computes
    config = load_config("jaxalign/configs/tinyalign_tiny.py:stage=2", ["model.lora.targets=('lm/layers/.*',)"])
    assert tinyalign_lora.lora_config(config).targets == ("lm/layers/.*",)
    with pytest.raises(ValueError, match="not the LM"):
        setup.trainable_parts(load_config("jaxalign/configs/tinyalign_tiny.py:stage=1,lora=qv"))
    with pytest.raises(ValueError, match="start with 'lm/'"):
        tinyalign_lora.lora_config(load_config("jaxalign/configs/tinyalign_tiny.py:stage=2",
                                               ["model.lora.targets=('vision/.*',)"]))


# ============================================================================================== a LoRA run
CONFIG = "jaxalign/configs/tinyalign_tiny.py:stage=2,fraction=0.01,lora=qv"
OPTIONS = ("--config.progress=False", "--config.train.learning_rate=0.01", "--config.train.warmup_ratio=0.0",
           "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.eval.batch_size=8",
           "--config.eval.max_batches=1", "--config.eval.vqa=False", "--config.eval.retrieval_diagnostics=False")


def _train(workdir, steps, monkeypatch):
    """Runs `jaxalign train` for `steps` and returns (results summary, the state the loop ended with)."""
    from jaxalign.programs import training

    ended = []
    run_loop = training.run_loop

    def keep_state(*args, **kwargs):
        result = run_loop(*args, **kwargs)
        ended.append(result.state)
        return result

    monkeypatch.setattr(training, "run_loop", keep_state)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["train", "--config", f"{CONFIG},steps={steps}", "--workdir", str(workdir), *OPTIONS]) == 0
    return json.loads(out.getvalue()), ended[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, eight_devices):
    """(workdir, results.json after resuming, the state after 4 steps, the state after 6)."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _, first = _train(workdir, 4, monkeypatch)
        first = jax.tree.map(np.asarray, first)
        _, second = _train(workdir, 6, monkeypatch)
    results = json.loads((workdir / "results.json").read_text())
    return workdir, results, first, jax.tree.map(np.asarray, second)


def _base_params(workdir):
    """The LM and connectors a stage-2 run of the tiny config starts from (before any step)."""
    from jaxalign.align import model as model_lib

    config = load_config(f"{CONFIG},steps=4", OPTIONS)
    tokenizer = setup.load_tokenizer(config, str(workdir), {})
    vision_cfg, _, lm_cfg, lm_params = setup.load_towers(config, tokenizer)
    cfg = setup.model_config(config, vision_cfg, lm_cfg)
    connectors = model_lib.init_connectors(cfg, jax.random.PRNGKey(config.seed),
                                           identity_retrieval=config.model.identity_retrieval_init)
    return lm_cfg, lm_params, connectors


def test_a_lora_run_trains_only_adapters_and_connectors(lora_run):
    workdir, results, first, second = lora_run
    assert results["steps"] == 6 and results["trainable"] == ["connector", "retrieval_connector", "lora"]
    assert results["lora"]["targets"] == list(QV) and results["lora"]["adapter_params"] > 0
    _, lm_params, connectors = _base_params(workdir)
    for state in (first, second):
        # The LM's base weights are exactly the ones the run started from ...
        jax.tree.map(np.testing.assert_array_equal, state.params["lm"], jax.tree.map(np.asarray, lm_params))
        # ... while the adapters' B left zero and the connectors moved.
        adapters = state.params["lora"]["lm"]["layers"]["attention"]
        assert all(np.any(adapters[name]["kernel"]["b"]) for name in ("query", "value"))
        assert not np.allclose(state.params["connector"]["dense_0"]["kernel"], connectors["connector"]["dense_0"]
                               ["kernel"])
    # Resumed from step 4: the steps after it continued from the saved adapters (the loss went on from there).
    assert [step for step, _ in results["loss_history"]][0] > 4
    assert np.isfinite(results["eval"]["loss"])


def test_the_checkpoint_holds_adapters_and_connectors_not_the_lm(lora_run):
    workdir, _, _, second = lora_run
    saved = setup.read_checkpoint_params(str(workdir))
    parts = {name.split("/")[0] for name in saved}
    assert parts == {"connector", "retrieval_connector", "lora"}
    assert sorted(name for name in saved if name.startswith("lora/")) == [
        f"lora/lm/layers/attention/{name}/kernel/{role}" for name in ("query", "value") for role in ("a", "b")]
    np.testing.assert_array_equal(saved["lora/lm/layers/attention/query/kernel/b"],
                                  second.params["lora"]["lm"]["layers"]["attention"]["query"]["kernel"]["b"])


def test_the_exported_lm_is_the_runs_merged_lm(lora_run, tmp_path):
    """`jaxalign hf-export --workdir RUN DEST` writes a Hugging Face folder whose logits are the trained run's (its
    base LM with its final adapters merged), and which differs from the base."""
    workdir, _, _, second = lora_run
    dest = tmp_path / "lm"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["hf-export", "--workdir", str(workdir), str(dest)]) == 0
    summary = json.loads(out.getvalue())
    assert summary["lora"] == list(QV) and summary["restored_params"] == 4
    assert (dest / "tokenizer.json").is_file()
    cfg, exported = hf_lm.load(str(dest))
    lm_cfg, lm_params, _ = _base_params(workdir)
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, lm_cfg.vocab_size)
    run_lm = lora.merge({"lm": lm_params}, second.params["lora"], 16.0 / 8)["lm"]
    expected = decoder.forward(run_lm, lm_cfg, input_ids=ids).logits
    np.testing.assert_allclose(decoder.forward(exported, cfg, input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(decoder.forward(lm_params, lm_cfg, input_ids=ids).logits - expected))) > 1e-4


def test_eval_of_the_checkpoint_restores_the_adapters(lora_run, capsys):
    """`jaxalign eval` rebuilds the run, reads adapters and connectors and merges them: the loss the run reported."""
    workdir, results, _, _ = lora_run
    code = cli.main(["eval", "--config", f"{CONFIG},steps=6", "--workdir", str(workdir), *OPTIONS])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["restored_params"] > 4
    assert summary["eval_loss"] == pytest.approx(results["eval"]["loss"], rel=1e-5)
