"""CLUTRR text student with structured distillation (jaxalign.programs.clutrr_trainer.train_student).

    jaxalign clutrr distill --config jaxalign/configs/clutrr_distill.py --workdir runs/clutrr_student_kd_nce \
        --config.distill.teacher_workdir=runs/clutrr_teacher
    jaxalign clutrr distill --config jaxalign/configs/clutrr_distill.py:variant=alone --workdir runs/alone

Loss: CE + alpha * tau^2 * KL(teacher_tau || student_tau) + beta * InfoNCE(projected latents; temperature)
      [+ entity_weight * FitNets(entity states -> node states) + rkd_weight * RKD(latents)], e.g.
      --config.distill.entity_weight=1.0 --config.distill.rkd_weight=1.0.
Variants (`:key=value,...`): `variant=alone|kd|kd_contrastive` (alpha, beta = 0,0 / 1,0 / 1,0.5),
`student=bilstm|transformer`, `quick` (tiny model, 150 steps), `dataset=<name>`, `data_root=<folder>`.
"""
from __future__ import annotations

from jaxalign.configs.base import ConfigDict, parse_arg
from jaxalign.configs.clutrr_data import data_config, optimisation_and_loop

_VARIANTS = {"alone": (0.0, 0.0), "kd": (1.0, 0.0), "kd_contrastive": (1.0, 0.5)}


def get_config(arg: str | None = None) -> ConfigDict:
    arg = parse_arg(arg, quick=False, variant="kd_contrastive", student="bilstm", dataset="data_089907f8",
                    data_root="../shared/data/clutrr")
    if arg.variant not in _VARIANTS:
        raise ValueError(f"variant={arg.variant!r} is not one of {sorted(_VARIANTS)}")
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
    return config
