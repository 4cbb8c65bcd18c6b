"""jaxalign.train: the generic sharded training engine shared by every trainer.

Modules (one job each):
  optimizer   freeze rules -> optax transformation, trainable masks, schedules, AdamW
  state       TrainState pytree, its shardings and abstract (restore-target) form
  step        the jittable update step (trainable-only gradients, micro-batch accumulation), eval step
  losses      chunked-vocabulary cross-entropy (no [B, T, V] logits) and softmax cross-entropy
  checkpoint  orbax CheckpointManager wrapper (async, keep-last-N, trainable-only saves, restore onto a mesh)
  metrics     metrics.jsonl + TensorBoard writer
  progress    tqdm bar with loss, examples/s and ETA
  loop        `train(...)`: resume, step, log, evaluate, checkpoint, stop on non-finite loss
"""
