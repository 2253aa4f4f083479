"""Building blocks: token embeddings, positions, norms and feed-forward layers.

Every parameter carries logical axis names (see `nn.with_logical_partitioning`) that
train/engine/parallel.py maps onto the device mesh.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.errors import InputError

Dtype = Any
Initializer = Callable[..., jax.Array]


def partitioned(init: Initializer, *names: str) -> Initializer:
  return nn.with_logical_partitioning(init, names)


class Embed(nn.Module):
  """Token embedding; `attend` reuses the table as a tied output projection."""
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        "embedding", partitioned(self.embedding_init, "vocab", "embed"),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids_BT):
    return jnp.take(self.embedding, ids_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD):
    """Logits against every embedding: x @ embeddingᵀ."""
    return jnp.einsum("btd,vd->btv", x_BTD.astype(self.dtype), self.embedding.astype(self.dtype))


class LearnedPositions(nn.Module):
  """A learned table of absolute position embeddings (GPT-2, BERT)."""
  max_len: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, positions_BT):
    table = self.param("embedding", partitioned(self.embedding_init, "position", "embed"),
                       (self.max_len, self.features), self.param_dtype)
    return jnp.take(table, positions_BT, axis=0).astype(self.dtype)


def sinusoidal_positions(positions_BT, features: int, max_wavelength: float = 10_000.0):
  """The paper's fixed encoding: sin on the first half of the features, cos on the second."""
  half = features // 2
  inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles_BTK = positions_BT[..., None].astype(jnp.float32) * inv_freq
  encoding = jnp.concatenate([jnp.sin(angles_BTK), jnp.cos(angles_BTK)], axis=-1)
  return jnp.pad(encoding, [(0, 0)] * (encoding.ndim - 1) + [(0, features % 2)])


def rope_frequencies(head_dim: int, max_wavelength: float = 10_000.0, llama3_scaling=None):
  """Inverse frequencies of rotary embeddings, one per pair of features: [head_dim // 2].

  `llama3_scaling` (factor, low_freq_factor, high_freq_factor, original_max_len), as LLaMA 3.1:
  wavelengths longer than original_max_len / low_freq_factor are stretched by `factor`, those
  shorter than original_max_len / high_freq_factor kept, and those between interpolated.
  """
  inv_freq = max_wavelength ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if llama3_scaling is None:
    return inv_freq
  factor, low_freq_factor, high_freq_factor, original_max_len = llama3_scaling
  wavelength = 2 * np.pi / inv_freq
  smooth = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
  long = wavelength > original_max_len / low_freq_factor
  short = wavelength < original_max_len / high_freq_factor
  between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  return jnp.where(long, inv_freq / factor, jnp.where(short, inv_freq, between))


def apply_rope(x_BTNH, positions_BT, max_wavelength: float = 10_000.0, llama3_scaling=None):
  """Rotary position embedding (RoFormer), rotating halves [x1, x2] of the head dimension."""
  head_dim = x_BTNH.shape[-1]
  if head_dim % 2:
    raise InputError(f"RoPE needs an even head_dim, got {head_dim}.")
  angles_BTK = positions_BT[..., None].astype(jnp.float32) * rope_frequencies(
      head_dim, max_wavelength, llama3_scaling)
  sin_BT1K = jnp.sin(angles_BTK)[:, :, None, :]
  cos_BT1K = jnp.cos(angles_BTK)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1K - x2 * sin_BT1K, x2 * cos_BT1K + x1 * sin_BT1K], -1)
  return rotated.astype(x_BTNH.dtype)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's bucketing of key_position - query_position: exact when near, log-spaced when far."""
  bucket = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / np.log(
      max_distance / max_exact)
  far = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  far = jnp.minimum(far, num_buckets - 1)
  return bucket + jnp.where(is_small, n, far)


class RelativePositionBias(nn.Module):
  """T5's learned attention bias per head and relative-position bucket: [B, N, T, S]."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

  @nn.compact
  def __call__(self, query_positions_BT, key_positions_BS):
    table = self.param("rel_embedding", partitioned(self.embedding_init, "relpos_buckets", "heads"),
                       (self.num_buckets, self.num_heads), self.param_dtype)
    relative_BTS = key_positions_BS[:, None, :] - query_positions_BT[:, :, None]
    bucket_BTS = relative_position_bucket(relative_BTS, bidirectional=self.bidirectional,
                                          num_buckets=self.num_buckets,
                                          max_distance=self.max_distance)
    bias_BTSN = jnp.take(table, bucket_BTS, axis=0)
    return jnp.transpose(bias_BTSN, (0, 3, 1, 2)).astype(self.dtype)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32, with an optional bias.

  With scale_plus_one the output is multiplied by 1 + scale, the parameter starting at 0 (Gemma).
  """
  kind: str = "layernorm"
  epsilon: float = 1e-6
  use_bias: bool = True
  scale_plus_one: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind not in ("layernorm", "rmsnorm"):
      raise InputError(f"Unknown norm {self.kind!r}: use 'layernorm' or 'rmsnorm'.")
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    init = nn.initializers.zeros if self.scale_plus_one else nn.initializers.ones
    scale = self.param("scale", partitioned(init, "embed"), (features,),
                       self.param_dtype).astype(jnp.float32)
    y = y * (1.0 + scale if self.scale_plus_one else scale)
    if self.use_bias:
      y = y + self.param("bias", partitioned(nn.initializers.zeros, "embed"), (features,),
                         self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype)


ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
}


class FeedForward(nn.Module):
  """Position-wise feed-forward: act(x W_i) W_o, or gated act(x W_i0) * (x W_i1) W_o (GLU)."""
  hidden_features: int
  activation: str = "relu"
  gated: bool = False
  use_bias: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool = True):
    if self.activation not in ACTIVATIONS:
      raise InputError(f"Unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}.")
    dense = lambda features, names, name: nn.Dense(
        features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=partitioned(self.kernel_init, *names),
        bias_init=partitioned(nn.initializers.zeros, names[-1]), name=name)
    act = ACTIVATIONS[self.activation]
    if self.gated:
      h_BTF = act(dense(self.hidden_features, ("embed", "mlp"), "wi_0")(x_BTD))
      h_BTF = h_BTF * dense(self.hidden_features, ("embed", "mlp"), "wi_1")(x_BTD)
    else:
      h_BTF = act(dense(self.hidden_features, ("embed", "mlp"), "wi")(x_BTD))
    h_BTF = nn.Dropout(self.dropout_rate)(h_BTF, deterministic=deterministic)
    return dense(x_BTD.shape[-1], ("mlp", "embed"), "wo")(h_BTF)
