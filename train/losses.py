"""Softmax cross-entropy over a vocabulary, lean in memory: float32 math on logits of any dtype.

`cross_entropy(logits_BTV, targets_BT, label_smoothing)` returns the per-token training
objective and the unsmoothed negative log-likelihood, both float32. Its custom VJP keeps only
the logits as given (bf16 from a bf16 LM head) and the float32 logsumexp [B, T]; the backward
recomputes softmax - labels in float32 and returns it in the logits' dtype. The casts, the
exponentials and the reductions are elementwise or reductions over the logits, which XLA fuses
into the ops that read them, so no float32 [B, T, V] array is stored for the backward.
"""

import functools
import math

import jax
import jax.numpy as jnp


def smoothing_entropy(vocab: int, smoothing: float) -> float:
  """The entropy of the smoothed labels q = (1 - s)·onehot + s/V: the objective's floor."""
  q_true, q_other = 1.0 - smoothing + smoothing / vocab, smoothing / vocab
  return -(q_true * math.log(q_true) + (vocab - 1) * q_other * math.log(q_other or 1.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cross_entropy(logits_BTV, targets_BT, label_smoothing: float = 0.0):
  """(objective_BT, nll_BT): cross-entropy to q = (1 - s)·onehot + s/V minus q's entropy (so a
  perfect prediction scores 0; equal to the nll when s = 0), and -log softmax at the target."""
  return _forward(logits_BTV, targets_BT, label_smoothing)[0]


def _forward(logits_BTV, targets_BT, smoothing: float):
  """Logits measured from their row maximum, as log_softmax does, to keep small losses exact."""
  logits32_BTV = logits_BTV.astype(jnp.float32)
  max_BT = jnp.max(logits32_BTV, axis=-1)
  log_sum_BT = jnp.log(jnp.sum(jnp.exp(logits32_BTV - max_BT[..., None]), axis=-1))
  # A masked sum rather than a gather: a reduction like the others, also over a sharded vocab.
  target_BT = jnp.sum(jnp.where(_is_target(targets_BT, logits_BTV.shape[-1]), logits32_BTV, 0.0),
                      axis=-1) - max_BT
  nll_BT = log_sum_BT - target_BT
  objective_BT = nll_BT
  if smoothing:
    mean_BT = jnp.mean(logits32_BTV - max_BT[..., None], axis=-1)
    objective_BT = (log_sum_BT - (1.0 - smoothing) * target_BT - smoothing * mean_BT
                    - smoothing_entropy(logits_BTV.shape[-1], smoothing))
  return (objective_BT, nll_BT), (logits_BTV, targets_BT, max_BT + log_sum_BT)


def _backward(smoothing: float, residuals, cotangents):
  """d/dlogits = g_obj·(softmax - q) + g_nll·(softmax - onehot), in float32, cast back."""
  logits_BTV, targets_BT, lse_BT = residuals
  g_objective_BT, g_nll_BT = cotangents
  vocab = logits_BTV.shape[-1]
  probs_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - lse_BT[..., None])
  g_target_BT = (1.0 - smoothing) * g_objective_BT + g_nll_BT
  grad_BTV = ((g_objective_BT + g_nll_BT)[..., None] * probs_BTV
              - jnp.where(_is_target(targets_BT, vocab), g_target_BT[..., None], 0.0)
              - (smoothing / vocab) * g_objective_BT[..., None])
  return grad_BTV.astype(logits_BTV.dtype), None


def _is_target(targets_BT, vocab: int):
  """The one-hot of the targets as booleans [B, T, V], built where it is read (fused)."""
  return targets_BT[..., None] == jnp.arange(vocab, dtype=targets_BT.dtype)


cross_entropy.defvjp(_forward, _backward)
