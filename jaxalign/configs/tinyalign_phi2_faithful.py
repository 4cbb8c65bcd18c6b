"""TinyAlign, faithful mode: the official recipe (SigLIP-so400m/14-384 + Phi-2), to compare with the official code.

What "faithful" keeps (see TINYALIGN.md): token 0 of the SigLIP features dropped (728 image tokens), query =
softmax-mean pooling of 0.4 x image / 0.6 x text (from the measured `text_start`, padding and answers included),
exact top-10 search over a bank built from the stage-1 captions in *both* stages, no leave-one-out, values =
32 x 96 latents of a seeded, never-trained Perceiver, retrieval connector `rag2x_gelu` (96 -> 2560 -> 2560),
lr 1e-3 / 2e-5, cosine with 3% warm-up, no weight decay, max length 3072, bf16 (fp16 in the original).

    jaxalign train --config jaxalign/configs/tinyalign_phi2_faithful.py:stage=1 --workdir runs/phi2/stage1 \\
        --config.model.vision_folder=/models/siglip-so400m-patch14-384 --config.model.lm_folder=/models/phi-2 \\
        --config.data.manual_dir=/data/llava --config.data.data_dir=/data/tfds
    jaxalign train --config jaxalign/configs/tinyalign_phi2_faithful.py:stage=2 --workdir runs/phi2/stage2 \\
        --config.model.init_from=runs/phi2/stage1 (same folders)

The manual directory holds both LLaVA sets: blip_laion_cc_sbu_558k.json with images/ (stage 1 and the bank),
llava_v1_5_mix665k.json with coco/, gqa/, ... (stage 2), and eval.json. Variants: stage=1|2,
retrieval=real|shuffled|constant|off, k=N.

Padding: the official collator pads each batch to its longest sample (TinyLLaVA's `pad_sequence`), and its
finetune script groups samples by length (`--group_by_modality_length True`; its pretrain script does not). Padding
matters more here than for the loss: the faithful query pools every text position up to the end of the padded row,
padding included, so a batch padded to max_length (3072 positions for ~1100 real ones) would give queries made
mostly of copies of the pad embedding. So batches are padded to length buckets (the smallest bucket that holds the
batch's longest spliced sample; jaxalign/data/length_buckets.py) rather than to max_length: 8 buckets, so at most 8
compiled training steps per stage. They sit just above the 728 + 320 image and retrieved positions: stage 1
(captions, ungrouped like the official pretraining) lands in 1088-1152; stage 2 groups windows of 64 batches by
length (the official `group_by_modality_length`) and spreads over the buckets. On synthetic lengths (captions of
~15 tokens; `length_stats.synthetic_mix665k_lengths` for stage 2) about 95% (stage 1) and 90% (stage 2) of the
computed positions are real, against 35% and 38% when padding to 3072. One difference remains: a row's text is
padded to the bucket in spliced positions, which counts the image and retrieval markers as the 728 and 320
positions they stand for, so the query's text slice still holds about 1046 more padding positions than the
official one (which pads the text, markers as one token each, to the batch's longest). The buckets apply to the
training batches only: the bank's keys are built from evaluation-style rows padded to max_length, where the official
script builds each key from one unpadded sample.
"""
from __future__ import annotations

from jaxalign.configs.base import parse_arg
from jaxalign.configs.tinyalign_common import base_config


def get_config(arg: str | None = None):
    arg = parse_arg(arg, stage=1, retrieval="real", k=10)
    c = base_config()
    c.stage = arg.stage
    c.model.source = "hf"
    c.model.dtype = "bfloat16"
    c.model.vision_layer = -2
    c.model.drop_first_vision_token = True      # the official code's inherited CLIP class-token slice
    c.model.connector = "mlp2x_gelu"
    c.model.retrieval_connector = "rag2x_gelu"
    c.model.identity_retrieval_init = False
    c.model.max_length = 3072
    # Not estimated for Phi-2 (2.7B) at 3072 tokens; its LM is 5x Qwen2-0.5B's at 1.5x the length, so its
    # layers recompute everything in the backward pass in both stages (the Qwen2 recipe's stage 2 already needs
    # 'save_dots' at micro-batch 16).
    c.model.attention = "auto"
    c.model.remat = "nothing"

    c.retrieval.control = arg.retrieval
    c.retrieval.mode = "faithful"
    c.retrieval.k = arg.k
    c.retrieval.leave_one_out = False
    c.retrieval.image_weight, c.retrieval.text_weight = 0.4, 0.6
    c.retrieval.search_method = "exact"
    c.retrieval.build_batch_size = 4            # the Perceiver reads all 147,456 pixels of each image
    c.retrieval.perceiver.update(num_latents=32, latent_dim=96, num_self_layers=8, max_text_bytes=512, seed=0)

    c.data.kind = "llava"
    c.data.memory_json, c.data.memory_name, c.data.memory_image_root = (
        "blip_laion_cc_sbu_558k.json", "pretrain", "images")
    if arg.stage == 1:
        c.data.train_json, c.data.train_name, c.data.image_root = "blip_laion_cc_sbu_558k.json", "pretrain", "images"
        c.data.template = "plain"
        c.train.learning_rate, c.train.batch_size = 1e-3, 256
        c.eval.vqa = False
    else:
        c.data.train_json, c.data.train_name, c.data.image_root = "llava_v1_5_mix665k.json", "mix665k", ""
        c.data.template = "phi"
        c.train.learning_rate, c.train.batch_size = 2e-5, 128
    c.data.eval_json, c.data.eval_name = "eval.json", f"eval_stage{arg.stage}"
    c.data.truncate = True
    c.data.length_buckets = (1088, 1120, 1152, 1216, 1280, 1536, 2048, 3072)   # see the module docstring
    c.data.group_by_length = 64 if arg.stage == 2 else 0

    c.train.num_epochs = 1.0
    c.train.warmup_ratio = 0.03
    c.train.weight_decay = 0.0
    c.train.accum_steps = 8
    c.train.log_every = 20
    c.train.checkpoint_every = 1000
    c.eval.batch_size = 32
    c.eval.max_new_tokens = 16
    return c
