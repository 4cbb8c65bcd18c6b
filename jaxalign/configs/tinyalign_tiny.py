"""TinyAlign with tiny random towers: CPU runs, tests and smoke checks of every variant.

Stage 1 (captions), then stage 2 (questions) from the stage-1 run, on easy-vqa (built from the `easy-vqa`
package, nothing downloaded):

    jaxalign train --config jaxalign/configs/tinyalign_tiny.py:stage=1 --workdir /tmp/tiny/stage1
    jaxalign train --config jaxalign/configs/tinyalign_tiny.py:stage=2 --workdir /tmp/tiny/stage2 \\
        --config.model.init_from=/tmp/tiny/stage1
    jaxalign eval --config jaxalign/configs/tinyalign_tiny.py:stage=2 --workdir /tmp/tiny/stage2

Variants (`:key=value,...`): retrieval=real|shuffled|shuffle_within_group|constant|oracle|off, k=N,
shuffle_group=auto|question_type|answer_type|wording, fraction=0.4, mode=default|faithful, data=easy_vqa|llava
(llava: also --config.data.manual_dir=DIR --config.data.data_dir=DIR, JSON files captions.json / questions.json /
eval.json as the tests write them), steps=N, leave_out=none|self|group,
memory_fraction=same|1.0 (the paper's 40% setting: `fraction=0.4,memory_fraction=1.0,leave_out=group`),
lora=off|qv|all (stage 2 with LoRA adapters on the LM's query / value kernels or every projection, the LM frozen;
`tinyalign_common.LORA_TARGETS`; or any regexes: --config.model.lora.targets="('lm/layers/mlp/up/kernel',)"):

    jaxalign train --config jaxalign/configs/tinyalign_tiny.py:stage=2,lora=qv --workdir /tmp/tiny/stage2_lora \\
        --config.model.init_from=/tmp/tiny/stage1
    jaxalign hf-export --workdir /tmp/tiny/stage2_lora /tmp/tiny/stage2_lora_lm   # the LM, adapters merged
"""
from __future__ import annotations

from jaxalign.configs.base import parse_arg
from jaxalign.configs.tinyalign_common import base_config, lora_targets


def get_config(arg: str | None = None):
    arg = parse_arg(arg, stage=1, retrieval="real", k=2, fraction=1.0, mode="default", data="easy_vqa", steps=40,
                    leave_out="self", memory_fraction="same", shuffle_group="auto", lora="off")
    c = base_config()
    c.stage = arg.stage
    c.mesh = (-1, 1, 1)
    c.model.source = "random"
    c.model.max_length = 64
    c.model.remat = "none"         # tiny towers: memory is no concern, recomputing would only cost time
    c.model.connector = "mlp2x_gelu"
    c.model.drop_first_vision_token = arg.mode == "faithful"
    c.model.lora.targets = lora_targets(arg.lora)

    c.retrieval.control = arg.retrieval
    c.retrieval.mode = arg.mode
    c.retrieval.k = arg.k
    c.retrieval.value_length = 4
    c.retrieval.leave_out = arg.leave_out
    c.retrieval.memory_fraction = arg.memory_fraction
    c.retrieval.shuffle_group = arg.shuffle_group
    if arg.mode == "faithful":
        c.model.retrieval_connector = "rag2x_gelu"
        c.model.identity_retrieval_init = False
        c.retrieval.perceiver.update(num_latents=4, latent_dim=16, num_self_layers=1, max_text_bytes=32)

    c.data.kind = arg.data
    c.data.fraction = arg.fraction
    if arg.data == "easy_vqa":
        c.data.train_config = "captions" if arg.stage == 1 else "questions"
        c.data.eval_config = "captions" if arg.stage == 1 else "questions"
    else:
        c.data.train_json = "captions.json" if arg.stage == 1 else "questions.json"
        c.data.train_name = "captions" if arg.stage == 1 else "questions"
        c.data.eval_json = "captions_eval.json" if arg.stage == 1 else "eval.json"
        c.data.eval_name = "captions_eval" if arg.stage == 1 else "eval"
    c.data.template = "plain" if arg.stage == 1 else "qwen2"

    c.train.batch_size = 8
    c.train.total_steps = arg.steps
    c.train.learning_rate = 3e-3 if arg.stage == 1 else 1e-3
    c.train.log_every = 5
    c.train.checkpoint_every = 20

    c.eval.batch_size = 16
    c.eval.max_batches = 4
    c.eval.max_new_tokens = 4
    c.eval.vqa = arg.stage == 2   # the stage-1 template drops the question text: no VQA there
    return c
