"""The token loops of autoregressive decoding on a KV cache: greedy, sampling and beam search.

Every search runs its token loop inside `lax.while_loop`s, so under `jax.jit` it compiles
once, whatever the number of new tokens. The searches are written against a pure function that
feeds one token per sequence and returns the next-token logits:

  tokens_to_logits(tokens_B1, cache) -> (logits_BV, new_cache)

`cache` is any pytree whose leaves all lead with the batch dimension B (the model KV cache:
`cached_key`, `cached_value` [B, K, L, H] and `cache_index` [B]). Beam search repeats
every leaf per beam ([B * beam_size, ...], beams of one example next to each other) and
reorders the leaves as it reorders the beams.

Searches. `first_tokens_B` is the last known token of each sequence, not yet fed to the
model (the last prompt token, or the decoder start token); N = max_new_tokens.

  greedy(tokens_to_logits, cache, first_tokens_B, *, max_new_tokens, eos_id, pad_id,
         eos_check_every=None)
  sample(..., rng, temperature=1.0, top_k=None, top_p=None)      temperature 0 = greedy
  beam_search(..., beam_size, length_penalty_alpha=0.6)

greedy and sample return `Decoded(tokens_BN, lengths_B, logprobs_B)`; beam_search returns
`BeamSearchOutput` with the best sequence per example, its score, and all beams with
their scores, best first. Tokens are the N new tokens: a sequence's EOS is kept and
followed by `pad_id`; lengths count the tokens up to and including EOS (N without one);
`logprobs_B` is the sum of the model's log-probabilities of those tokens (of its plain
softmax: temperature 1, no top-k or top-p).
`eos_id=None` never stops early; a tuple of ids (a generation_config.json's list) stops at any
of them. Beam scores are log P(sequence) / ((5 + length) / 6)^alpha, the GNMT / t5x length
penalty; a beam that reaches N tokens without EOS ends there.

The end test (every sequence has its EOS; for beam search, no live beam can still win) runs
only every `eos_check_every` tokens (C): a `lax.while_loop` over chunks, each chunk a
`lax.scan` of C steps (of N mod C for the last one), whose trip count XLA knows. On a GPU a
while loop's condition goes to the host at every iteration, so C = 1 (a test before every
token) pays that round trip per token, and C = 16 once per 16 tokens, at the cost of up to
C - 1 steps after the end. Steps after the end change nothing that is returned, so the
outputs are the same for every C. Where C does not divide N the program holds the model step
twice (the chunks' scan and the last one), which lengthens its compilation. C = None (the
default) is 16 on a GPU and 1 elsewhere: CPU and TPU loops test their condition on the device
that runs them, so there C = 1 costs nothing and compiles the least.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from models.errors import InputError

PyTree = Any
TokensToLogits = Callable[[jax.Array, PyTree], tuple[jax.Array, PyTree]]
EosIds = int | tuple[int, ...] | None  # the token(s) that end a sequence

# A finite "minus infinity" for beam log-probs, so that sums and differences stay finite.
NEG_INF = -1.0e7
GPU_EOS_CHECK_EVERY = 16  # Tokens between two end tests on a GPU (see the module docstring).


class Decoded(NamedTuple):
  tokens_BN: jax.Array   # int32 new tokens, pad_id after each sequence's EOS
  lengths_B: jax.Array   # int32 tokens up to and including EOS
  logprobs_B: jax.Array  # float32 sum of the model's log-probabilities of those tokens


class BeamSearchOutput(NamedTuple):
  tokens_BN: jax.Array         # the best beam of each example
  lengths_B: jax.Array
  scores_B: jax.Array          # log-prob / length penalty of the best beam
  beam_tokens_BKN: jax.Array   # every finished beam, best first
  beam_lengths_BK: jax.Array
  beam_scores_BK: jax.Array    # about NEG_INF where fewer than K sequences exist
  logprobs_B: jax.Array        # log-prob of the best beam: scores_B times its length penalty


# ---------------------------------------------------------------------------------------
# Cache helpers


def _check_cache(cache: PyTree, batch_size: int):
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch_size:
      raise ValueError(
          f"Cache leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, but decoding "
          f"needs every cache leaf to lead with the batch dimension ({batch_size}); move "
          "per-layer or scalar state into batch-leading arrays.")


def expand_to_beams(tree: PyTree, beam_size: int) -> PyTree:
  """Repeats every batch-leading leaf per beam: [B, ...] -> [B * beam_size, ...]."""
  return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def _gather_beams(tree: PyTree, parent_BK: jax.Array) -> PyTree:
  """Leaf rows [B * K, ...] of the chosen parent beams, per example."""
  batch_size, beam_size = parent_BK.shape
  rows = (jnp.arange(batch_size)[:, None] * beam_size + parent_BK).reshape(-1)
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)



def _is_eos(tokens: jax.Array, eos_id: EosIds) -> jax.Array:
  """Where `tokens` are the EOS (any of a tuple of them)."""
  return jnp.isin(tokens, jnp.asarray(eos_id))


def _lengths(tokens_BN: jax.Array, eos_id: EosIds) -> jax.Array:
  batch_size, max_new_tokens = tokens_BN.shape
  if eos_id is None:
    return jnp.full((batch_size,), max_new_tokens, jnp.int32)
  is_eos_BN = _is_eos(tokens_BN, eos_id)
  first_eos_B = jnp.argmax(is_eos_BN, axis=-1).astype(jnp.int32)
  return jnp.where(is_eos_BN.any(axis=-1), first_eos_B + 1, max_new_tokens)


def check_max_new_tokens(max_new_tokens: int):
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")


def eos_check_interval(eos_check_every: int | None) -> int:
  """C itself, or for None the backend's default: 16 on a GPU, 1 elsewhere."""
  if eos_check_every is None:
    return GPU_EOS_CHECK_EVERY if jax.default_backend() == "gpu" else 1
  check_eos_check_every(eos_check_every)
  return eos_check_every


def check_eos_check_every(eos_check_every: int | None):
  if eos_check_every is None:
    return
  if not isinstance(eos_check_every, int) or eos_check_every < 1:
    raise InputError(f"eos_check_every must be a positive int (1: test for the end before "
                     f"every token), got {eos_check_every!r}.")


def _check_common(first_tokens_B, max_new_tokens: int, eos_check_every: int | None) -> int:
  """Checks the arguments every search takes; returns the end-test interval C."""
  if jnp.ndim(first_tokens_B) != 1:
    raise ValueError(f"first_tokens_B must be 1-D [batch], got shape {jnp.shape(first_tokens_B)}.")
  check_max_new_tokens(max_new_tokens)
  return eos_check_interval(eos_check_every)


def _run_steps(keep_going: Callable[[Any], jax.Array], step: Callable[[Any], Any], state, *,
               num_steps: int, check_every: int):
  """Applies `step` to `state` (a NamedTuple with a `step` counter from 0) num_steps times, or
  until keep_going(state) is false, tested only before every check_every steps."""
  def steps(count):
    if count == 1:
      return step
    return lambda state: lax.scan(lambda s, _: (step(s), None), state, length=count)[0]

  chunks, rest = divmod(num_steps, check_every)
  for last_step, count in ((chunks * check_every, check_every), (num_steps, rest)):
    if last_step and count:
      state = lax.while_loop(
          lambda s, last_step=last_step: (s.step < last_step) & keep_going(s), steps(count),
          state)
  return state


# ---------------------------------------------------------------------------------------
# Greedy and sampling


class _LoopState(NamedTuple):
  step: jax.Array
  tokens_BN: jax.Array
  last_B: jax.Array
  done_B: jax.Array
  logprobs_B: jax.Array
  cache: PyTree


def _decode_loop(tokens_to_logits: TokensToLogits, cache: PyTree, first_tokens_B: jax.Array,
                 choose: Callable[[jax.Array, jax.Array], jax.Array], *, max_new_tokens: int,
                 eos_id: EosIds, pad_id: int, eos_check_every: int) -> Decoded:
  """Feeds each chosen token back until every sequence has its EOS or N tokens.

  A step after every sequence's EOS writes pad_id where pad_id already is and adds no
  log-probability, so steps run past the end (eos_check_every > 1) change no output.
  """
  eos_check_every = _check_common(first_tokens_B, max_new_tokens, eos_check_every)
  batch_size = first_tokens_B.shape[0]
  _check_cache(cache, batch_size)

  def keep_going(state: _LoopState):
    return ~jnp.all(state.done_B)

  def step(state: _LoopState) -> _LoopState:
    logits_BV, cache = tokens_to_logits(state.last_B[:, None], state.cache)
    logits_BV = logits_BV.astype(jnp.float32)
    next_B = choose(logits_BV, state.step).astype(jnp.int32)
    next_B = jnp.where(state.done_B, pad_id, next_B)
    # log softmax at the chosen token only: two reductions over the vocabulary, no [B, V] out.
    logprob_B = (jnp.take_along_axis(logits_BV, next_B[:, None], axis=-1)[:, 0]
                 - jax.nn.logsumexp(logits_BV, axis=-1))
    done_B = state.done_B if eos_id is None else state.done_B | _is_eos(next_B, eos_id)
    return _LoopState(step=state.step + 1,
                      tokens_BN=lax.dynamic_update_slice_in_dim(
                          state.tokens_BN, next_B[:, None], state.step, axis=1),
                      last_B=next_B, done_B=done_B,
                      logprobs_B=state.logprobs_B + jnp.where(state.done_B, 0.0, logprob_B),
                      cache=cache)

  state = _LoopState(step=jnp.int32(0),
                     tokens_BN=jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32),
                     last_B=jnp.asarray(first_tokens_B, jnp.int32),
                     done_B=jnp.zeros((batch_size,), bool),
                     logprobs_B=jnp.zeros((batch_size,), jnp.float32), cache=cache)
  state = _run_steps(keep_going, step, state, num_steps=max_new_tokens,
                     check_every=eos_check_every)
  return Decoded(state.tokens_BN, _lengths(state.tokens_BN, eos_id), state.logprobs_B)


def greedy(tokens_to_logits: TokensToLogits, cache: PyTree, first_tokens_B: jax.Array, *,
           max_new_tokens: int, eos_id: EosIds, pad_id: int,
           eos_check_every: int | None = None) -> Decoded:
  """Picks the most likely token at every step."""
  return _decode_loop(tokens_to_logits, cache, first_tokens_B,
                      lambda logits_BV, _: jnp.argmax(logits_BV, axis=-1),
                      max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                      eos_check_every=eos_check_every)


def keep_top_k(logits_BV: jax.Array, top_k: int) -> jax.Array:
  """Sets every logit below the k-th largest of its row to -inf (ties are kept)."""
  kth_B1 = lax.top_k(logits_BV, top_k)[0][:, -1:]
  return jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)


def keep_top_p(logits_BV: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches top_p."""
  sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept_BV = mass_before_BV < top_p
  threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def sample(tokens_to_logits: TokensToLogits, cache: PyTree, first_tokens_B: jax.Array, *,
           max_new_tokens: int, eos_id: EosIds, pad_id: int, rng: jax.Array,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_check_every: int | None = None) -> Decoded:
  """Samples from softmax(logits / temperature), cut to the top k and/or top p tokens.

  Filters apply in that order: temperature, top-k, top-p. Temperature 0 is greedy. Step t
  draws with `jax.random.fold_in(rng, t)`, so the same rng gives the same tokens.
  """
  if temperature < 0:
    raise InputError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise InputError(f"top_k must be a positive int or None, got {top_k!r}.")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise InputError(f"top_p must be in (0, 1] or None, got {top_p}.")
  if temperature == 0:
    return greedy(tokens_to_logits, cache, first_tokens_B, max_new_tokens=max_new_tokens,
                  eos_id=eos_id, pad_id=pad_id, eos_check_every=eos_check_every)

  def choose(logits_BV, step):
    logits_BV = logits_BV / temperature
    if top_k is not None:
      logits_BV = keep_top_k(logits_BV, min(top_k, logits_BV.shape[-1]))
    if top_p is not None and top_p < 1.0:
      logits_BV = keep_top_p(logits_BV, top_p)
    return jax.random.categorical(jax.random.fold_in(rng, step), logits_BV, axis=-1)

  return _decode_loop(tokens_to_logits, cache, first_tokens_B, choose,
                      max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                      eos_check_every=eos_check_every)


# ---------------------------------------------------------------------------------------
# Beam search


def length_penalty(length, alpha: float):
  """The GNMT / t5x brevity penalty ((5 + length) / 6)^alpha that divides log-probs."""
  return ((5.0 + length) / 6.0) ** alpha


class _BeamState(NamedTuple):
  step: jax.Array
  live_tokens_BKN: jax.Array
  live_last_BK: jax.Array
  live_logprobs_BK: jax.Array
  cache: PyTree                 # leaves [B * K, ...], rows of the live beams
  finished_tokens_BKN: jax.Array
  finished_scores_BK: jax.Array


def beam_search(tokens_to_logits: TokensToLogits, cache: PyTree, first_tokens_B: jax.Array, *,
                max_new_tokens: int, eos_id: EosIds, pad_id: int, beam_size: int,
                length_penalty_alpha: float = 0.6,
                eos_check_every: int | None = None) -> BeamSearchOutput:
  """Keeps the beam_size most likely unfinished prefixes and the best finished sequences.

  Each step extends every live beam by every token, keeps the best 2K candidates (so K
  stay live even if K of them end), moves those ending in EOS (or reaching N tokens) into
  the finished set by length-penalized score, and keeps the K best others live. It stops
  early once no live beam can beat the worst finished one of any example; steps run past
  that point (eos_check_every > 1) keep every beam as it was there.
  """
  eos_check_every = _check_common(first_tokens_B, max_new_tokens, eos_check_every)
  if not isinstance(beam_size, int) or beam_size < 1:
    raise InputError(f"beam_size must be a positive int, got {beam_size!r}.")
  batch_size, beams, n = first_tokens_B.shape[0], beam_size, max_new_tokens
  _check_cache(cache, batch_size)

  def max_penalty(step):
    # Sequences still live will end with a length in [step + 1, N]; the penalty is monotone.
    return jnp.maximum(length_penalty(step + 1.0, length_penalty_alpha),
                       length_penalty(float(n), length_penalty_alpha))

  def keep_going(state: _BeamState):
    best_possible_B = state.live_logprobs_BK.max(axis=-1) / max_penalty(state.step)
    worst_finished_B = state.finished_scores_BK.min(axis=-1)
    return ~jnp.all(worst_finished_B > best_possible_B)

  def step(state: _BeamState) -> _BeamState:
    logits_FV, cache = tokens_to_logits(state.live_last_BK.reshape(-1, 1), state.cache)
    vocab_size = logits_FV.shape[-1]
    logprobs_BKV = jax.nn.log_softmax(logits_FV.astype(jnp.float32), axis=-1).reshape(
        batch_size, beams, vocab_size) + state.live_logprobs_BK[:, :, None]

    # The 2K best extensions of all beams: C = 2K candidates.
    cand_logprobs_BC, flat_BC = lax.top_k(logprobs_BKV.reshape(batch_size, -1), 2 * beams)
    cand_parent_BC, cand_token_BC = flat_BC // vocab_size, flat_BC % vocab_size
    cand_tokens_BCN = jnp.take_along_axis(
        state.live_tokens_BKN, cand_parent_BC[:, :, None], axis=1)
    cand_tokens_BCN = cand_tokens_BCN.at[:, :, state.step].set(cand_token_BC)
    ends_BC = jnp.broadcast_to(state.step == n - 1, cand_token_BC.shape)
    if eos_id is not None:
      ends_BC = ends_BC | _is_eos(cand_token_BC, eos_id)

    # Live set: the K best candidates that did not end.
    live_logprobs_BK, pick_BK = lax.top_k(jnp.where(ends_BC, NEG_INF, cand_logprobs_BC), beams)
    parent_BK = jnp.take_along_axis(cand_parent_BC, pick_BK, axis=1)

    # Finished set: the K best of the old finished ones and the candidates that ended.
    cand_scores_BC = jnp.where(
        ends_BC, cand_logprobs_BC / length_penalty(state.step + 1.0, length_penalty_alpha),
        NEG_INF)
    finished_scores_BK, best_BK = lax.top_k(
        jnp.concatenate([state.finished_scores_BK, cand_scores_BC], axis=1), beams)
    finished_tokens_BKN = jnp.take_along_axis(
        jnp.concatenate([state.finished_tokens_BKN, cand_tokens_BCN], axis=1),
        best_BK[:, :, None], axis=1)

    return _BeamState(
        step=state.step + 1,
        live_tokens_BKN=jnp.take_along_axis(cand_tokens_BCN, pick_BK[:, :, None], axis=1),
        live_last_BK=jnp.take_along_axis(cand_token_BC, pick_BK, axis=1),
        live_logprobs_BK=live_logprobs_BK,
        cache=_gather_beams(cache, parent_BK),
        finished_tokens_BKN=finished_tokens_BKN,
        finished_scores_BK=finished_scores_BK)

  def step_unless_ended(state: _BeamState) -> _BeamState:
    """A step, or, once the search has ended, the beams unchanged (the cache is not returned)."""
    stepped = step(state)
    going = keep_going(state)
    beams_kept = jax.tree.map(lambda new, old: jnp.where(going, new, old),
                              stepped._replace(cache=None), state._replace(cache=None))
    return beams_kept._replace(cache=stepped.cache)

  pad_BKN = jnp.full((batch_size, beams, n), pad_id, jnp.int32)
  state = _BeamState(
      step=jnp.int32(0),
      live_tokens_BKN=pad_BKN,
      live_last_BK=jnp.repeat(jnp.asarray(first_tokens_B, jnp.int32)[:, None], beams, axis=1),
      # Only beam 0 is real at the start: the others would repeat it.
      live_logprobs_BK=jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1)), (batch_size, 1)),
      cache=expand_to_beams(cache, beams),
      finished_tokens_BKN=pad_BKN,
      finished_scores_BK=jnp.full((batch_size, beams), NEG_INF))
  state = _run_steps(keep_going, step if eos_check_every == 1 else step_unless_ended, state,
                     num_steps=n, check_every=eos_check_every)

  tokens_BKN = state.finished_tokens_BKN
  lengths_BK = _lengths(tokens_BKN.reshape(batch_size * beams, n), eos_id).reshape(
      batch_size, beams)
  scores_B = state.finished_scores_BK[:, 0]
  return BeamSearchOutput(
      tokens_BN=tokens_BKN[:, 0], lengths_B=lengths_BK[:, 0],
      scores_B=scores_B, beam_tokens_BKN=tokens_BKN,
      beam_lengths_BK=lengths_BK, beam_scores_BK=state.finished_scores_BK,
      logprobs_B=scores_B * length_penalty(lengths_BK[:, 0], length_penalty_alpha))

