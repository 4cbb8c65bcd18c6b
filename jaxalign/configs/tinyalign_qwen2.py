"""TinyAlign, default (fixed) mode: SigLIP-so400m/14-384 + Qwen2-0.5B, LLaVA-format data, local folders only.

Stage 1 (LLaVA-Pretrain captions; connector and retrieval connector train), then stage 2 (LLaVA-v1.5 mix;
connectors and LM train) from the stage-1 run:

    jaxalign train --config jaxalign/configs/tinyalign_qwen2.py:stage=1 --workdir runs/qwen2/stage1 \\
        --config.model.vision_folder=/models/siglip-so400m-patch14-384 \\
        --config.model.lm_folder=/models/Qwen2-0.5B-Instruct \\
        --config.data.manual_dir=/data/LLaVA-Pretrain --config.data.data_dir=/data/tfds
    jaxalign train --config jaxalign/configs/tinyalign_qwen2.py:stage=2 --workdir runs/qwen2/stage2 \\
        --config.model.init_from=runs/qwen2/stage1 (same model folders) \\
        --config.data.manual_dir=/data/llava-v1.5-mix665k --config.data.data_dir=/data/tfds

Evaluation data: a LLaVA-format JSON `eval.json` in each manual directory (questions with one short reference
answer each); LLaVA JSON has no question types, so VQA accuracy is reported overall.
Variants (`:key=value,...`): stage=1|2, retrieval=real|shuffled|constant|off (off = the TinyLLaVA baseline),
k=N, fraction=0.4 (share of the training data; the bank uses the same share), lora=off|qv|all (stage 2 trains LoRA
adapters, rank 128 and alpha 256 at learning rate 2e-4 as LLaVA-1.5's LoRA recipe, on the query / value kernels
or every projection; the LM stays frozen in bfloat16; `jaxalign hf-export --workdir RUN DEST` writes the merged LM).
"""
from __future__ import annotations

from jaxalign.configs.base import parse_arg
from jaxalign.configs.tinyalign_common import base_config, lora_targets


def get_config(arg: str | None = None):
    arg = parse_arg(arg, stage=1, retrieval="real", k=3, fraction=1.0, lora="off")
    c = base_config()
    c.stage = arg.stage
    c.mesh = (-1, 1, 1)            # data parallel; use (1, -1, 1) to shard params and optimizer state (FSDP)
    c.model.source = "hf"
    c.model.dtype = "bfloat16"
    c.model.vision_layer = -2      # LLaVA / TinyLLaVA: second-to-last SigLIP layer, all 729 patches
    c.model.connector = "mlp2x_gelu"
    c.model.retrieval_connector = "linear"
    c.model.identity_retrieval_init = True
    c.model.max_length = 2048
    c.model.loss_chunk_size = 16384   # Qwen2 vocabulary 151,936: 10 chunks
    # Memory per device (`bench/train_step.py --estimate --explore`, 8 devices, 2048 tokens, bench/RESULTS.md):
    # attention never keeps T x T probabilities ('auto': cuDNN flash on GPU, splash on TPU, chunked elsewhere).
    # Stage 1 (micro-batch 8) peaks at 54 GiB without remat, so it recomputes nothing. Stage 2 would peak at
    # 134 GiB at micro-batch 16 without remat; keeping only the weight products ('save_dots') gives 25 GiB at
    # micro-batch 4 and 59 GiB at 16, for 4% more FLOPs ('nothing': 16 / 23 GiB, 16% more FLOPs).
    c.model.attention = "auto"
    c.model.remat = "none" if arg.stage == 1 else "save_dots"
    c.model.vision_remat = "none"  # the tower is frozen under stop-gradient: nothing of it is kept for backward

    c.retrieval.control = arg.retrieval
    c.retrieval.mode = "default"
    c.retrieval.k = arg.k
    c.retrieval.value_length = 32  # a neighbour's caption / short answer in Qwen2 tokens
    c.retrieval.search_method = "auto"
    c.retrieval.build_batch_size = 64

    c.data.kind = "llava"
    c.data.fraction = arg.fraction
    if arg.stage == 1:
        c.data.train_json, c.data.train_name, c.data.image_root = "blip_laion_cc_sbu_558k.json", "pretrain", "images"
        c.data.template = "plain"
        c.train.learning_rate, c.train.batch_size = 1e-3, 256
        c.eval.vqa = False         # the caption template has no question: loss only
    else:
        c.data.train_json, c.data.train_name, c.data.image_root = "llava_v1_5_mix665k.json", "mix665k", ""
        c.data.template = "qwen2"
        c.train.learning_rate, c.train.batch_size = 2e-5, 128
    c.model.lora.targets = lora_targets(arg.lora)
    if c.model.lora.targets:
        c.model.lora.rank, c.model.lora.alpha = 128, 256.0
        c.train.learning_rate = 2e-4
    c.data.eval_json, c.data.eval_name = "eval.json", f"eval_stage{arg.stage}"
    c.data.truncate = True         # LLaVA's own behaviour for the few over-long conversations
    # Less padding: mix665k is mostly 729 image + 96 retrieved + ~100 text positions. Dense buckets around
    # 900-1150, windows of 64 sorted batches: ~92% of computed tokens are real on mix665k-like lengths at global
    # batch 128 and 256 (47% padded to 2048); 8 buckets, 8 compiles (jaxalign/data/length_buckets.py,
    # `bench/train_step.py --estimate` prints the share).
    c.data.length_buckets = (512, 896, 960, 1024, 1152, 1280, 1536, 2048)
    c.data.group_by_length = 64

    c.train.num_epochs = 1.0
    c.train.warmup_ratio = 0.03
    c.train.accum_steps = 4        # micro-batches of batch_size / 4 per device group
    c.train.log_every = 20
    c.train.checkpoint_every = 1000
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 16
    return c
