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


# ------------------------------------------------------------------- by-hand NumPy reference of the layers
# Written from the papers' equations and gnn.py's docstring, not from its code: edges are lists of real
# (sender, receiver, type) triples (padding is never listed, rather than masked), and every node is a loop.

def _np_dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _np_layer_norm(p, x, eps=1e-5):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _np_feed_forward(p, x):
    return _np_dense(p["mlp_out"], np.maximum(_np_dense(p["mlp_in"], x), 0.0))


def _np_gin_layer(p, h, edges, edge_embedding):
    """GINE (Hu et al. 2020): h_i <- LN(h_i + MLP((1 + eps) h_i + sum_{j -> i} ReLU(h_j + W e_ji)))."""
    out = np.zeros_like(h)
    for i in range(len(h)):
        incoming = np.zeros(h.shape[1])
        for j, receiver, edge_type in edges:
            if receiver == i:
                incoming += np.maximum(h[j] + _np_dense(p["edge"], edge_embedding[edge_type]), 0.0)
        out[i] = _np_layer_norm(p["norm"], h[i] + _np_feed_forward(p, (1.0 + p["eps"]) * h[i] + incoming))
    return out


def _np_gat_layer(p, h, edges, edge_embedding, num_heads):
    """Edge-aware GAT (Velickovic et al. 2018), per head k and edge j -> i of type t:
    logit = LeakyReLU_0.2(a_recv . z_i + a_send . z_j + a_edge . w_t) with z = W h, w = W_e e; attention is the
    softmax of the logits over i's incoming edges; message = sum attention * (z_j + w_t); heads concatenated,
    then h <- LN(h + W_o message) and h <- LN(h + MLP(h)). A node without incoming edges gets message 0."""
    width = h.shape[1]
    head_dim = width // num_heads
    z = _np_dense(p["node"], h).reshape(len(h), num_heads, head_dim)
    out = np.zeros_like(h)
    for i in range(len(h)):
        message = np.zeros((num_heads, head_dim))
        for k in range(num_heads):
            logits, values = [], []
            for j, receiver, edge_type in edges:
                if receiver != i:
                    continue
                w = _np_dense(p["edge"], edge_embedding[edge_type]).reshape(num_heads, head_dim)[k]
                logit = p["attend_receiver"][k] @ z[i, k] + p["attend_sender"][k] @ z[j, k] + p["attend_edge"][k] @ w
                logits.append(logit if logit > 0 else 0.2 * logit)
                values.append(z[j, k] + w)
            if logits:
                attention = np.exp(np.array(logits) - max(logits))
                attention /= attention.sum()
                message[k] = attention @ np.array(values)
        state = _np_layer_norm(p["norm"], h[i] + _np_dense(p["output"], message.reshape(width)))
        out[i] = _np_layer_norm(p["mlp_norm"], state + _np_feed_forward(p, state))
    return out


def _np_gnn(params, graph, config):
    """node_states [N, H], latent [3H], logits [classes] of one padded graph, by hand (float64)."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    real_nodes = np.flatnonzero(graph["node_mask"])
    edges = []
    for a, b, r, real in zip(graph["senders"], graph["receivers"], graph["edge_types"], graph["edge_mask"]):
        if real:                             # story edge a -> b of relation r, and b -> a of relation r + R
            edges.append((a, b, r))
            if config.reverse_edges:
                edges.append((b, a, r + config.num_relations))
    h = np.zeros((config.max_nodes, config.hidden))
    h[real_nodes] = params["node_embedding"]
    for layer in range(config.num_layers):
        p = jax.tree.map(lambda x: x[layer], params["layers"])
        if config.kind == "gin":
            h = _np_gin_layer(p, h, edges, params["edge_embedding"])
        else:
            h = _np_gat_layer(p, h, edges, params["edge_embedding"], config.num_heads)
        h[np.setdiff1d(np.arange(config.max_nodes), real_nodes)] = 0.0
    latent = np.concatenate([h[real_nodes].mean(0), h[graph["source"]], h[graph["target"]]])
    hidden = np.maximum(_np_dense(params["classifier"]["hidden"], latent), 0.0)
    return h, latent, _np_dense(params["classifier"]["output"], hidden)


def _reference_graphs():
    """Two graphs in a budget of 7 nodes and 8 edges: padding nodes, padding edges with junk that points at real
    nodes, an isolated real node, parallel edges of different types, a node with several incoming edges."""
    first = {"node_mask": np.array([1, 1, 1, 1, 1, 0, 0], bool),
             "senders": np.array([0, 1, 2, 0, 1, 3, 1, 2], np.int32),
             "receivers": np.array([1, 2, 3, 2, 2, 1, 2, 0], np.int32),
             "edge_types": np.array([0, 1, 2, 1, 2, 0, 2, 1], np.int32),
             "edge_mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], bool), "source": np.int32(0), "target": np.int32(3)}
    second = {"node_mask": np.array([1, 1, 1, 0, 0, 0, 0], bool),
              "senders": np.array([2, 2, 0, 0, 0, 0, 0, 0], np.int32),
              "receivers": np.array([1, 1, 1, 2, 1, 0, 0, 0], np.int32),
              "edge_types": np.array([1, 0, 2, 2, 1, 1, 0, 2], np.int32),
              "edge_mask": np.array([1, 1, 0, 0, 0, 0, 0, 0], bool), "source": np.int32(2), "target": np.int32(1)}
    return [first, second]


@pytest.mark.parametrize("kind,reverse_edges", [("gin", True), ("gat", True), ("gin", False), ("gat", False)])
def test_layers_match_a_by_hand_numpy_reference(kind, reverse_edges):
    # Two layers: the first sees identical node states (one shared embedding), so only the second can tell
    # whether senders and receivers are used the right way round.
    config = gnn.GNNConfig(kind=kind, num_relations=3, hidden=8, num_layers=2, num_classes=4, max_nodes=7,
                           max_edges=8, num_heads=2, reverse_edges=reverse_edges)
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda x: rng.normal(0.0, 0.5, x.shape).astype(np.float32),
                          gnn.init(config, jax.random.key(0)))          # random biases, eps and norm scales too
    graphs = _reference_graphs()
    out = jax.jit(gnn.apply, static_argnums=2)(params, _stack(graphs), config)
    for b, graph in enumerate(graphs):
        states, latent, logits = _np_gnn(params, graph, config)
        np.testing.assert_allclose(out.node_states[b], states, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.latent[b], latent, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.logits[b], logits, rtol=1e-5, atol=1e-5)
