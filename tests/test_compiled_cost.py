"""Loop-aware FLOPs and per-device memory of compiled programs (jaxalign.train.compiled_cost)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding
from jaxalign.train import compiled_cost

LAYERS, BATCH, WIDTH = 5, 8, 64
DOT = 2 * BATCH * WIDTH * WIDTH  # one [8, 64] @ [64, 64] product


def _stack(unroll):
    def forward(weights, x):
        def layer(carry, weight):
            return jnp.tanh(carry @ weight), None
        y, _ = jax.lax.scan(layer, x, weights, unroll=unroll)
        return jnp.sum(y @ weights[0].T)
    return forward


ABSTRACT = (jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32), jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32))


def test_scanned_forward_counts_every_layer_where_xla_counts_one():
    compiled = jax.jit(_stack(1)).lower(*ABSTRACT).compile()
    # By hand: one product per layer, and the final one.
    assert compiled_cost.matmul_flops(compiled.as_text()) == (LAYERS + 1) * DOT
    assert compiled.cost_analysis()["flops"] < 3 * DOT  # what the loop-blind count would report


def test_scanned_and_unrolled_forward_agree():
    scanned = jax.jit(_stack(1)).lower(*ABSTRACT).compile()
    unrolled = jax.jit(_stack(True)).lower(*ABSTRACT).compile()
    assert compiled_cost.matmul_flops(scanned.as_text()) == compiled_cost.matmul_flops(unrolled.as_text())
    # XLA's own analysis sees every product once the loop is unrolled; it also counts element-wise work.
    assert np.isclose(compiled_cost.matmul_flops(unrolled.as_text()), unrolled.cost_analysis()["flops"], rtol=0.05)


def test_gradient_program_counts_backward_products_of_every_layer():
    compiled = jax.jit(jax.grad(_stack(1))).lower(*ABSTRACT).compile()
    flops = compiled_cost.matmul_flops(compiled.as_text())
    # Forward 6 products; backward: a weight gradient per layer (5), an input gradient for layers 1..4 (4) and
    # two for the final product. The scan keeps layer 0's input gradient, which nothing uses: 18 or 17.
    assert flops in (17 * DOT, 18 * DOT)


def test_sharded_program_is_counted_per_device(eight_devices):
    mesh = sharding.make_mesh((-1, 1, 1))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "tensor")))
    x = jax.ShapeDtypeStruct((8 * BATCH, WIDTH), jnp.float32, sharding=rows)
    w = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32, sharding=sharding.replicated(mesh))
    compiled = jax.jit(_stack(1)).lower(w, x).compile()
    cost = compiled_cost.program_cost(compiled)
    assert cost.matmul_flops == (LAYERS + 1) * DOT  # each device multiplies its 8 rows
    assert cost.argument_bytes == (LAYERS * WIDTH * WIDTH + BATCH * WIDTH) * 4
    assert cost.peak_bytes == cost.argument_bytes + cost.temp_bytes


def test_text_without_entry_is_rejected():
    try:
        compiled_cost.matmul_flops("HloModule empty\n")
    except ValueError as error:
        assert "ENTRY" in str(error)
    else:
        raise AssertionError("expected a ValueError")
