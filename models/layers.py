"""Building blocks: embeddings, positions, norms and feed-forward layers."""

import jax.numpy as jnp


def rope_frequencies(head_dim: int, max_wavelength: float = 10_000.0):
  """Inverse frequencies of rotary embeddings, one per pair of features: [head_dim // 2]."""
  return max_wavelength ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x_BTNH, positions_BT, max_wavelength: float = 10_000.0):
  """Rotary position embedding (RoFormer), rotating halves [x1, x2] of the head dimension."""
  head_dim = x_BTNH.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  angles_BTK = positions_BT[..., None].astype(jnp.float32) * rope_frequencies(
      head_dim, max_wavelength)
  sin_BT1K = jnp.sin(angles_BTK)[:, :, None, :]
  cos_BT1K = jnp.cos(angles_BTK)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1K - x2 * sin_BT1K, x2 * cos_BT1K + x1 * sin_BT1K], -1)
  return rotated.astype(x_BTNH.dtype)
