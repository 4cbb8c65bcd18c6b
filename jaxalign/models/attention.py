"""Choosing and running the attention kernel: one call, several implementations with the same contract.

`dot_product_attention(q, k, v, implementation=..., causal=..., key_valid=..., ...)` computes softmax attention
with grouped key/value heads. A query may attend a key when the key is valid (`key_valid`) and, with
`causal=True`, when the key's position is not later than the query's. Outputs at query rows that may attend no
key, and (with `causal=True`) at queries whose own slot is padding, are unspecified: callers drop them.

Implementations (`IMPLEMENTATIONS`):

* 'einsum': logits [B, H, T, S] in float32, masked softmax, weighted sum. The reference. Its backward pass keeps
  the float32 probabilities of every layer, which is what made a 2048-token Qwen2-0.5B step outgrow 80 GB.
* 'xla': `jax.nn.dot_product_attention(implementation='xla')` with an explicit boolean mask; the same
  computation as 'einsum' as XLA's library writes it (it also stores [B, H, T, S]).
* 'chunked': pure-JAX flash attention. Keys are visited in chunks with an online softmax under `lax.scan`, and a
  `jax.custom_vjp` backward recomputes each chunk's probabilities from the saved log-sum-exp, so neither pass
  keeps a [T, S] array: the residuals are q, k, v, the output and one float per query and head. Runs on every
  backend; the memory-light path on CPU and wherever no fused kernel applies.
* 'cudnn': cuDNN flash attention through `jax.nn.dot_product_attention(implementation='cudnn')`. GPU only,
  bfloat16 / float16 only. cuDNN masks causally by token index and pads by sequence lengths, so padded slots
  are first gathered behind the real ones (any padding layout works, left padding included).
* 'splash': the TPU Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`),
  causal mask by index and padding as segment ids; sequences are padded to the 128-token block. On TPU it is
  compiled; on CPU it runs in Pallas interpret mode (slow, for tests); on GPU it is refused. A Pallas call is
  not partitioned by the compiler, so under a multi-device mesh context (`jaxalign.sharding.trace_in_mesh`,
  which the TinyAlign step and evaluator use) it runs per device inside a `jax.shard_map`.
* 'auto': `resolve_implementation` picks per backend: GPU -> 'cudnn' for bfloat16 / float16 with a head width
  cuDNN takes (multiple of 8, at most 128) and self-attention when causal; TPU -> 'splash' for sequences of at
  least 128 tokens (self-attention when causal); otherwise 'chunked' from `CHUNKED_MIN_KEYS` keys on (there the
  float32 probabilities of the backward pass, B x H x T x S x 4 bytes per layer, outweigh a layer's other
  activations) and 'xla' below (faster for short sequences, and the memory is small).

'cudnn' and 'splash' mask causally by token index, not by `query_positions` / `key_positions`: they are exact
when the positions of valid tokens increase with their index (default positions, left or right padding, and the
spliced VLM sequences all qualify). Cached decoding, where query and key slots differ, uses 'einsum', 'xla' or
'chunked', which honour positions exactly.

Shapes: B batch, T queries, S keys, H query heads, K key/value heads (H a multiple of K), D head width.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "einsum", "xla", "chunked", "cudnn", "splash")
# Keys from which 'auto' prefers 'chunked' over 'xla' on backends without a fused kernel.
CHUNKED_MIN_KEYS = 1024
DEFAULT_CHUNK_SIZE = 512
SPLASH_BLOCK = 128
# Finite, so a fully masked chunk gives exp(0) rather than exp(-inf - -inf) = nan in the online softmax.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def check_implementation(implementation: str, field: str = "implementation") -> str:
    """Returns `implementation` if it names a known one; otherwise raises naming `field` (a config field)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{field}={implementation!r} is not an attention implementation; expected one of "
                         f"{IMPLEMENTATIONS}")
    return implementation


def resolve_implementation(implementation: str, *, dtype, q_len: int, kv_len: int, head_dim: int, causal: bool,
                           backend: str | None = None) -> str:
    """The implementation `dot_product_attention` runs: `implementation` itself, or what 'auto' picks.

    Args:
      implementation: one of `IMPLEMENTATIONS`.
      dtype: dtype of the queries.
      q_len, kv_len, head_dim: T, S and D.
      causal: whether the attention is causal.
      backend: 'cpu', 'gpu' or 'tpu'; default `jax.default_backend()`.
    """
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    backend = _platform(backend)
    self_attention_if_causal = not causal or q_len == kv_len
    if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= 128 and self_attention_if_causal):
        return "cudnn"
    if backend == "tpu" and self_attention_if_causal and min(q_len, kv_len) >= SPLASH_BLOCK:
        return "splash"
    return "chunked" if kv_len >= CHUNKED_MIN_KEYS else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto",
                          causal: bool = False, key_valid: jax.Array | None = None,
                          query_positions: jax.Array | None = None, key_positions: jax.Array | None = None,
                          scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Softmax attention of q over (k, v) with grouped key/value heads.

    Args:
      q: [B, T, H, D] queries.
      k, v: [B, S, K, D] keys and values; H must be a multiple of K.
      implementation: one of `IMPLEMENTATIONS` (see the module docstring).
      causal: a query attends only keys whose position is not later than its own.
      key_valid: [B, S] bool, True on real keys; default all real.
      query_positions, key_positions: [B, T] and [B, S] int positions for the causal test; default the token
        index. Only 'einsum', 'xla' and 'chunked' read them (see the module docstring).
      scale: logit scale, default 1 / sqrt(D).
      chunk_size: keys per step of 'chunked'.
    Returns:
      [B, T, H, D] in q's dtype; logits and softmax in float32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} key/value heads")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    chosen = resolve_implementation(implementation, dtype=q.dtype, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                                    causal=causal)
    if chosen == "einsum":
        return einsum_attention(q, k, v, _mask(q, k, causal, key_valid, query_positions, key_positions), scale)
    if chosen == "xla":
        mask = _mask(q, k, causal, key_valid, query_positions, key_positions)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    if chosen == "chunked":
        return chunked_attention(q, k, v, causal=causal, key_valid=key_valid, query_positions=query_positions,
                                 key_positions=key_positions, scale=scale, chunk_size=chunk_size)
    if chosen == "cudnn":
        _require_cudnn(q)
        return length_masked_attention(q, k, v, causal=causal, key_valid=key_valid, scale=scale,
                                       implementation="cudnn")
    return sharded_splash_attention(q, k, v, causal=causal, key_valid=key_valid, scale=scale)


def _platform(backend: str | None) -> str:
    backend = backend or jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm") else backend


# --------------------------------------------------------------------------------------------- masked: einsum, xla


def _mask(q, k, causal, key_valid, query_positions, key_positions) -> jax.Array | None:
    """[B, 1, T, S] bool (or None when nothing is masked): key valid and, if causal, not later than the query."""
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    mask = None
    if key_valid is not None:
        mask = key_valid.astype(bool)[:, None, None, :]
    if causal:
        if query_positions is None:
            query_positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
        if key_positions is None:
            key_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
        before = key_positions[:, None, None, :] <= query_positions[:, None, :, None]
        mask = before if mask is None else mask & before
    return None if mask is None else jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     scale: float | None = None) -> jax.Array:
    """The reference: q [B, T, H, D], k, v [B, S, K, D], boolean mask broadcastable to [B, 1, T, S] (True where a
    query may attend; None attends everywhere) -> [B, T, H, D]. Materialises the [B, H, T, S] logits."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} key/value heads")
    groups = num_heads // num_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qg = q.reshape(batch, q_len, num_kv, groups, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, 1, q_len, k.shape[1]))[:, :, None]  # [B, 1, 1, T, S]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


# ---------------------------------------------------------------------------------------------- chunked (flash)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                      key_valid: jax.Array | None = None, query_positions: jax.Array | None = None,
                      key_positions: jax.Array | None = None, scale: float | None = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Flash attention in pure JAX (same arguments as `dot_product_attention`); memory O(T + S) per head.

    Keys are padded to a multiple of `chunk_size` (the padding is masked out).
    """
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    chunk = max(1, min(chunk_size, kv_len))
    padded = -(-kv_len // chunk) * chunk
    key_valid = jnp.ones((batch, kv_len), bool) if key_valid is None else key_valid.astype(bool)
    if query_positions is None:
        query_positions = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    if key_positions is None:
        key_positions = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    if padded != kv_len:
        extra = padded - kv_len
        k = jnp.pad(k, ((0, 0), (0, extra), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, extra), (0, 0), (0, 0)))
        key_valid = jnp.pad(key_valid, ((0, 0), (0, extra)))
        key_positions = jnp.pad(key_positions, ((0, 0), (0, extra)))
    return _flash(q, k, v, key_valid, query_positions.astype(jnp.int32), key_positions.astype(jnp.int32),
                  causal, scale, chunk)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, S, ...] -> [S / chunk, B, chunk, ...], the scan axis first."""
    return x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _chunk_logits(qg, key_chunk, valid_chunk, key_positions_chunk, query_positions, causal, scale):
    """Masked float32 logits [B, K, G, T, C] of grouped queries qg [B, T, K, G, D] against one key chunk."""
    logits = jnp.einsum("btkgd,bckd->bkgtc", qg, key_chunk, preferred_element_type=jnp.float32) * scale
    allowed = valid_chunk[:, None, :]  # [B, 1, C]
    if causal:
        allowed = allowed & (key_positions_chunk[:, None, :] <= query_positions[:, :, None])  # [B, T, C]
    return jnp.where(allowed[:, None, None], logits, _MASK_VALUE)


def _flash_forward(q, k, v, key_valid, query_positions, key_positions, causal, scale, chunk):
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    groups = num_heads // num_kv
    qg = q.reshape(batch, q_len, num_kv, groups, head_dim)

    def step(carry, xs):
        running_max, running_sum, accumulated = carry
        key_chunk, value_chunk, valid_chunk, positions_chunk = xs
        logits = _chunk_logits(qg, key_chunk, valid_chunk, positions_chunk, query_positions, causal, scale)
        new_max = jnp.maximum(running_max, logits.max(-1))
        probs = jnp.exp(logits - new_max[..., None])
        correction = jnp.exp(running_max - new_max)
        running_sum = running_sum * correction + probs.sum(-1)
        accumulated = accumulated * correction[..., None] + jnp.einsum(
            "bkgtc,bckd->bkgtd", probs.astype(v.dtype), value_chunk, preferred_element_type=jnp.float32)
        return (new_max, running_sum, accumulated), None

    stats_shape = (batch, num_kv, groups, q_len)
    init = (jnp.full(stats_shape, _MASK_VALUE, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32))
    xs = (_chunks(k, chunk), _chunks(v, chunk), _chunks(key_valid, chunk), _chunks(key_positions, chunk))
    (running_max, running_sum, accumulated), _ = jax.lax.scan(step, init, xs)
    out = accumulated / running_sum[..., None]  # [B, K, G, T, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
    log_sum_exp = running_max + jnp.log(running_sum)  # [B, K, G, T]
    return out, log_sum_exp


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, key_valid, query_positions, key_positions, causal, scale, chunk):
    return _flash_forward(q, k, v, key_valid, query_positions, key_positions, causal, scale, chunk)[0]


def _flash_fwd(q, k, v, key_valid, query_positions, key_positions, causal, scale, chunk):
    out, log_sum_exp = _flash_forward(q, k, v, key_valid, query_positions, key_positions, causal, scale, chunk)
    return out, (q, k, v, key_valid, query_positions, key_positions, out, log_sum_exp)


def _flash_bwd(causal, scale, chunk, residuals, d_out):
    """FlashAttention-2's backward: per key chunk, p = exp(logits - lse), dv = p^T dO, ds = p (dO v^T - delta),
    dq += ds k, dk = ds^T q (both times scale)."""
    q, k, v, key_valid, query_positions, key_positions, out, log_sum_exp = residuals
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    groups = num_heads // num_kv
    qg = q.reshape(batch, q_len, num_kv, groups, head_dim)
    d_out = d_out.reshape(batch, q_len, num_kv, groups, head_dim)
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.reshape(d_out.shape).astype(jnp.float32))

    def step(d_query, xs):
        key_chunk, value_chunk, valid_chunk, positions_chunk = xs
        logits = _chunk_logits(qg, key_chunk, valid_chunk, positions_chunk, query_positions, causal, scale)
        probs = jnp.exp(logits - log_sum_exp[..., None])  # [B, K, G, T, C]
        d_value = jnp.einsum("bkgtc,btkgd->bckd", probs.astype(d_out.dtype), d_out,
                             preferred_element_type=jnp.float32)
        d_probs = jnp.einsum("btkgd,bckd->bkgtc", d_out, value_chunk, preferred_element_type=jnp.float32)
        d_logits = probs * (d_probs - delta[..., None]) * scale
        d_query = d_query + jnp.einsum("bkgtc,bckd->btkgd", d_logits.astype(key_chunk.dtype), key_chunk,
                                       preferred_element_type=jnp.float32)
        d_key = jnp.einsum("bkgtc,btkgd->bckd", d_logits.astype(q.dtype), qg, preferred_element_type=jnp.float32)
        return d_query, (d_key, d_value)

    xs = (_chunks(k, chunk), _chunks(v, chunk), _chunks(key_valid, chunk), _chunks(key_positions, chunk))
    d_query, (d_key, d_value) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32), xs)

    def unchunk(x, like):  # [S / chunk, B, chunk, K, D] -> [B, S, K, D]
        return x.swapaxes(0, 1).reshape(like.shape).astype(like.dtype)

    return (d_query.reshape(q.shape).astype(q.dtype), unchunk(d_key, k), unchunk(d_value, v), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------------ cudnn


def _require_cudnn(q: jax.Array) -> None:
    if _platform(None) != "gpu":
        raise ValueError(f"attention implementation 'cudnn' needs a GPU (this process runs on "
                         f"{jax.default_backend()!r}); use 'auto', 'chunked' or 'xla'")
    if jnp.dtype(q.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention implementation 'cudnn' takes bfloat16 or float16 inputs, not {q.dtype}; set "
                         "the model's dtype to 'bfloat16' or use 'auto' / 'chunked'")


def length_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                            key_valid: jax.Array | None, scale: float, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` with padding expressed as sequence lengths (what cuDNN takes).

    Real slots are gathered in front of the padded ones (a stable sort, so their order is kept), the kernel
    runs with `is_causal` and per-row lengths, and the output is gathered back. With `causal=True` this is
    self-attention (T == S) and a query whose slot is padding is padding too. `implementation='xla'` runs the
    same path on any backend, which is how it is tested without a GPU.
    """
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention by sequence lengths needs as many queries as keys; got T={q.shape[1]}, "
                         f"S={k.shape[1]} (cached decoding runs with 'einsum', 'xla' or 'chunked')")
    if key_valid is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=implementation)
    key_valid = key_valid.astype(bool)
    order = jnp.argsort(~key_valid, axis=1, stable=True)  # real slots first, in their original order
    lengths = key_valid.sum(axis=1).astype(jnp.int32)

    def gather(x, indices):
        return jnp.take_along_axis(x, indices[:, :, None, None], axis=1)

    keys, values = gather(k, order), gather(v, order)
    if not causal:
        return jax.nn.dot_product_attention(q, keys, values, scale=scale, key_value_seq_lengths=lengths,
                                            implementation=implementation)
    out = jax.nn.dot_product_attention(gather(q, order), keys, values, scale=scale, is_causal=True,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return gather(out, jnp.argsort(order, axis=1))


# ----------------------------------------------------------------------------------------------------- splash


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, key_valid: jax.Array | None,
                     scale: float, interpret: bool | None = None) -> jax.Array:
    """The TPU splash kernel (compiled on TPU, Pallas interpret mode elsewhere unless `interpret` says).

    Padding is segment ids: real keys are segment 1, padded keys 0. Queries take their own slot's segment when
    causal (self-attention, T == S), else 1. T and S are padded to multiples of `SPLASH_BLOCK`.
    """
    platform = _platform(None)
    if platform == "gpu":
        raise ValueError("attention implementation 'splash' is a TPU kernel; on GPU use 'cudnn', 'chunked' or 'auto'")
    interpret = platform != "tpu" if interpret is None else interpret
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    batch, q_len, num_heads, head_dim = q.shape
    kv_len = k.shape[1]
    if causal and q_len != kv_len:
        raise ValueError(f"'splash' causal attention needs as many queries as keys; got T={q_len}, S={kv_len} "
                         "(cached decoding runs with 'einsum', 'xla' or 'chunked')")
    q_padded, kv_padded = (-(-n // SPLASH_BLOCK) * SPLASH_BLOCK for n in (q_len, kv_len))
    key_valid = jnp.ones((batch, kv_len), bool) if key_valid is None else key_valid.astype(bool)
    key_segments = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, kv_padded - kv_len)))
    query_segments = key_segments if causal else jnp.ones((batch, q_padded), jnp.int32)

    def heads_first(x, length):  # [B, n, heads, D] -> [B, heads, length, D]
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    kernel = _splash_kernel(num_heads, q_padded, kv_padded, causal, interpret)
    run = jax.vmap(lambda q1, k1, v1, qs, ks: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=qs, kv=ks)))
    # The kernel does not scale logits; scaling q first is the same product.
    out = run(heads_first(q * jnp.asarray(scale, q.dtype), q_padded), heads_first(k, kv_padded),
              heads_first(v, kv_padded), query_segments, key_segments)
    return out.transpose(0, 2, 1, 3)[:, :q_len].astype(q.dtype)


def sharded_splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                             key_valid: jax.Array | None, scale: float, interpret: bool | None = None) -> jax.Array:
    """`splash_attention` under a `jax.shard_map` when traced inside a multi-device mesh context.

    The compiler cannot partition a Pallas call, so on a sharded mesh each device runs the kernel on its own rows:
    the batch over the mesh's ('data', 'fsdp') axes (as `jaxalign.sharding.batch_sharding` lays it out) and the
    heads over 'tensor' when it divides both head counts. The mesh is the abstract one the caller traces under
    (`jaxalign.sharding.trace_in_mesh`); without one, or on one device, the kernel runs as it is. A batch that
    the devices do not divide runs 'chunked' instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return splash_attention(q, k, v, causal=causal, key_valid=key_valid, scale=scale, interpret=interpret)
    batch_axes = tuple(axis for axis in ("data", "fsdp") if axis in mesh.axis_names)
    rows = int(np.prod([mesh.shape[axis] for axis in batch_axes]))
    if q.shape[0] % rows:
        # A batch that does not split evenly over the devices (the last batch of a bank build, say) takes the
        # portable kernel, which the compiler partitions like any other computation.
        return chunked_attention(q, k, v, causal=causal, key_valid=key_valid, scale=scale)
    tensor = mesh.shape.get("tensor", 1)
    heads_axis = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0 else None
    activations = jax.sharding.PartitionSpec(batch_axes, None, heads_axis, None)
    valid_spec = jax.sharding.PartitionSpec(batch_axes, None)
    key_valid = jnp.ones(k.shape[:2], bool) if key_valid is None else key_valid.astype(bool)

    def local(q, k, v, key_valid):
        return splash_attention(q, k, v, causal=causal, key_valid=key_valid, scale=scale, interpret=interpret)

    return jax.shard_map(local, mesh=mesh, in_specs=(activations, activations, activations, valid_spec),
                         out_specs=activations, check_vma=False)(q, k, v, key_valid)


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
    """A splash kernel for these shapes (mask preprocessing runs in numpy, so it is built once per shape).

    It is cached across traces, so the arrays it holds (the mask's block tables) are made concretely even when the
    first call comes from inside a `jax.jit` trace: a traced array kept in the cache would leak into the next one.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    one = masks.CausalMask((q_len, kv_len)) if causal else masks.FullMask((q_len, kv_len))
    block_q, block_kv = (max(b for b in (512, 256, 128) if n % b == 0) for n in (q_len, kv_len))
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(masks.MultiHeadMask([one] * num_heads), block_sizes=blocks,
                                                    interpret=interpret)
