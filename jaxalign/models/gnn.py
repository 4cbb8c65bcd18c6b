"""Edge-type-aware graph neural network: the CLUTRR teacher that reads a story's symbolic kinship graph.

Two message-passing layers are available, both using the relation of every edge:
  * 'gin': GIN with edge features (GINE; Hu et al., "Strategies for Pre-training Graph Neural Networks",
    ICLR 2020): h_i <- MLP((1 + eps) h_i + sum_{j -> i} ReLU(h_j + W e_ji)).
  * 'gat': graph attention whose attention logits and messages include an edge-type embedding (Velickovic et
    al., "Graph Attention Networks", ICLR 2018, with edge features as in the CLUTRR baselines).
Each layer adds its update to the node state and layer-normalises (residual), which keeps deep stacks stable.

Nodes carry no identity: every person starts from one shared learned embedding (plus, optionally, random
features drawn from an `rng` argument), so the model must reason from the relations alone. Graphs are padded to
a static budget (`max_nodes`, `max_edges`, see `jaxalign.distill.clutrr_batches.graph_batch`); padding edges are
masked out of every sum and maximum, so padding never changes a prediction. Each edge (a -> b, r) also runs
backwards as (b -> a, r + num_relations) when `reverse_edges` is set, so information reaches both ends.

Readout: [masked mean of node states; source node state; target node state] (the graph latent, width
3 * hidden) -> MLP -> class logits.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.models import layers
from jaxalign.models.layers import EMBED, HEADS, MLP, ParamSpec

_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class GNNConfig:
    """Shape of the GNN teacher.

    Attributes:
      num_relations: number of edge types (the edge-type vocabulary size).
      hidden: node state width.
      num_layers: message-passing rounds.
      kind: 'gin' or 'gat'.
      num_classes: answer classes.
      max_nodes, max_edges: the padded graph budget the batches use.
      num_heads: attention heads ('gat'); must divide `hidden`.
      random_features: width of random node features (0: none); needs an `rng` at every call.
      reverse_edges: also pass messages against each edge's direction, with their own edge types.
      dtype: compute dtype name ('float32' or 'bfloat16'); parameters stay float32.
    """

    num_relations: int = 22
    hidden: int = 64
    num_layers: int = 3
    kind: str = "gin"
    num_classes: int = 18
    max_nodes: int = 16
    max_edges: int = 16
    num_heads: int = 4
    random_features: int = 0
    reverse_edges: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in ("gin", "gat"):
            raise ValueError(f"GNNConfig.kind must be 'gin' or 'gat', got {self.kind!r}")
        if self.kind == "gat" and self.hidden % self.num_heads:
            raise ValueError(f"GNNConfig.hidden={self.hidden} is not a multiple of num_heads={self.num_heads}")

    @property
    def latent_dim(self) -> int:
        return 3 * self.hidden


class GNNOutput(NamedTuple):
    """logits [B, classes] (float32), latent [B, 3 * hidden], node_states [B, max_nodes, hidden]."""

    logits: jax.Array
    latent: jax.Array
    node_states: jax.Array


def _dense(in_dim: int, out_dim: int, in_axis: str | None = EMBED, out_axis: str | None = MLP) -> dict:
    return layers.dense_spec(in_dim, out_dim, in_axis, out_axis, scale=1.0 / max(in_dim, 1) ** 0.5)


def _layer_specs(config: GNNConfig) -> dict:
    width = config.hidden
    if config.kind == "gin":
        return {
            "eps": ParamSpec((), (), "zeros"),
            "edge": _dense(width, width, EMBED, EMBED),
            "mlp_in": _dense(width, 2 * width),
            "mlp_out": _dense(2 * width, width, MLP, EMBED),
            "norm": layers.norm_spec(width),
        }
    head_dim = width // config.num_heads
    attention_vector = ParamSpec((config.num_heads, head_dim), (HEADS, None), "normal", 1.0 / head_dim ** 0.5)
    return {
        "node": _dense(width, width, EMBED, HEADS),
        "edge": _dense(width, width, EMBED, HEADS),
        "attend_receiver": attention_vector, "attend_sender": attention_vector, "attend_edge": attention_vector,
        "output": _dense(width, width, HEADS, EMBED),
        "norm": layers.norm_spec(width),
        "mlp_in": _dense(width, 2 * width),
        "mlp_out": _dense(2 * width, width, MLP, EMBED),
        "mlp_norm": layers.norm_spec(width),
    }


def param_specs(config: GNNConfig) -> dict:
    """ParamSpec pytree of the GNN (layer parameters stacked along a leading 'layers' axis)."""
    num_edge_types = config.num_relations * (2 if config.reverse_edges else 1)
    specs = {
        "node_embedding": ParamSpec((config.hidden,), (EMBED,), "normal", 1.0),
        "edge_embedding": ParamSpec((num_edge_types, config.hidden), (None, EMBED), "normal", 1.0),
        "layers": layers.stack_specs(_layer_specs(config), config.num_layers),
        "classifier": {"hidden": _dense(config.latent_dim, config.hidden),
                       "output": _dense(config.hidden, config.num_classes, MLP, None)},
    }
    if config.random_features:
        specs["random_projection"] = _dense(config.random_features, config.hidden, None, EMBED)
    return specs


def init(config: GNNConfig, key: jax.Array) -> dict:
    """Fresh parameters for `config`."""
    return layers.init_params(param_specs(config), key)


# --------------------------------------------------------------------------------------- message passing


def _gin_layer(p: dict, h: jax.Array, edges: dict, num_nodes: int) -> jax.Array:
    """One GINE round for one graph: h [N, H] -> [N, H]."""
    messages = jax.nn.relu(h[edges["senders"]] + layers.dense(p["edge"], edges["embedding"]))
    messages = messages * edges["mask"][:, None]
    incoming = jax.ops.segment_sum(messages, edges["receivers"], num_segments=num_nodes)
    update = (1.0 + p["eps"].astype(h.dtype)) * h + incoming
    update = layers.dense(p["mlp_out"], jax.nn.relu(layers.dense(p["mlp_in"], update)))
    return layers.layer_norm(p["norm"], h + update, _LAYER_NORM_EPS)


def _gat_layer(p: dict, h: jax.Array, edges: dict, num_nodes: int, num_heads: int) -> jax.Array:
    """One edge-aware attention round for one graph: h [N, H] -> [N, H]."""
    nodes = layers.dense(p["node"], h).reshape(num_nodes, num_heads, -1)                 # [N, heads, D]
    edge_values = layers.dense(p["edge"], edges["embedding"]).reshape(-1, num_heads, nodes.shape[-1])
    senders, receivers, mask = edges["senders"], edges["receivers"], edges["mask"]
    logits = (jnp.sum(nodes[receivers] * p["attend_receiver"].astype(h.dtype), -1)
              + jnp.sum(nodes[senders] * p["attend_sender"].astype(h.dtype), -1)
              + jnp.sum(edge_values * p["attend_edge"].astype(h.dtype), -1))
    logits = jax.nn.leaky_relu(logits.astype(jnp.float32), 0.2)                          # [E, heads]
    is_edge = mask[:, None] > 0
    # Softmax over each receiver's incoming edges. Padding edges are excluded from the maximum and the sum;
    # a node without incoming edges has no maximum (-inf), replaced by 0 so no inf - inf appears.
    maxima = jax.ops.segment_max(jnp.where(is_edge, logits, -jnp.inf), receivers, num_segments=num_nodes)
    maxima = jax.lax.stop_gradient(jnp.where(jnp.isfinite(maxima), maxima, 0.0))
    weights = jnp.where(is_edge, jnp.exp(jnp.where(is_edge, logits - maxima[receivers], 0.0)), 0.0)
    totals = jax.ops.segment_sum(weights, receivers, num_segments=num_nodes)
    attention = (weights / jnp.maximum(totals[receivers], 1e-9)).astype(h.dtype)
    messages = attention[..., None] * (nodes[senders] + edge_values)
    incoming = jax.ops.segment_sum(messages, receivers, num_segments=num_nodes).reshape(num_nodes, -1)
    h = layers.layer_norm(p["norm"], h + layers.dense(p["output"], incoming), _LAYER_NORM_EPS)
    update = layers.dense(p["mlp_out"], jax.nn.relu(layers.dense(p["mlp_in"], h)))
    return layers.layer_norm(p["mlp_norm"], h + update, _LAYER_NORM_EPS)


def _edges(params: dict, graph: dict, config: GNNConfig, dtype: Any) -> dict:
    """Per-batch edge arrays [B, E'] (with reversed copies when configured) and their type embeddings."""
    senders, receivers = graph["senders"], graph["receivers"]
    types, mask = graph["edge_types"], graph["edge_mask"]
    if config.reverse_edges:
        senders, receivers = (jnp.concatenate([senders, receivers], 1), jnp.concatenate([receivers, senders], 1))
        types = jnp.concatenate([types, types + config.num_relations], 1)
        mask = jnp.concatenate([mask, mask], 1)
    return {"senders": senders, "receivers": receivers, "mask": mask.astype(dtype),
            "embedding": params["edge_embedding"].astype(dtype)[types]}


def apply(params: dict, graph: dict, config: GNNConfig, rng: jax.Array | None = None) -> GNNOutput:
    """Runs the GNN on a padded graph batch.

    Args:
      params: from `init`.
      graph: node_mask [B, N], senders / receivers / edge_types [B, E] int, edge_mask [B, E], source / target
        [B] int (the query's nodes), as made by `jaxalign.distill.clutrr_batches.graph_batch`.
      config: the model shape; N must equal config.max_nodes and E config.max_edges.
      rng: key for the random node features (required when config.random_features > 0).
    Returns:
      GNNOutput(logits [B, classes] float32, latent [B, 3 * hidden], node_states [B, N, hidden]); padding
      nodes have zero states.
    """
    dtype = jnp.dtype(config.dtype)
    node_mask = graph["node_mask"]
    batch, num_nodes = node_mask.shape
    if num_nodes != config.max_nodes or graph["senders"].shape[1] != config.max_edges:
        raise ValueError(f"graph batch is padded to {num_nodes} nodes and {graph['senders'].shape[1]} edges but "
                         f"the GNN config says max_nodes={config.max_nodes}, max_edges={config.max_edges}")
    node_weights = node_mask.astype(dtype)[..., None]                                     # [B, N, 1]
    h = jnp.broadcast_to(params["node_embedding"].astype(dtype), (batch, num_nodes, config.hidden))
    if config.random_features:
        if rng is None:
            raise ValueError("this GNN uses random node features (config.random_features > 0): pass rng=key")
        noise = jax.random.normal(rng, (batch, num_nodes, config.random_features), dtype)
        h = h + layers.dense(params["random_projection"], noise)
    h = h * node_weights
    edges = _edges(params, graph, config, dtype)

    def one_layer(states: jax.Array, layer_params: dict) -> tuple[jax.Array, None]:
        if config.kind == "gin":
            step = lambda s, e: _gin_layer(layer_params, s, e, num_nodes)  # noqa: E731
        else:
            step = lambda s, e: _gat_layer(layer_params, s, e, num_nodes, config.num_heads)  # noqa: E731
        return jax.vmap(step)(states, edges) * node_weights, None

    h, _ = jax.lax.scan(one_layer, h, params["layers"])
    count = jnp.maximum(node_weights.sum(1), 1.0)
    mean = (h * node_weights).sum(1) / count
    rows = jnp.arange(batch)
    latent = jnp.concatenate([mean, h[rows, graph["source"]], h[rows, graph["target"]]], axis=-1)
    hidden = jax.nn.relu(layers.dense(params["classifier"]["hidden"], latent))
    logits = layers.dense(params["classifier"]["output"], hidden).astype(jnp.float32)
    return GNNOutput(logits, latent, h)
