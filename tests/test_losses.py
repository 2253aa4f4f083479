"""train/engine/losses.py: the lean cross-entropy's values, gradients and memory.

References: optax's float32 `softmax_cross_entropy_with_integer_labels`, and the float64
textbook formula (q = (1 - s)·onehot + s/V; loss -Σ q log p - H(q), gradient softmax - q),
on the same (bf16-rounded where the logits are bf16) values; the compiler's own memory count
of the plain float32 loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.engine import losses

VOCAB = 37


def textbook(logits, targets, weights, smoothing):
  """(Σ w·(CE(q, p) - H(q)), Σ w·nll, d/dlogits of the first), all float64."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  onehot = np.eye(logits.shape[-1])[targets]
  q = (1 - smoothing) * onehot + smoothing / logits.shape[-1]
  entropy = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), -1)
  objective = np.sum(weights * (-np.sum(q * log_p, -1) - entropy))
  nll = np.sum(weights * -np.sum(onehot * log_p, -1))
  return objective, nll, weights[..., None] * (np.exp(log_p) - q)


def example(dtype, seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(0, 4, (3, 5, VOCAB)), dtype)
  targets = jnp.asarray(rng.integers(0, VOCAB, (3, 5)), jnp.int32)
  weights = jnp.asarray(rng.uniform(0, 1, (3, 5)), jnp.float32)
  return logits, targets, weights


def summed(smoothing):
  def loss(logits, targets, weights):
    objective, nll = losses.cross_entropy(logits, targets, smoothing)
    return jnp.sum(objective * weights), jnp.sum(nll * weights)
  return loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_float32_values_and_gradients_are_optax_and_the_textbook(smoothing):
  logits, targets, weights = example(jnp.float32)
  (objective, nll), grad = jax.value_and_grad(summed(smoothing), has_aux=True)(
      logits, targets, weights)
  want_objective, want_nll, want_grad = textbook(logits, targets, np.asarray(weights), smoothing)
  np.testing.assert_allclose(objective, want_objective, rtol=1e-6)
  np.testing.assert_allclose(nll, want_nll, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, atol=1e-6)
  plain = lambda z: jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(z, targets))
  if not smoothing:
    np.testing.assert_allclose(grad, jax.grad(plain)(logits), atol=1e-6)
  nll_grad = jax.grad(lambda z: summed(smoothing)(z, targets, weights)[1])(logits)
  np.testing.assert_allclose(nll_grad, jax.grad(plain)(logits), atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bf16_logits_get_float32_math_and_a_bf16_gradient(smoothing):
  logits, targets, weights = example(jnp.bfloat16, seed=1)
  (objective, nll), grad = jax.value_and_grad(summed(smoothing), has_aux=True)(
      logits, targets, weights)
  assert objective.dtype == nll.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  want_objective, want_nll, want_grad = textbook(
      np.asarray(logits.astype(jnp.float32)), targets, np.asarray(weights), smoothing)
  np.testing.assert_allclose(objective, want_objective, rtol=1e-6)  # float32, not bf16, math
  np.testing.assert_allclose(nll, want_nll, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=1e-2, atol=1e-3)


def test_the_gradient_of_bf16_logits_keeps_no_second_float32_copy():
  logits = jax.ShapeDtypeStruct((2, 64, 4096), jnp.bfloat16)
  targets = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  plain = lambda z, t: optax.softmax_cross_entropy_with_integer_labels(
      z.astype(jnp.float32), t).sum()
  lean = lambda z, t: losses.cross_entropy(z, t)[0].sum()
  temp = {name: jax.jit(jax.grad(f)).lower(logits, targets).compile().memory_analysis()
          .temp_size_in_bytes for name, f in (("plain", plain), ("lean", lean))}
  # On the CPU, XLA converts the bf16 logits to float32 once for the forward's reductions: one
  # float32 [B, T, V] array (2 MiB here, beside the [B, T] logsumexp) is the floor, and a second
  # would be the copy for the backward that the custom VJP avoids. optax's float32 loss kept two
  # on jaxlib 0.10's XLA (4 MiB); newer XLA fuses it down to one, so lean must match, not beat it.
  float32_copy = 2 * 64 * 4096 * 4
  assert temp["lean"] <= temp["plain"]
  assert temp["lean"] < 2 * float32_copy, temp


# ----------------------------------------------------------------------------------------------
# Hits, counted in the loss's own pass.


def with_hits(seed):
  """Float32 logits whose rows have one maximum each, and targets on it for about half."""
  logits, targets, _ = example(jnp.float32, seed)
  top = np.asarray(logits).argmax(-1)
  on_top = np.random.default_rng(seed).uniform(size=top.shape) < 0.5
  return logits, jnp.asarray(np.where(on_top, top, targets), jnp.int32)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_hits_are_argmax_hits_without_ties(smoothing):
  logits, targets = with_hits(2)
  row_max = np.asarray(logits).max(-1, keepdims=True)
  assert np.all((np.asarray(logits) == row_max).sum(-1) == 1)  # no ties
  got = losses.token_losses(logits, targets, smoothing)
  want = np.asarray(jnp.argmax(logits, -1) == targets, np.float32)
  assert 0 < want.sum() < want.size
  np.testing.assert_array_equal(got.correct, want)
  assert got.correct.dtype == jnp.float32
  objective, nll = losses.cross_entropy(logits, targets, smoothing)
  np.testing.assert_array_equal(got.objective, objective)
  np.testing.assert_array_equal(got.nll, nll)


def test_a_tie_for_the_maximum_counts_for_every_tied_id():
  """argmax takes the first of tied ids; the loss's hits take any of them."""
  logits = jnp.asarray([[0.0, 2.0, -1.0, 2.0], [0.0, 2.0, -1.0, 2.0], [0.0, 2.0, -1.0, 2.0]])
  targets = jnp.asarray([1, 3, 0])
  np.testing.assert_array_equal(jnp.argmax(logits, -1) == targets, [True, False, False])
  np.testing.assert_array_equal(losses.token_losses(logits, targets).correct, [1.0, 1.0, 0.0])


def test_hits_carry_no_gradient():
  logits, targets = with_hits(3)
  grad = jax.grad(lambda z: losses.token_losses(z, targets).correct.sum())(logits)
  np.testing.assert_array_equal(grad, np.zeros(logits.shape))


# ----------------------------------------------------------------------------------------------
# A padded vocabulary: the columns past vocab_size are left out.

WIDTH = 48  # VOCAB rounded up to a multiple of 16


def padded(logits, value):
  """`logits` widened to WIDTH columns holding `value` (huge: any leak would show)."""
  extra = jnp.full(logits.shape[:-1] + (WIDTH - VOCAB,), value, logits.dtype)
  return jnp.concatenate([logits, extra], -1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("value", [1e4, -1e4, 0.0])
def test_padded_columns_change_no_value_and_get_no_gradient(smoothing, value):
  logits, targets = with_hits(4)
  weights = jnp.asarray(np.random.default_rng(4).uniform(0, 1, targets.shape), jnp.float32)

  def summed_losses(z, vocab_size):
    out = losses.token_losses(z, targets, smoothing, vocab_size)
    return jnp.sum(out.objective * weights), (jnp.sum(out.nll * weights), out.correct)

  grad_fn = jax.value_and_grad(summed_losses, has_aux=True)
  (objective, (nll, correct)), grad = grad_fn(padded(logits, value), VOCAB)
  want_objective, want_nll, want_grad = textbook(logits, targets, np.asarray(weights), smoothing)
  np.testing.assert_allclose(objective, want_objective, rtol=1e-6)
  np.testing.assert_allclose(nll, want_nll, rtol=1e-6)
  np.testing.assert_array_equal(correct, np.asarray(jnp.argmax(logits, -1) == targets))
  np.testing.assert_allclose(grad[..., :VOCAB], want_grad, atol=1e-6)
  np.testing.assert_array_equal(grad[..., VOCAB:], 0.0)
  (sliced_objective, (sliced_nll, _)), sliced_grad = grad_fn(logits, None)
  np.testing.assert_allclose(objective, sliced_objective, rtol=1e-6)
  np.testing.assert_allclose(nll, sliced_nll, rtol=1e-6)
  np.testing.assert_allclose(grad[..., :VOCAB], sliced_grad, rtol=2e-6, atol=1e-7)  # sum order
  if not smoothing:
    plain = lambda z: jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(
        z[..., :VOCAB], targets))
    np.testing.assert_allclose(grad, jax.grad(plain)(padded(logits, value)), atol=1e-6)


def test_a_vocab_size_wider_than_the_logits_is_refused():
  logits, targets = with_hits(5)
  with pytest.raises(ValueError, match=r"vocab_size=38 must be in \[1, 37\]"):
    losses.token_losses(logits, targets, 0.0, VOCAB + 1)
