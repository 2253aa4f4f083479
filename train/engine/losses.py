"""Softmax cross-entropy over a vocabulary, lean in memory: float32 math on logits of any dtype.

`token_losses(logits_BTV, targets_BT, label_smoothing, vocab_size)` returns, per token, the
training objective, the unsmoothed negative log-likelihood and whether the prediction is right,
all float32, from one pass over the logits (no argmax beside the loss); `cross_entropy` is its
first two. Its custom VJP keeps only the logits as given (bf16 from a bf16 LM head) and the
float32 logsumexp [B, T]; the backward recomputes softmax - labels in float32 and returns it in
the logits' dtype. The casts, the exponentials and the reductions are elementwise or reductions
over the logits, which XLA fuses into the ops that read them, so no float32 [B, T, V] array is
stored for the backward.

`vocab_size` below the logits' width: the columns past it are padding (a vocabulary padded to a
multiple of 128, models/transformer.py's `padded_vocab=True`), left out of the softmax, the
smoothing and the prediction, and given a zero gradient; so the logits need not be sliced to an
odd width first.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLosses(NamedTuple):
  objective: jax.Array  # [B, T] the (smoothed) training objective
  nll: jax.Array        # [B, T] -log softmax at the target
  correct: jax.Array    # [B, T] 1.0 where the target's logit is the row's maximum, else 0.0


def smoothing_entropy(vocab: int, smoothing: float) -> float:
  """The entropy of the smoothed labels q = (1 - s)·onehot + s/V: the objective's floor."""
  q_true, q_other = 1.0 - smoothing + smoothing / vocab, smoothing / vocab
  return -(q_true * math.log(q_true) + (vocab - 1) * q_other * math.log(q_other or 1.0))


def token_losses(logits_BTV, targets_BT, label_smoothing: float = 0.0,
                 vocab_size: int | None = None) -> TokenLosses:
  """Cross-entropy to q = (1 - s)·onehot + s/V minus q's entropy (so a perfect prediction
  scores 0; equal to the nll when s = 0), -log softmax at the target, and the hits (these
  without a gradient). V is `vocab_size`, by default the logits' width.

  `correct` is 1 where the target's logit equals the row's maximum (of the first `vocab_size`
  columns), read off the loss's own reductions. It equals `argmax(logits) == target` except on
  ties for the maximum, where every tied id counts as right (argmax takes the first). Targets
  outside [0, vocab_size) are never right."""
  vocab = logits_BTV.shape[-1] if vocab_size is None else vocab_size
  if not 0 < vocab <= logits_BTV.shape[-1]:
    raise ValueError(f"vocab_size={vocab_size} must be in [1, {logits_BTV.shape[-1]}], the "
                     "logits' width.")
  return TokenLosses(*_token_losses(logits_BTV, targets_BT, label_smoothing, vocab))


def cross_entropy(logits_BTV, targets_BT, label_smoothing: float = 0.0,
                  vocab_size: int | None = None):
  """(objective_BT, nll_BT) of `token_losses`."""
  losses = token_losses(logits_BTV, targets_BT, label_smoothing, vocab_size)
  return losses.objective, losses.nll


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_losses(logits_BTV, targets_BT, smoothing: float, vocab: int):
  return _forward(logits_BTV, targets_BT, smoothing, vocab)[0]


def _forward(logits_BTV, targets_BT, smoothing: float, vocab: int):
  """Logits measured from their row maximum, as log_softmax does, to keep small losses exact."""
  logits32_BTV = _real(logits_BTV.astype(jnp.float32), vocab, -jnp.inf)
  max_BT = jnp.max(logits32_BTV, axis=-1)
  log_sum_BT = jnp.log(jnp.sum(jnp.exp(logits32_BTV - max_BT[..., None]), axis=-1))
  # A masked sum rather than a gather: a reduction like the others, also over a sharded vocab.
  target_BT = jnp.sum(jnp.where(_is_target(targets_BT, logits_BTV.shape[-1]), logits32_BTV, 0.0),
                      axis=-1) - max_BT
  nll_BT = log_sum_BT - target_BT
  objective_BT = nll_BT
  if smoothing:
    mean_BT = jnp.sum(_real(logits32_BTV - max_BT[..., None], vocab, 0.0), axis=-1) / vocab
    objective_BT = (log_sum_BT - (1.0 - smoothing) * target_BT - smoothing * mean_BT
                    - smoothing_entropy(vocab, smoothing))
  in_vocab_BT = (targets_BT >= 0) & (targets_BT < vocab)
  correct_BT = ((target_BT == 0.0) & in_vocab_BT).astype(jnp.float32)
  return (objective_BT, nll_BT, correct_BT), (logits_BTV, targets_BT, max_BT + log_sum_BT)


def _backward(smoothing: float, vocab: int, residuals, cotangents):
  """d/dlogits = g_obj·(softmax - q) + g_nll·(softmax - onehot), in float32, cast back; 0 on the
  padded columns. `correct` has no gradient."""
  logits_BTV, targets_BT, lse_BT = residuals
  g_objective_BT, g_nll_BT, _ = cotangents
  probs_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - lse_BT[..., None])
  g_target_BT = (1.0 - smoothing) * g_objective_BT + g_nll_BT
  grad_BTV = ((g_objective_BT + g_nll_BT)[..., None] * probs_BTV
              - jnp.where(_is_target(targets_BT, logits_BTV.shape[-1]), g_target_BT[..., None],
                          0.0)
              - (smoothing / vocab) * g_objective_BT[..., None])
  return _real(grad_BTV, vocab, 0.0).astype(logits_BTV.dtype), None


def _real(x_BTV, vocab: int, padding: float):
  """`x_BTV` with its columns past `vocab` set to `padding` (fused into the ops reading it)."""
  if vocab == x_BTV.shape[-1]:
    return x_BTV
  return jnp.where(jnp.arange(x_BTV.shape[-1]) < vocab, x_BTV, padding)


def _is_target(targets_BT, width: int):
  """The one-hot of the targets as booleans [B, T, V], built where it is read (fused)."""
  return targets_BT[..., None] == jnp.arange(width, dtype=targets_BT.dtype)


_token_losses.defvjp(_forward, _backward)
