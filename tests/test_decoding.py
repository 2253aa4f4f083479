"""Decoding (models/decoding.py) against numpy references: argmax chains, exhaustive search,
empirical sampling frequencies; and, for the real models, against full forward passes."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding

EOS, PAD = 1, 0


# ---------------------------------------------------------------------------------------
# A toy model: second-order Markov chain with a step-dependent bias, in jax and numpy.


class Toy:
  """logits(next | prev, cur, step) = table[prev, cur] + bias[step]; the cache holds prev
  and step (both batch-leading), so beam search must reorder it to get the right logits."""

  def __init__(self, table_VVV, bias_NV):
    self.table = np.asarray(table_VVV, np.float64)
    self.bias = np.asarray(bias_NV, np.float64)
    self.traces = 0

  @classmethod
  def random(cls, seed, vocab_size, max_steps, scale=2.0):
    rng = np.random.default_rng(seed)
    return cls(scale * rng.normal(size=(vocab_size,) * 3), rng.normal(size=(max_steps, vocab_size)))

  @classmethod
  def first_order(cls, probs_VV, max_steps):
    """A chain where the next token depends only on the fed token."""
    logits_VV = np.log(np.maximum(np.asarray(probs_VV, np.float64), 1e-13))
    vocab_size = logits_VV.shape[0]
    return cls(np.broadcast_to(logits_VV, (vocab_size,) * 3), np.zeros((max_steps, vocab_size)))

  def cache(self, prev_B):
    prev_B = jnp.asarray(prev_B, jnp.int32)
    return {"prev": prev_B, "step": jnp.zeros_like(prev_B)}

  def tokens_to_logits(self, tokens_B1, cache):
    self.traces += 1
    cur_B = tokens_B1[:, 0]
    logits_BV = (jnp.asarray(self.table, jnp.float32)[cache["prev"], cur_B]
                 + jnp.asarray(self.bias, jnp.float32)[cache["step"]])
    return logits_BV, {"prev": cur_B, "step": cache["step"] + 1}

  def logprobs(self, prev, cur, step):
    logits = self.table[prev, cur] + self.bias[step]
    return logits - np.logaddexp.reduce(logits)

  def sequence_logprob(self, prev, first, tokens):
    total = 0.0
    for step, token in enumerate(tokens):
      total += self.logprobs(prev, first, step)[token]
      prev, first = first, token
    return total


def np_greedy(toy, prev_B, first_B, n, eos_id):
  out = np.full((len(first_B), n), PAD)
  for b, (prev, cur) in enumerate(zip(prev_B, first_B)):
    for step in range(n):
      token = int(np.argmax(toy.logprobs(prev, cur, step)))
      out[b, step] = token
      if token == eos_id:
        break
      prev, cur = cur, token
  return out


def np_all_sequences(toy, prev, first, n, eos_id, alpha):
  """Every sequence (ending at its first EOS or at n tokens) with its penalized score."""
  results = []
  for length in range(1, n + 1):
    for tokens in itertools.product(range(toy.table.shape[0]), repeat=length):
      if eos_id in tokens[:-1] or (length < n and tokens[-1] != eos_id):
        continue
      score = toy.sequence_logprob(prev, first, tokens) / ((5 + length) / 6) ** alpha
      results.append((score, tokens + (PAD,) * (n - length)))
  return sorted(results, key=lambda r: -r[0])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run_jitted(search, toy, settings, cache, first_B, rng):
  rng_kwargs = {} if rng is None else {"rng": rng}
  return search(toy.tokens_to_logits, cache, first_B, **dict(settings), **rng_kwargs)


def run(search, toy, prev_B, first_B, rng=None, **settings):
  """Runs a search under jit on the toy model (compiled once per search and settings)."""
  out = _run_jitted(search, toy, tuple(sorted(settings.items())), toy.cache(prev_B),
                    jnp.asarray(first_B, jnp.int32), rng)
  return jax.tree.map(np.asarray, out)


# ---------------------------------------------------------------------------------------
# Greedy, EOS and padding


def test_greedy_equals_numpy_argmax_chain():
  toy = Toy.random(0, vocab_size=7, max_steps=6)
  prev_B, first_B = [2, 3, 4, 5, 6, 0], [3, 4, 5, 6, 2, 1]
  out = run(decoding.greedy, toy, prev_B, first_B, max_new_tokens=6, eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(out.tokens_BN, np_greedy(toy, prev_B, first_B, 6, EOS))
  out = run(decoding.greedy, toy, prev_B, first_B, max_new_tokens=6, eos_id=None, pad_id=PAD)
  np.testing.assert_array_equal(out.tokens_BN, np_greedy(toy, prev_B, first_B, 6, None))
  np.testing.assert_array_equal(out.lengths_B, 6)


def test_the_token_loop_is_traced_once():
  toy = Toy.random(0, vocab_size=5, max_steps=8)
  for search, kwargs in [(decoding.greedy, {}), (decoding.beam_search, {"beam_size": 2}),
                         (decoding.sample, {"rng": jax.random.key(0), "top_p": 0.9})]:
    toy.traces = 0
    run(search, toy, [0], [2], max_new_tokens=8, eos_id=EOS, pad_id=PAD, **kwargs)
    assert toy.traces == 1, search.__name__


# From token 0 (start): A=2 or B=3. A's continuations are all unlikely; B is then sure to end.
START, A, B = 0, 2, 3
BEAM_BEATS_GREEDY = [[0, 0, .6, .4],     # start -> A (greedy) or B
                     [1, 0, 0, 0],       # after EOS (never used)
                     [0, .35, .33, .32],  # A -> anything, nothing likely
                     [0, .9, .05, .05]]  # B -> EOS


def test_eos_stops_each_sequence_and_pads_after_it():
  # Per example: EOS after 1, 2 and 3 new tokens; the last example never ends.
  probs = [[0, 0, .2, .8, 0],   # start -> B
           [1, 0, 0, 0, 0],
           [0, .9, 0, .1, 0],   # A -> EOS
           [0, 0, .9, 0, .1],   # B -> A
           [0, 0, 0, 0, 1]]     # 4 -> 4 forever
  toy = Toy.first_order(probs, max_steps=5)
  prev_B, first_B = [0, 0, 0, 0], [2, 3, 0, 4]
  want = np.array([[EOS, PAD, PAD, PAD, PAD], [A, EOS, PAD, PAD, PAD],
                   [B, A, EOS, PAD, PAD], [4, 4, 4, 4, 4]])
  common = dict(max_new_tokens=5, eos_id=EOS, pad_id=PAD)
  for out in [run(decoding.greedy, toy, prev_B, first_B, **common),
              run(decoding.sample, toy, prev_B, first_B, rng=jax.random.key(3), top_k=1, **common),
              run(decoding.beam_search, toy, prev_B, first_B, beam_size=2, **common)]:
    np.testing.assert_array_equal(out.tokens_BN, want)
    np.testing.assert_array_equal(out.lengths_B, [1, 2, 3, 5])


def test_a_tuple_of_eos_ids_stops_at_any_of_them():
  """As a generation_config.json's eos_token_id list: every search ends at the first of them."""
  chain = [[1, 0, 0, 0, 0],   # (start, never fed)
           [1, 0, 0, 0, 0],   # EOS (never fed)
           [0, 1, 0, 0, 0],   # A -> EOS
           [0, 0, 1, 0, 0],   # B -> A
           [0, 0, 0, 1, 0]]   # 4 -> B
  toy = Toy.first_order(chain, max_steps=4)
  for eos_id, want, length in [(EOS, [B, A, EOS, PAD], 3), ((EOS, A), [B, A, PAD, PAD], 2),
                               ((4, B), [B, PAD, PAD, PAD], 1)]:
    common = dict(max_new_tokens=4, eos_id=eos_id, pad_id=PAD)
    for out in [run(decoding.greedy, toy, [0], [4], **common),
                run(decoding.sample, toy, [0], [4], rng=jax.random.key(0), top_k=1, **common),
                run(decoding.beam_search, toy, [0], [4], beam_size=2, **common)]:
      np.testing.assert_array_equal(out.tokens_BN[0], want, err_msg=str(eos_id))
      assert out.lengths_B[0] == length
  assert decoding.Search(eos_id=[EOS, A]).eos_id == (EOS, A)  # A list from JSON: hashable.


# ---------------------------------------------------------------------------------------
# Beam search


def test_beam_search_finds_a_likelier_sequence_than_greedy():
  toy = Toy.first_order(BEAM_BEATS_GREEDY, max_steps=3)
  common = dict(max_new_tokens=3, eos_id=EOS, pad_id=PAD)
  greedy = run(decoding.greedy, toy, [0], [START], **common)
  beam = run(decoding.beam_search, toy, [0], [START], beam_size=2, length_penalty_alpha=0.0,
             **common)
  np.testing.assert_array_equal(greedy.tokens_BN[0, :2], [A, EOS])
  np.testing.assert_array_equal(beam.tokens_BN[0], [B, EOS, PAD])
  greedy_logprob = toy.sequence_logprob(0, START, greedy.tokens_BN[0, :greedy.lengths_B[0]])
  beam_logprob = toy.sequence_logprob(0, START, beam.tokens_BN[0, :beam.lengths_B[0]])
  assert beam_logprob > greedy_logprob + 0.3
  np.testing.assert_allclose(beam.scores_B[0], beam_logprob, rtol=1e-5)


@pytest.mark.parametrize("vocab_size,n,beams,eos_boost", [(4, 3, 18, 0.0), (3, 5, 24, 2.0)])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_with_enough_beams_equals_exhaustive_search(vocab_size, n, beams, eos_boost,
                                                                 alpha):
  # With V tokens (one EOS) there are at most (V-1)^(N-1) live prefixes and V times as many
  # last-step candidates; with 2K >= that, beam search misses nothing and its finished set
  # must be the exhaustive top K, length penalty included. A likely EOS fills the finished
  toy = Toy.random(1, vocab_size=vocab_size, max_steps=n)
  toy.table[..., EOS] += eos_boost
  prev_B, first_B = [0, 2, 0], [1, 0, 2]
  out = run(decoding.beam_search, toy, prev_B, first_B, max_new_tokens=n, eos_id=EOS,
            pad_id=PAD, beam_size=beams, length_penalty_alpha=alpha)
  for b in range(3):
    best = np_all_sequences(toy, prev_B[b], first_B[b], n, EOS, alpha)[:beams]
    np.testing.assert_allclose(out.beam_scores_BK[b], [s for s, _ in best], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.beam_tokens_BKN[b], [t for _, t in best])
    np.testing.assert_array_equal(out.tokens_BN[b], best[0][1])
    for tokens, length in zip(out.beam_tokens_BKN[b], out.beam_lengths_BK[b]):
      assert EOS not in tokens[:length - 1] and (length == n or tokens[length - 1] == EOS)


def test_early_stop_waits_for_a_longer_sequence_that_can_still_win():
  # [EOS] scores log .6 = -0.51 at once; the live [0] (log .4) then goes on almost surely to
  # [0] * 6, scoring (log .4 + 5 log .99) / (11 / 6)^2 = -0.29: the search must not stop on
  # the penalty of the current length, only on that of the longest one.
  toy = Toy.first_order(np.full((2, 2), .5), max_steps=6)
  toy.bias[0, EOS] = np.log(.6 / .4)
  toy.bias[1:, EOS] = np.log(.01 / .99)
  for beam_size in [1, 2]:
    out = run(decoding.beam_search, toy, [0], [0], max_new_tokens=6, eos_id=EOS, pad_id=PAD,
              beam_size=beam_size, length_penalty_alpha=2.0)
    score, tokens = np_all_sequences(toy, 0, 0, 6, EOS, 2.0)[0]
    np.testing.assert_array_equal(out.tokens_BN[0], tokens)
    np.testing.assert_allclose(out.scores_B[0], score, rtol=1e-5)
    np.testing.assert_allclose(score, (np.log(.4) + 5 * np.log(.99)) / (11 / 6) ** 2)


def test_small_beams_score_what_they_return():
  # Each returned beam's score is its log-prob (recomputed in numpy) over its length penalty.
  toy = Toy.random(2, vocab_size=6, max_steps=5)
  out = run(decoding.beam_search, toy, [0, 4], [2, 5], max_new_tokens=5, eos_id=EOS,
            pad_id=PAD, beam_size=3, length_penalty_alpha=0.6)
  for b, (prev, first) in enumerate([(0, 2), (4, 5)]):
    for tokens, length, score in zip(out.beam_tokens_BKN[b], out.beam_lengths_BK[b],
                                     out.beam_scores_BK[b]):
      logprob = toy.sequence_logprob(prev, first, tokens[:length])
      np.testing.assert_allclose(score, logprob / ((5 + length) / 6) ** 0.6, rtol=1e-5)
      np.testing.assert_array_equal(tokens[length:], PAD)
    assert np.all(np.diff(out.beam_scores_BK[b]) <= 0)


def test_length_penalty_favours_longer_sequences_as_alpha_grows():
  # [EOS]: log .5 = -0.69 over 1 token; [A, B, EOS]: log(.5 * .9 * .9) = -0.90 over 3 tokens.
  probs = [[0, .5, .5, 0], [1, 0, 0, 0], [0, .1, 0, .9], [0, .9, 0, .1]]
  toy = Toy.first_order(probs, max_steps=3)
  common = dict(max_new_tokens=3, eos_id=EOS, pad_id=PAD, beam_size=2)
  short = run(decoding.beam_search, toy, [0], [START], length_penalty_alpha=0.0, **common)
  long = run(decoding.beam_search, toy, [0], [START], length_penalty_alpha=2.0, **common)
  np.testing.assert_array_equal(short.tokens_BN[0], [EOS, PAD, PAD])
  np.testing.assert_array_equal(long.tokens_BN[0], [A, B, EOS])
  np.testing.assert_allclose(long.scores_B[0], np.log(.5 * .9 * .9) / (8 / 6) ** 2, rtol=1e-5)


def test_beam_size_one_equals_greedy():
  # EOS is nearly impossible except after token 3, so no branch-off can beat the greedy path.
  toy = Toy.random(3, vocab_size=6, max_steps=6)
  toy.table[..., EOS] -= 30.0
  toy.table[:, 3, EOS] += 40.0
  prev_B, first_B = [0, 2, 4, 5], [2, 4, 5, 0]
  common = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD)
  greedy = run(decoding.greedy, toy, prev_B, first_B, **common)
  beam = run(decoding.beam_search, toy, prev_B, first_B, beam_size=1, **common)
  np.testing.assert_array_equal(beam.tokens_BN, greedy.tokens_BN)
  np.testing.assert_array_equal(beam.lengths_B, greedy.lengths_B)
  assert (greedy.lengths_B < 6).any() and (greedy.lengths_B == 6).any()


# ---------------------------------------------------------------------------------------
# Sampling


def test_top_k_one_and_zero_temperature_equal_greedy():
  toy = Toy.random(4, vocab_size=7, max_steps=6)
  prev_B, first_B = [0, 1, 2, 3, 4], [3, 4, 5, 6, 2]
  common = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD)
  greedy = run(decoding.greedy, toy, prev_B, first_B, **common)
  for seed in range(3):
    for settings in [{"top_k": 1}, {"temperature": 0.0}, {"temperature": 1e-3},
                     {"top_p": 1e-6, "temperature": 3.0}]:
      out = run(decoding.sample, toy, prev_B, first_B, rng=jax.random.key(seed), **settings,
                **common)
      np.testing.assert_array_equal(out.tokens_BN, greedy.tokens_BN, err_msg=str(settings))


PROBS = np.array([.4, .3, .15, .1, .05])


def fixed_distribution(tokens_B1, cache):
  return jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (tokens_B1.shape[0], 5)), cache


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_fixed_distribution(batch, settings, rng):
  return decoding.sample(fixed_distribution, {"unused": jnp.zeros((batch,))},
                         jnp.zeros((batch,), jnp.int32), max_new_tokens=8, eos_id=None,
                         pad_id=PAD, rng=rng, **dict(settings)).tokens_BN


def sample_fixed_distribution(seed, batch=512, **settings):
  """Samples [batch * 8] tokens from a model whose next-token distribution is PROBS."""
  return np.asarray(_sample_fixed_distribution(
      batch, tuple(sorted(settings.items())), jax.random.key(seed))).ravel()


@pytest.mark.parametrize("settings,allowed", [
    ({"top_k": 2}, [0, 1]),
    ({"top_p": 0.65}, [0, 1]),      # .4 < .65 <= .4 + .3
    ({"top_p": 0.75}, [0, 1, 2]),
    ({"top_k": 2, "top_p": 0.5}, [0]),   # top-p after top-k: .57 + .43, not .4 + .3
    ({"top_k": 3, "temperature": 2.0}, [0, 1, 2]),
])
def test_filtered_sampling_stays_in_the_allowed_set(settings, allowed):
  tokens = np.concatenate([sample_fixed_distribution(seed, **settings) for seed in range(3)])
  frequencies = np.bincount(tokens, minlength=5) / tokens.size
  temperature = settings.get("temperature", 1.0)
  want = np.zeros(5)
  want[allowed] = PROBS[allowed] ** (1 / temperature)
  want /= want.sum()
  np.testing.assert_allclose(frequencies, want, atol=0.03)
  assert set(np.unique(tokens)) == set(allowed)


def test_temperature_reshapes_the_distribution():
  for temperature in [0.5, 2.0]:
    tokens = sample_fixed_distribution(0, temperature=temperature)
    want = PROBS ** (1 / temperature) / (PROBS ** (1 / temperature)).sum()
    np.testing.assert_allclose(np.bincount(tokens, minlength=5) / tokens.size, want, atol=0.03)


def test_same_rng_same_output_other_rng_other_output():
  first = sample_fixed_distribution(0, batch=64, top_p=0.9)
  np.testing.assert_array_equal(first, sample_fixed_distribution(0, batch=64, top_p=0.9))
  assert (first != sample_fixed_distribution(1, batch=64, top_p=0.9)).mean() > 0.3


# ---------------------------------------------------------------------------------------
# Log-probabilities


def test_every_search_returns_the_log_probability_of_its_tokens():
  # The model's own log-probabilities (temperature 1, unfiltered), summed up to EOS: numpy.
  toy = Toy.random(5, vocab_size=6, max_steps=5)
  prev_B, first_B = [0, 2, 4, 5], [2, 4, 5, 0]
  common = dict(max_new_tokens=5, eos_id=EOS, pad_id=PAD)
  outs = [run(decoding.greedy, toy, prev_B, first_B, **common),
          run(decoding.sample, toy, prev_B, first_B, rng=jax.random.key(1), temperature=2.0,
              top_k=3, **common),
          run(decoding.beam_search, toy, prev_B, first_B, beam_size=3, **common)]
  assert (outs[0].lengths_B < 5).any()  # Tokens after EOS must not count.
  for out in outs:
    for b, (prev, first) in enumerate(zip(prev_B, first_B)):
      logprob = toy.sequence_logprob(prev, first, out.tokens_BN[b, :out.lengths_B[b]])
      np.testing.assert_allclose(out.logprobs_B[b], logprob, rtol=1e-5, err_msg=str(type(out)))


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_settings_and_caches_are_rejected():
  toy = Toy.random(0, vocab_size=4, max_steps=2)
  cache, first_B = toy.cache([0, 0]), jnp.array([1, 2])
  common = dict(max_new_tokens=2, eos_id=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match="top_p"):
    decoding.sample(toy.tokens_to_logits, cache, first_B, rng=jax.random.key(0), top_p=1.5,
                    **common)
  with pytest.raises(ValueError, match="top_k"):
    decoding.sample(toy.tokens_to_logits, cache, first_B, rng=jax.random.key(0), top_k=0,
                    **common)
  with pytest.raises(ValueError, match="temperature"):
    decoding.sample(toy.tokens_to_logits, cache, first_B, rng=jax.random.key(0),
                    temperature=-1.0, **common)
  with pytest.raises(ValueError, match="beam_size"):
    decoding.beam_search(toy.tokens_to_logits, cache, first_B, beam_size=0, **common)
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.greedy(toy.tokens_to_logits, cache, first_B, max_new_tokens=0, eos_id=EOS,
                    pad_id=PAD)
  with pytest.raises(ValueError, match=r"\['layers'\].*batch dimension"):
    decoding.greedy(toy.tokens_to_logits, {**cache, "layers": jnp.zeros((3, 2))}, first_B,
                    **common)


# ---------------------------------------------------------------------------------------
# The real models: cached decoding against full (uncached) forward passes.

from models import presets  # noqa: E402
from models.transformer import DecoderOnly, EncoderDecoder  # noqa: E402

V, N = 13, 4
TINY = dict(num_layers=2, d_model=16, num_heads=2, d_ff=32)
DECODER_ONLY = {
    "gpt2": presets.gpt2(V, max_len=16, **TINY),
    "llama_scanned_gqa": presets.llama(V, **{**TINY, "num_heads": 4}, num_kv_heads=2,
                                       scan_layers=True),
}
ENCODER_DECODER = {
    "t5": presets.t5_v1_1(V, **TINY, head_dim=8, relative_buckets=8, relative_max_distance=16),
    "base_scanned": presets.transformer_base(V, **TINY, scan_layers=True),
}


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def penalty(length, alpha):
  return ((5 + length) / 6) ** alpha


class LM:
  """A tiny DecoderOnly with right-padded prompts of different lengths (junk after them)."""

  def __init__(self, name):
    self.module = DecoderOnly(DECODER_ONLY[name])
    self.params = jax.jit(self.module.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
        "params"]
    rng = np.random.default_rng(0)
    self.lengths = np.array([2, 5, 4])
    self.prompt = rng.integers(2, V, size=(3, 5))
    self.forward = jax.jit(lambda tokens: self.module.apply({"params": self.params}, tokens))

  def full_logits(self, continuation_BN):
    """Uncached logits of prompt + continuation, per example at positions len-1, len, ..."""
    buffer = np.zeros((3, 5 + continuation_BN.shape[1]), np.int32)
    for b, length in enumerate(self.lengths):
      buffer[b, :length] = self.prompt[b, :length]
      buffer[b, length:length + continuation_BN.shape[1]] = continuation_BN[b]
    logits = np.asarray(self.forward(buffer))
    return np.stack([logits[b, length - 1:length - 1 + continuation_BN.shape[1]]
                     for b, length in enumerate(self.lengths)])

  def generate(self, search, rng=None):
    return jax.tree.map(np.asarray, decoding.generate_decoder_only(
        self.module, self.params, jnp.asarray(self.prompt), jnp.asarray(self.lengths), search,
        rng))


class Seq2Seq:
  """A tiny EncoderDecoder with padded sources of different lengths (junk after them)."""

  def __init__(self, name):
    self.module = EncoderDecoder(ENCODER_DECODER[name])
    self.params = jax.jit(self.module.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                            jnp.zeros((1, 3), jnp.int32))["params"]
    rng = np.random.default_rng(1)
    self.source = rng.integers(2, V, size=(3, 6))
    self.mask = np.arange(6)[None] < np.array([[3], [6], [5]])
    self.forward = jax.jit(lambda source, target, mask: self.module.apply(
        {"params": self.params}, source, target, encoder_padding_mask=mask))

  def full_logits(self, continuation_BN):
    """Uncached decoder logits after the start token 0, then the continuation."""
    decoder_input = np.concatenate([np.zeros((3, 1), np.int32), continuation_BN[:, :-1]], 1)
    return np.asarray(self.forward(self.source, decoder_input, self.mask))

  def generate(self, search):
    return jax.tree.map(np.asarray, decoding.generate_encoder_decoder(
        self.module, self.params, jnp.asarray(self.source), search,
        encoder_padding_mask_BS=jnp.asarray(self.mask), decoder_start_id=0))


def prepare(model):
  if isinstance(model, LM):
    return decoding.prepare_decoder_only(model.module, model.params, jnp.asarray(model.prompt),
                                         jnp.asarray(model.lengths), N)
  return decoding.prepare_encoder_decoder(
      model.module, model.params, jnp.asarray(model.source),
      encoder_padding_mask_BS=jnp.asarray(model.mask), decoder_start_id=0, max_new_tokens=N)


def reference_greedy(model, eos_id):
  """Argmax over repeated full forward passes, with EOS and padding per example."""
  tokens = np.zeros((3, N), np.int32)
  for step in range(N):
    tokens[:, step] = np.argmax(model.full_logits(tokens)[:, step], axis=-1)
  if eos_id is not None:
    for row in tokens:
      ends = np.flatnonzero(row == eos_id)
      if ends.size:
        row[ends[0] + 1:] = PAD
  return tokens


MODELS = [(LM, name) for name in DECODER_ONLY] + [(Seq2Seq, name) for name in ENCODER_DECODER]


@functools.cache
def build(family, name):
  return family(name)


@pytest.mark.parametrize("family,name", MODELS)
def test_cached_decoding_reproduces_the_full_forward_pass(family, name):
  model = build(family, name)

  @jax.jit
  def teacher_forced(continuation_BN):
    tokens_to_logits, cache, first_tokens_B = prepare(model)
    inputs_NB = jnp.concatenate([first_tokens_B[:, None], continuation_BN[:, :-1]], axis=1).T

    def step(cache, tokens_B):
      logits_BV, cache = tokens_to_logits(tokens_B[:, None], cache)
      return cache, logits_BV

    return jnp.swapaxes(jax.lax.scan(step, cache, inputs_NB)[1], 0, 1)

  continuation = np.random.default_rng(2).integers(0, V, size=(3, N)).astype(np.int32)
  np.testing.assert_allclose(teacher_forced(continuation), model.full_logits(continuation),
                             atol=1e-5, rtol=1e-5)


def model_searches(model):
  """(EOS id ending example 0 early, greedy, beam of 3): one compile each, shared by tests."""
  eos_id = int(reference_greedy(model, None)[0, 1])
  return eos_id, decoding.Search(method="greedy", max_new_tokens=N, eos_id=eos_id), \
      decoding.Search(method="beam", beam_size=3, max_new_tokens=N, eos_id=eos_id,
                      length_penalty_alpha=0.6)


@pytest.mark.parametrize("family,name", MODELS)
def test_model_greedy_and_beam_search_agree_with_full_forward_passes(family, name):
  model = build(family, name)
  no_eos = reference_greedy(model, None)
  eos_id, greedy_search, beam_search = model_searches(model)
  greedy = model.generate(greedy_search)
  want = reference_greedy(model, eos_id)
  np.testing.assert_array_equal(greedy.tokens_BN, want)
  np.testing.assert_array_equal(greedy.lengths_B, [
      list(row).index(eos_id) + 1 if eos_id in row else N for row in want])
  assert greedy.lengths_B[0] <= 2

  beam_1 = model.generate(decoding.Search(method="beam", beam_size=1, max_new_tokens=N))
  np.testing.assert_array_equal(beam_1.tokens_BN, no_eos)

  beam = model.generate(beam_search)
  for k in range(3):
    tokens_BN, lengths_B = beam.beam_tokens_BKN[:, k], beam.beam_lengths_BK[:, k]
    logprobs_BNV = log_softmax(model.full_logits(tokens_BN))
    for b in range(3):
      logprob = sum(logprobs_BNV[b, i, tokens_BN[b, i]] for i in range(lengths_B[b]))
      np.testing.assert_allclose(beam.beam_scores_BK[b, k], logprob / penalty(lengths_B[b], 0.6),
                                 rtol=1e-4, err_msg=f"beam {k}, example {b}")
  greedy_scores = [sum(log_softmax(model.full_logits(greedy.tokens_BN))[b, i, t]
                       for i, t in enumerate(greedy.tokens_BN[b, :greedy.lengths_B[b]]))
                   / penalty(greedy.lengths_B[b], 0.6) for b in range(3)]
  assert np.all(beam.scores_B >= np.array(greedy_scores) - 1e-5)


def test_model_sampling_with_top_k_one_is_greedy():
  model = build(LM, "gpt2")
  out = model.generate(decoding.Search(method="sample", top_k=1, max_new_tokens=N),
                       rng=jax.random.key(0))
  np.testing.assert_array_equal(out.tokens_BN, reference_greedy(model, None))


def test_model_entry_points_reject_bad_settings():
  with pytest.raises(ValueError, match="method"):
    decoding.Search(method="nucleus")
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.Search(max_new_tokens=0)
  model = build(LM, "gpt2")
  with pytest.raises(ValueError, match="needs an rng"):
    model.generate(decoding.Search(method="sample", max_new_tokens=N))
  with pytest.raises(ValueError, match="max_len=16"):
    model.generate(decoding.Search(max_new_tokens=13))


# ---------------------------------------------------------------------------------------
# Padded prompts: lengths or a padding mask, either side, one at a time, and transformers.


def test_pad_batch_lays_rows_out_on_either_side():
  right = decoding.pad_batch([[5, 6, 7], [8]], pad_id=9)
  np.testing.assert_array_equal(right.tokens_BT, [[5, 6, 7], [8, 9, 9]])
  np.testing.assert_array_equal(right.padding_mask_BT, [[1, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(right.lengths_B, [3, 1])
  left = decoding.pad_batch([[5, 6, 7], [8]], pad_id=9, width=4, left=True)
  np.testing.assert_array_equal(left.tokens_BT, [[9, 5, 6, 7], [9, 9, 9, 8]])
  np.testing.assert_array_equal(left.padding_mask_BT, [[0, 1, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(left.lengths_B, [3, 1])
  with pytest.raises(ValueError, match="width=2 is shorter than the longest row"):
    decoding.pad_batch([[5, 6, 7]], width=2)
  with pytest.raises(ValueError, match="at least one row"):
    decoding.pad_batch([])


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODER_ONLY)
def test_a_padding_mask_on_either_side_decodes_as_lengths_and_as_one_prompt_at_a_time(name):
  model = build(LM, name)
  rows = [model.prompt[b, :n] for b, n in enumerate(model.lengths)]
  for search in model_searches(model)[1:]:  # Example 0 ends early: padding after its EOS too.
    by_lengths = model.generate(search)
    for left in (False, True):
      batch = decoding.pad_batch(rows, width=7, left=left)
      out = decoding.generate_decoder_only(model.module, model.params, batch.tokens_BT, None,
                                           search, padding_mask_BT=batch.padding_mask_BT)
      np.testing.assert_array_equal(out.tokens_BN, by_lengths.tokens_BN)
      np.testing.assert_allclose(out.logprobs_B, by_lengths.logprobs_B, rtol=1e-5)
    if search.method == "greedy":  # One prompt at a time, each padded to 7: one compile.
      for b, row in enumerate(rows):
        alone = decoding.pad_batch([row], width=7, left=True)
        out = decoding.generate_decoder_only(model.module, model.params, alone.tokens_BT, None,
                                             search, padding_mask_BT=alone.padding_mask_BT)
        np.testing.assert_array_equal(out.tokens_BN[0], by_lengths.tokens_BN[b])


def test_prompt_lengths_outside_one_to_the_width_are_one_clear_error():
  model = build(LM, "gpt2")
  search = decoding.Search(max_new_tokens=N)
  generate = functools.partial(decoding.generate_decoder_only, model.module, model.params,
                               jnp.asarray(model.prompt))
  for lengths, row in [([0, 5, 4], 0), ([2, 6, 4], 1)]:
    with pytest.raises(ValueError, match=rf"lengths must be in \[1, 5\].*row\(s\) \[{row}\]"):
      generate(jnp.asarray(lengths), search)
  empty_row = np.ones((3, 5), bool)
  empty_row[2] = False
  with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\].*row\(s\) \[2\]"):
    generate(None, search, padding_mask_BT=empty_row)
  with pytest.raises(ValueError, match="not both"):
    generate(jnp.asarray(model.lengths), search, padding_mask_BT=np.ones((3, 5), bool))
  with pytest.raises(ValueError, match=r"padding_mask_BT has shape \(3, 4\)"):
    generate(None, search, padding_mask_BT=np.ones((3, 4), bool))


@pytest.mark.slow
def test_left_padded_prompts_decode_as_transformers_gpt2_generate(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from models import pretrained
  from train import assets
  reference = transformers.GPT2LMHeadModel.from_pretrained(assets.folder("tiny_gpt2")).eval()
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():  # Far from its near-uniform init: answers depend on every position.
    for p in reference.parameters():
      p.add_(torch.randn(p.shape, generator=generator) * (0.5 if p.ndim > 1 else 0.1))
  reference.save_pretrained(tmp_path)
  module, params = pretrained.from_hf(str(tmp_path))
  rng = np.random.default_rng(3)
  rows = [rng.integers(1, module.cfg.vocab_size, size=n) for n in (6, 2, 4)]
  batch = decoding.pad_batch(rows, pad_id=0, left=True)
  n = 8
  with torch.no_grad():
    expected = reference.generate(
        torch.tensor(batch.tokens_BT, dtype=torch.long),
        attention_mask=torch.tensor(batch.padding_mask_BT, dtype=torch.long), do_sample=False,
        num_beams=1, max_new_tokens=n, pad_token_id=0, eos_token_id=0).numpy()[:, 6:]
  ours = np.asarray(decoding.generate_decoder_only(
      module, params, batch.tokens_BT, None, decoding.Search(max_new_tokens=n, eos_id=0),
      padding_mask_BT=batch.padding_mask_BT).tokens_BN)
  np.testing.assert_array_equal(ours[:, :expected.shape[1]], expected)
  np.testing.assert_array_equal(ours[:, expected.shape[1]:], 0)
  assert len({tuple(row) for row in ours}) == 3  # Each prompt its own answer.
