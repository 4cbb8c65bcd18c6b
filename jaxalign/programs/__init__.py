"""Whole runs wired from the library: where a run starts (`startup`), the shared training set-up (`training`),
the TinyAlign trainer (`tinyalign_setup`, `tinyalign_trainer`), one question to a trained run (`predict`), the
CLUTRR trainers (`clutrr_trainer`), the demo's tower pretraining (`pretrain_towers`) and the demo itself (`demo`).

Programs import the library and never the command line (`jaxalign.commands`, `jaxalign.cli`); the library never
imports a program (tests/test_layout.py).
"""
