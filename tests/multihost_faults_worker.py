"""One process of the multi-process fault checks (run by tests/test_train_faults.py, not collected by pytest).

  multihost_faults_worker.py WORKDIR TOTAL_STEPS [--sigterm-at-step K] [--sigkill-process P --at-step K]
                             [--also-straight DIR]

Two processes x 4 fake CPU devices train a tiny regression with `jaxalign.train.loop.train` on one 8-device
mesh, each feeding its half of every global batch. `--sigterm-at-step K`: every process sends itself SIGTERM
just before step K (a scheduler preempting the whole job). `--sigkill-process P --at-step K`: process P kills
itself with SIGKILL just before step K (a lost host); the others then run on into a collective.
`--also-straight DIR`: after the run, the same processes train once more from scratch, uninterrupted, in DIR
(the reference for an exact resume, without starting two more processes). The last line of each process's log
is a JSON summary.
"""
import argparse
import itertools
import json
import logging
import os
import signal
import sys
import time

from jaxalign import distributed

assert distributed.initialize_from_environment(), "the launcher did not set JAXALIGN_COORDINATOR"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxalign import sharding  # noqa: E402
from jaxalign.train import optimizer as opt_lib  # noqa: E402
from jaxalign.train.loop import TrainingPreempted, train  # noqa: E402
from jaxalign.train.state import create_train_state, state_shardings  # noqa: E402
from jaxalign.train.step import jit_train_step, make_train_step  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("total_steps", type=int)
parser.add_argument("--sigterm-at-step", type=int)
parser.add_argument("--sigkill-process", type=int)
parser.add_argument("--at-step", type=int)
parser.add_argument("--also-straight")
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
process = jax.process_index()


def loss_fn(params, batch, rng):
    loss = jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)
    return loss, {}


def local_batch(index):
    """This process's 8 rows of global batch `index` (16 rows in all)."""
    rng = np.random.default_rng(1000 + index)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = (x @ np.arange(1.0, 5.0, dtype=np.float32)[:, None]).astype(np.float32)
    rows = slice(8 * process, 8 * process + 8)
    return {"x": x[rows], "y": y[rows]}


mesh = sharding.make_mesh((-1, 1, 1))
params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros((1,))}
rules = [(".*", optax.adam(0.1))]
optimizer = opt_lib.build_optimizer(params, rules)
state = create_train_state(params, optimizer, jax.random.PRNGKey(0))
shardings = state_shardings(state, {"w": P(), "b": P()}, mesh)
step_fn = jit_train_step(make_train_step(loss_fn, optimizer, opt_lib.trainable_mask(params, rules)), mesh,
                         shardings, sharding.batch_sharding(mesh, 1))


def batches_from(start):
    for index in itertools.count(start):
        step = index + 1  # batch `index` is consumed by step index + 1
        if args.sigterm_at_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        if args.sigkill_process == process and args.at_step == step:
            print(json.dumps({"process": process, "killing_myself_before_step": step, "time": time.time()}),
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if args.sigkill_process is not None or args.sigterm_at_step is not None:
            # Slow steps, as on a cluster: JAX's preemption protocol settles on a step a little after the notice,
            # and the survivor of a kill should meet the dead process inside a step.
            time.sleep(0.2)
        yield sharding.global_batch(local_batch(index), mesh)


def run(workdir):
    fresh_state = jax.device_put(create_train_state(params, optimizer, jax.random.PRNGKey(0)), shardings)
    result = train(state=fresh_state, train_step=step_fn,
                   batch_iterator_factory=batches_from, total_steps=args.total_steps, workdir=workdir, log_every=1,
                   checkpoint_every=4, keep=3, progress=False)
    replicated = jax.jit(lambda tree: tree, out_shardings=sharding.replicated(mesh))(result.state.params)
    return {"step": int(result.state.step),
            "params": {name: np.asarray(value.addressable_data(0)).ravel().tolist() for name, value in
                       replicated.items()},
            "history": [[record["step"], record["loss"]] for record in result.history]}


try:
    summary = {"process": process, **run(args.workdir)}
except TrainingPreempted as preempted:
    print(json.dumps({"process": process, "preempted_at": preempted.step, "message": str(preempted)}), flush=True)
    raise
if args.also_straight:
    summary["straight"] = run(args.also_straight)
print(json.dumps(summary), flush=True)
sys.exit(0)
