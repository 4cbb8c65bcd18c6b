"""Optimizers built from freeze rules: which parameters train, with what, and which stay frozen.

Freezing is data, not code (big_vision's convention). A rule list maps regular expressions over '/'-joined
parameter paths to an optax transformation, or to None for "frozen":

    rules = [("vision/.*", None),            # frozen pretrained tower
             ("lm/.*", None),
             (".*", adamw(schedule))]        # everything else trains

The first rule whose regex fully matches a path wins. A parameter matched by no rule is an error (listing the
unmatched paths), so a renamed parameter can never silently stop training. Frozen leaves get no optimizer state
(they are handled by `optax.set_to_zero`, whose state is empty) and the training step does not differentiate
with respect to them (`split_trainable` / `merge_trainable`).

Public API:
  param_paths(params) -> pytree of 'a/b/kernel' strings
  rule_labels(params, rules) -> pytree of labels ('rule_0', 'rule_1', ..., or 'frozen')
  trainable_mask(params, rules) -> pytree of bools
  build_optimizer(params, rules) -> optax.GradientTransformation
  split_trainable(params, mask) -> (trainable, frozen); merge_trainable(trainable, frozen, mask) -> params
  warmup_length(total_steps, warmup_steps=None, warmup_ratio=0.0) -> checked warm-up steps
  warmup_cosine_schedule(peak_lr, total_steps, warmup_steps=None, warmup_ratio=0.0, end_ratio=0.0)
  adamw(learning_rate, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0) -> GradientTransformation
  weight_decay_mask(params) -> pytree of bools (False for biases and norm scales)
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax

PyTree = Any
Rules = Sequence[tuple[str, "optax.GradientTransformation | None"]]
FROZEN = "frozen"


def _path_to_string(path: tuple) -> str:
    names = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def param_paths(params: PyTree) -> PyTree:
    """The '/'-joined path of every leaf, e.g. {'lm': {'head': {'kernel': 'lm/head/kernel'}}}."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_to_string(path), params)


def rule_labels(params: PyTree, rules: Rules) -> PyTree:
    """Label of every leaf: 'rule_<i>' for the first rule whose regex fully matches its path, or 'frozen'.

    Raises:
      ValueError: if some parameters are matched by no rule (they are listed), or a regex does not compile.
    """
    compiled = []
    for index, (pattern, _) in enumerate(rules):
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"freeze rule {index} has an invalid regex {pattern!r}: {error}") from error
    unmatched: list[str] = []

    def label(path: str) -> str:
        for index, regex in enumerate(compiled):
            if regex.fullmatch(path):
                return FROZEN if rules[index][1] is None else f"rule_{index}"
        unmatched.append(path)
        return FROZEN

    labels = jax.tree.map(label, param_paths(params))
    if unmatched:
        patterns = [pattern for pattern, _ in rules]
        raise ValueError(f"{len(unmatched)} parameter(s) are matched by no freeze rule {patterns}: "
                         f"{unmatched[:20]}{' ...' if len(unmatched) > 20 else ''}. Add a rule for them "
                         "(for example ('.*', None) last to freeze everything else).")
    return labels


def trainable_mask(params: PyTree, rules: Rules) -> PyTree:
    """True for every parameter that a non-None rule trains, False for frozen ones."""
    return jax.tree.map(lambda label: label != FROZEN, rule_labels(params, rules))


def build_optimizer(params: PyTree, rules: Rules) -> optax.GradientTransformation:
    """One optax transformation applying each rule's optimizer to its parameters; frozen ones get none.

    `params` only provides the tree structure and paths (arrays or ShapeDtypeStructs both work). The result's
    `init` must be called on a tree of the same structure.
    """
    labels = rule_labels(params, rules)
    transforms = {f"rule_{index}": transform for index, (_, transform) in enumerate(rules) if transform is not None}
    used = set(jax.tree.leaves(labels))
    transforms = {name: transform for name, transform in transforms.items() if name in used}
    transforms[FROZEN] = optax.set_to_zero()
    return optax.multi_transform(transforms, labels)


def split_trainable(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Splits params into (trainable, frozen), two trees of params' structure with None where a leaf is absent.

    The training step differentiates `loss(merge_trainable(trainable, frozen, mask))` with respect to
    `trainable` only, so no gradient is computed for frozen subtrees.
    """
    trainable = jax.tree.map(lambda keep, leaf: leaf if keep else None, mask, params)
    frozen = jax.tree.map(lambda keep, leaf: None if keep else leaf, mask, params)
    return trainable, frozen


def merge_trainable(trainable: PyTree, frozen: PyTree, mask: PyTree) -> PyTree:
    """Inverse of `split_trainable`: one tree taking trainable leaves from `trainable`, the rest from `frozen`."""
    mask_leaves, treedef = jax.tree.flatten(mask)
    # flatten_up_to takes whatever sits at a leaf position of `mask`, including the None placeholders.
    trainable_leaves = treedef.flatten_up_to(trainable)
    frozen_leaves = treedef.flatten_up_to(frozen)
    return jax.tree.unflatten(treedef, [t if keep else f
                                        for keep, t, f in zip(mask_leaves, trainable_leaves, frozen_leaves)])


def warmup_length(total_steps: int, warmup_steps: int | None = None, warmup_ratio: float = 0.0) -> int:
    """`warmup_steps`, or `round(warmup_ratio * total_steps)` when it is None, checked against the run's length.

    Raises:
      ValueError: for a non-positive `total_steps` or a warm-up outside [0, total_steps].
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps is None:
        warmup_steps = int(round(warmup_ratio * total_steps))
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    return warmup_steps


def warmup_cosine_schedule(peak_lr: float, total_steps: int, warmup_steps: int | None = None,
                           warmup_ratio: float = 0.0, end_ratio: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_lr`, then cosine decay to `end_ratio * peak_lr` at `total_steps`.

    Args:
      peak_lr: learning rate at the end of warm-up.
      total_steps: number of optimizer steps of the whole run.
      warmup_steps: warm-up length; if None, `round(warmup_ratio * total_steps)`.
      warmup_ratio: warm-up length as a fraction of `total_steps` (used when `warmup_steps` is None).
      end_ratio: final learning rate as a fraction of `peak_lr`.
    """
    warmup_steps = warmup_length(total_steps, warmup_steps, warmup_ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=end_ratio * peak_lr)


_NO_DECAY_LEAF_NAMES = ("bias", "scale")


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for leaves that take weight decay: not biases, not norm scales, nothing under a '*norm*' subtree."""
    def decays(path, _leaf) -> bool:
        names = _path_to_string(path).split("/")
        return names[-1] not in _NO_DECAY_LEAF_NAMES and not any("norm" in name.lower() for name in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(learning_rate: float | optax.Schedule, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, clip_norm: float | None = 1.0,
          decay_mask: Callable[[PyTree], PyTree] | None = weight_decay_mask) -> optax.GradientTransformation:
    """AdamW with gradient clipping by global norm (over the parameters this transformation owns).

    Weight decay skips biases and norm scales (`weight_decay_mask`). Inside `build_optimizer` the global norm is
    computed over the parameters of this rule; with the usual single trainable rule that is all trainable ones.
    """
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)
