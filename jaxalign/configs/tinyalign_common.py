"""Defaults shared by the TinyAlign configs (`tinyalign_tiny.py`, `tinyalign_qwen2.py`,
`tinyalign_phi2_faithful.py`); not a config itself. Every field is documented here once."""
from __future__ import annotations

import ml_collections

# Named LoRA target sets (`model.lora.targets`; the configs' `lora=` variant): regexes over '/'-joined LM parameter
# paths ('lm/layers/attention/query/kernel': the decoder's own names, jaxalign/models/decoder.py).
LORA_TARGETS = {
    "off": (),
    "qv": ("lm/layers/attention/(query|value)/kernel",),   # the LoRA paper's choice
    "all": ("lm/layers/attention/(query|key|value|output)/kernel",  # every projection (LLaVA-1.5's LoRA)
            "lm/layers/mlp/(gate|up|down)/kernel"),
}


def lora_targets(name: str) -> tuple[str, ...]:
    """The regexes of a named LoRA target set (a config's `lora=` variant)."""
    if name not in LORA_TARGETS:
        raise ValueError(f"config argument lora={name!r}: expected one of {sorted(LORA_TARGETS)} (or set "
                         "--config.model.lora.targets to regexes)")
    return LORA_TARGETS[name]


def base_config() -> ml_collections.ConfigDict:
    """Every field a TinyAlign run reads (`jaxalign.programs.tinyalign_trainer`), with neutral defaults."""
    c = ml_collections.ConfigDict()
    c.stage = 1                    # 1: connectors only; 2: connectors + LM or its LoRA adapters (model.lora);
    #                                train.trainable overrides
    c.seed = 0                     # connector init, data order and the step keys
    c.mesh = (-1, 1, 1)            # (data, fsdp, tensor); -1 takes the remaining devices
    c.progress = True              # progress bars (shown only on a terminal)

    c.model = ml_collections.ConfigDict()
    c.model.source = "hf"          # 'hf': local Hugging Face folders; 'random': tiny random towers
    c.model.vision_folder = ""     # SigLIP / CLIP snapshot folder (source 'hf')
    c.model.lm_folder = ""         # LM snapshot folder with tokenizer.json (source 'hf')
    c.model.random_seed = 0        # source 'random': seed of the towers (kept across stages)
    c.model.random_vision = ml_collections.ConfigDict(dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    c.model.random_lm = ml_collections.ConfigDict(dict(
        family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2))
    c.model.dtype = "float32"      # compute dtype: 'float32' or 'bfloat16'
    c.model.vision_layer = -2      # vision features fed to the connector (Hugging Face hidden_states index)
    c.model.drop_first_vision_token = False
    c.model.connector = "mlp2x_gelu"            # 'linear', 'mlp{N}x_gelu' or 'resampler'
    c.model.resampler_latents = 64
    c.model.resampler_heads = 8
    c.model.retrieval_connector = "linear"      # token values: 'linear' (identity init) or 'mlp2x_gelu'
    c.model.identity_retrieval_init = True      # start the linear retrieval connector as the identity
    c.model.max_length = 512       # LM sequence length after splicing image and retrieved tokens
    c.model.loss_chunk_size = 8192
    c.model.attention = "auto"     # kernel of LM and tower: auto | einsum | xla | chunked | cudnn | splash
    c.model.remat = "none"         # LM layer stack: none | save_dots | nothing | offload (jaxalign.models.layers)
    c.model.vision_remat = "none"  # tower layer stack (frozen, no gradient: recomputing it saves nothing)
    c.model.init_from = ""         # a previous stage's workdir: its trained params initialise this run
    # LoRA (jaxalign/train/lora.py, jaxalign/programs/tinyalign_lora.py): low-rank adapters W + alpha/rank A B on
    # the LM kernels whose '/'-joined paths a regex in `targets` fully matches (a regex matching nothing is an
    # error); () is off. On, the LM's base weights stay frozen (in the compute dtype) and the adapters train in
    # its place, with the connectors: only they are checkpointed, and evaluation, predict and `jaxalign hf-export
    # --workdir` see the adapters merged into the LM. For a run that trains the LM (stage 2). Named sets:
    # LORA_TARGETS above. `rank`: r of A [in, r] and B [r, out]; `alpha`: the product's scale is alpha / rank.
    c.model.lora = ml_collections.ConfigDict(dict(targets=(), rank=8, alpha=16.0))

    c.retrieval = ml_collections.ConfigDict()
    # 'real'; the controls (jaxalign/align/controls.py): 'shuffled' (values of a fixed global permutation of the
    # bank rows), 'shuffle_within_group' (a permutation within `shuffle_group`), 'constant' (the value of
    # `constant_row` everywhere), 'oracle' (every slot holds the sample's own answer / caption: the upper bound);
    # 'off' (no retrieval: the TinyLLaVA baseline)
    c.retrieval.control = "real"
    c.retrieval.mode = "default"   # 'default' (fixed recipe) or 'faithful' (official code)
    c.retrieval.k = 3
    c.retrieval.value_length = 8   # default mode: answer / caption tokens per value
    # What a training sample may not retrieve: 'none'; 'self' (its own entry); 'group' (every entry of its group,
    # `group_by`, as at test time, when no record of the same image is in the bank). Faithful mode: 'none'.
    c.retrieval.leave_out = "self"
    c.retrieval.leave_one_out = True  # the older switch: False means leave_out 'none'
    c.retrieval.group_by = "image"  # a group: the records of one image (easy-vqa image_id, LLaVA image file);
    #                                 '' computes no groups (then no 'group', no 'same_group_retrieved' metric)
    # The bank's share of its source: 'same' (the share the run trains on, data.fraction, for a bank of the
    # training data; all of a separate memory source) or a number in (0, 1] whatever data.fraction is (1.0: the
    # memory stays fixed while the fine-tuning data shrinks). Bank ids are source rows either way, so
    # leave-one-out lines up. A string from the command line ('1.0') is read as the number.
    c.retrieval.memory_fraction = ml_collections.FieldReference("same", field_type=object)
    c.retrieval.image_weight = 0.4
    c.retrieval.text_weight = 0.6
    # What default-mode keys and queries are made from: 'towers' (the weights above) or 'silhouette' (easy-vqa
    # only: the image's hand-made shape outline and colour, `jaxalign.align.silhouette`; weights unused).
    c.retrieval.key_encoder = "towers"
    c.retrieval.text_start = 35    # faithful mode: fallback query text start (measured per sample otherwise)
    c.retrieval.search_method = "exact"
    c.retrieval.shuffle_seed = 0   # 'shuffled' / 'shuffle_within_group': seed of the fixed permutation
    # 'shuffle_within_group': a bank row's value moves only to rows of its group: 'question_type' (easy-vqa
    # questions' field), 'answer_type' (yes/no vs other; works for captions and LLaVA too) or 'wording' (the
    # question with its colour and shape words blanked); 'auto': question_type when the memory source's records
    # have it, else answer_type (a captions bank is then one group). Rows alone in their group keep their value;
    # the results' memory.shuffle says which grouping ran and how many rows were alone.
    c.retrieval.shuffle_group = "auto"
    c.retrieval.constant_row = 0   # 'constant': the bank row (storage order) whose value every slot gets
    c.retrieval.memory_dir = ""    # default: <workdir>/memory; share one bank between runs by naming it
    c.retrieval.build_batch_size = 32
    c.retrieval.perceiver = ml_collections.ConfigDict(dict(
        num_latents=32, latent_dim=96, num_self_layers=8, max_text_bytes=512, seed=0))

    c.data = ml_collections.ConfigDict()
    c.data.kind = "llava"          # 'easy_vqa' or 'llava'
    c.data.data_dir = ""           # tfds data directory (easy_vqa: default ~/.cache/jaxalign/tfds)
    c.data.train_config = "captions"  # easy_vqa: 'captions' (stage 1) or 'questions' (stage 2)
    c.data.train_split = "train"
    c.data.eval_config = "questions"
    c.data.memory_config = ""      # easy_vqa: config the bank is built from ('' = the training data)
    c.data.eval_split = "test"
    c.data.manual_dir = ""         # llava: folder with the JSON files and images
    c.data.image_root = ""         # llava: image paths are relative to manual_dir/image_root
    c.data.train_json = "blip_laion_cc_sbu_558k.json"
    c.data.train_name = "train"    # llava: tfds config name of the training JSON
    c.data.eval_json = "eval.json"
    c.data.eval_name = "eval"
    c.data.eval_image_root = ""
    c.data.memory_json = ""        # llava: JSON the bank is built from ('' = the training data); leave_out
    c.data.memory_name = "memory"  #   'self' applies only to a bank of the training data, 'group' to any bank
    c.data.memory_image_root = ""
    c.data.template = "plain"      # chat template (jaxalign.data.chat_templates.TEMPLATES)
    c.data.insert_retrieval = True  # put the <rag> sentinel after <image> (retrieval runs only)
    c.data.fraction = 1.0          # share of the training data (the bank's: retrieval.memory_fraction)
    c.data.fraction_seed = 0
    c.data.truncate = False        # cut over-long samples instead of skipping (and reporting) them
    c.data.pad_to_square = False
    c.data.fail_fast = False       # raise at the first bad sample instead of skipping and reporting it
    c.data.length_buckets = ()     # pad each training batch to the smallest of these lengths that holds its
    #                                longest sample (model.max_length is always the last; one compile per bucket);
    #                                () pads every batch to model.max_length (jaxalign/data/length_buckets.py)
    c.data.cache_samples = False   # keep processed training samples in memory after their first epoch (small
    #                                data over many epochs: the demo; pipeline.make_vqa_dataset(cache_samples))
    c.data.share_sample_cache = False  # keep them for the whole process instead, shared by every run over the
    #                                same records and spec (many runs in one process: the demo's 28)
    c.data.group_by_length = 0     # batches per window sorted by length before batching (LLaVA's
    #                                group_by_modality_length), so that buckets fill up; 0: no grouping

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32        # global batch
    c.train.total_steps = 0        # 0: num_epochs over the selected data
    c.train.num_epochs = 1.0
    c.train.learning_rate = 1e-3
    c.train.warmup_ratio = 0.03
    c.train.end_lr_ratio = 0.0
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0
    c.train.accum_steps = 1
    c.train.trainable = ()         # empty: the stage's default parts
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.eval_every = 0         # 0: evaluate at the end only

    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = True
    c.eval.loss = True
    c.eval.vqa = True
    c.eval.batch_size = 32
    c.eval.max_batches = 0         # 0: the whole eval set
    c.eval.max_new_tokens = 8
    c.eval.fraction = 1.0
    c.eval.retrieval_diagnostics = True  # retrieval runs: eval.retrieval_precision (test / train / key ceiling)
    c.eval.diagnostic_batches = 0  # batches of training queries the diagnostics search (0: as eval.max_batches)
    return c
