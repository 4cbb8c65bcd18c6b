"""The GNN teacher: padding, node order and batching never change its predictions; edge types matter."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxalign.models import gnn

TINY = dict(num_relations=5, hidden=16, num_layers=2, num_classes=4, max_nodes=6, max_edges=6, num_heads=2)


def _graph(rng, num_nodes, num_edges, max_nodes, max_edges, num_relations=5):
    """One random graph padded to (max_nodes, max_edges): a path from node 0 to the last node plus extra edges."""
    senders = list(range(num_nodes - 1))
    receivers = list(range(1, num_nodes))
    while len(senders) < num_edges:
        a, b = rng.choice(num_nodes, 2, replace=False)
        senders.append(a)
        receivers.append(b)
    graph = {"node_mask": np.zeros(max_nodes, bool), "senders": np.zeros(max_edges, np.int32),
             "receivers": np.zeros(max_edges, np.int32), "edge_types": np.zeros(max_edges, np.int32),
             "edge_mask": np.zeros(max_edges, bool), "source": np.int32(0), "target": np.int32(num_nodes - 1)}
    graph["node_mask"][:num_nodes] = True
    graph["senders"][:num_edges] = senders
    graph["receivers"][:num_edges] = receivers
    graph["edge_types"][:num_edges] = rng.integers(0, num_relations, num_edges)
    graph["edge_mask"][:num_edges] = True
    return graph


def _stack(graphs):
    return {key: np.stack([g[key] for g in graphs]) for key in graphs[0]}


def _repad(graph, max_nodes, max_edges):
    """The same graph in a larger budget, with junk (masked) values in the padding slots."""
    out = {}
    for key, value in graph.items():
        if value.ndim == 0:
            out[key] = value
            continue
        size = max_nodes if key == "node_mask" else max_edges
        junk = 0 if value.dtype == bool else 3
        out[key] = np.concatenate([value, np.full(size - len(value), junk, value.dtype)])
    return out


@pytest.fixture(scope="module", params=["gin", "gat"])
def model(request):
    config = gnn.GNNConfig(kind=request.param, **TINY)
    big = dataclasses.replace(config, max_nodes=9, max_edges=10)
    params = gnn.init(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    graphs = [_graph(rng, n, e, 6, 6) for n, e in [(3, 2), (4, 5), (6, 6), (5, 4)]]
    return config, big, params, graphs, jax.jit(gnn.apply, static_argnums=2)


def test_padding_budget_does_not_change_predictions(model):
    config, big, params, graphs, apply = model
    small_out = apply(params, _stack(graphs), config)
    big_out = apply(params, _stack([_repad(g, 9, 10) for g in graphs]), big)
    np.testing.assert_allclose(small_out.logits, big_out.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small_out.latent, big_out.latent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(big_out.node_states[:, 6:], 0.0)
    assert np.all(np.isfinite(np.asarray(small_out.logits)))


def test_node_and_edge_order_do_not_change_predictions(model):
    config, _, params, graphs, apply = model
    rng = np.random.default_rng(1)
    permuted = []
    node_perms = []
    for g in graphs:
        new_of_old = rng.permutation(config.max_nodes)                  # padding slots move too
        edge_order = rng.permutation(config.max_edges)
        p = {"node_mask": np.zeros_like(g["node_mask"])}
        p["node_mask"][new_of_old] = g["node_mask"]
        for key in ("senders", "receivers"):
            p[key] = new_of_old[g[key]][edge_order].astype(np.int32)
        p["edge_types"], p["edge_mask"] = g["edge_types"][edge_order], g["edge_mask"][edge_order]
        p["source"], p["target"] = np.int32(new_of_old[g["source"]]), np.int32(new_of_old[g["target"]])
        permuted.append(p)
        node_perms.append(new_of_old)
    original, moved = apply(params, _stack(graphs), config), apply(params, _stack(permuted), config)
    np.testing.assert_allclose(original.logits, moved.logits, rtol=1e-5, atol=1e-5)
    for b, new_of_old in enumerate(node_perms):
        np.testing.assert_allclose(original.node_states[b], moved.node_states[b][new_of_old], rtol=1e-5, atol=1e-5)


def test_batch_matches_single_examples_and_edge_types_matter(model):
    config, _, params, graphs, apply = model
    batched = apply(params, _stack(graphs), config)
    for b, g in enumerate(graphs):
        single = apply(params, _stack([g]), config)
        np.testing.assert_allclose(batched.logits[b], single.logits[0], rtol=1e-5, atol=1e-5)
    changed = dict(graphs[1], edge_types=(graphs[1]["edge_types"] + 1) % 5)
    assert np.abs(np.asarray(apply(params, _stack([changed]), config).logits[0] - batched.logits[1])).max() > 1e-4
    # Source and target swap: the query is directed, so the answer must be able to change.
    swapped = dict(graphs[1], source=graphs[1]["target"], target=graphs[1]["source"])
    assert np.abs(np.asarray(apply(params, _stack([swapped]), config).logits[0] - batched.logits[1])).max() > 1e-4


def test_gradients_are_finite_with_isolated_and_padded_nodes(model):
    config, _, params, graphs, _ = model
    batch = _stack(graphs)
    batch["edge_mask"][0] = False                                      # a graph with no edges at all

    def loss(p):
        return jax.numpy.sum(gnn.apply(p, batch, config).logits ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
    assert np.abs(np.asarray(grads["edge_embedding"])).sum() > 0


def test_random_node_features_need_a_key_and_change_with_it():
    config = gnn.GNNConfig(kind="gin", random_features=4, **TINY)
    params = gnn.init(config, jax.random.key(2))
    batch = _stack([_graph(np.random.default_rng(3), 4, 4, 6, 6)])
    with pytest.raises(ValueError, match="pass rng=key"):
        gnn.apply(params, batch, config)
    apply = jax.jit(gnn.apply, static_argnums=2)
    first = apply(params, batch, config, jax.random.key(0)).logits
    again = apply(params, batch, config, jax.random.key(0)).logits
    other = apply(params, batch, config, jax.random.key(1)).logits
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first - other)).max() > 1e-5


def test_config_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'gin' or 'gat'"):
        gnn.GNNConfig(kind="gcn")
