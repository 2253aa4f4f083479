"""The end test every `eos_check_every` tokens: the same outputs as a test before every token
(eos_check_every=1, the loop of old), checked against Python loops over `tokens_to_logits`
written here, exhaustive beam search and full forward passes; and the compiled loops' shape."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding, searches
from test_decoding import EOS, LM, N, PAD, Seq2Seq, Toy, build, np_all_sequences, \
    reference_greedy, run

CHECK_EVERY = [1, 2, 3, 4, 16]  # For 7 new tokens: 1, non-divisors, and more than 7.


def python_loop(tokens_to_logits, cache, first_B, *, max_new_tokens, choose):
  """One eager call of tokens_to_logits per token; each row stops at its own EOS."""
  batch = len(first_B)
  tokens_BN = np.full((batch, max_new_tokens), PAD)
  logprobs_B = np.zeros(batch)
  last_B, done_B = np.asarray(first_B), np.zeros(batch, bool)
  for step in range(max_new_tokens):
    if done_B.all():
      break
    logits_BV, cache = tokens_to_logits(jnp.asarray(last_B, jnp.int32)[:, None], cache)
    logits_BV = np.asarray(logits_BV, np.float64)
    next_B = np.where(done_B, PAD, np.asarray(choose(logits_BV, step)))
    logprobs_BV = logits_BV - np.logaddexp.reduce(logits_BV, axis=-1, keepdims=True)
    logprobs_B += np.where(done_B, 0.0, logprobs_BV[np.arange(batch), next_B])
    tokens_BN[:, step] = next_B
    last_B, done_B = next_B, done_B | (next_B == EOS)
  return tokens_BN, logprobs_B


def early_ending_toy():
  """Rows that all end within 3 of 7 tokens (checked below): the end test decides the steps."""
  toy = Toy.random(9, vocab_size=6, max_steps=7)
  toy.table[..., EOS] += 1.0
  return toy, [0, 2, 3, 4, 5], [1, 2, 3, 5, 4]


RNG = jax.random.key(5)


def choose_greedy(logits_BV, _):
  return logits_BV.argmax(-1)


def choose_sample(logits_BV, step):
  """As decoding.sample at temperature 1.5: float32 logits / 1.5, the step's own key."""
  return jax.random.categorical(jax.random.fold_in(RNG, step),
                                jnp.asarray(logits_BV, jnp.float32) / 1.5, axis=-1)


@functools.cache
def python_loop_answer(choose):
  toy, prev_B, first_B = early_ending_toy()
  return python_loop(toy.tokens_to_logits, toy.cache(prev_B), first_B, max_new_tokens=7,
                     choose=choose)


def run_counting_steps(search, toy, prev_B, first_B, **settings):
  """(outputs, how many times the jitted search ran the model) for one call."""
  steps = []

  def counted(tokens_B1, cache):
    jax.debug.callback(lambda: steps.append(1))
    return toy.tokens_to_logits(tokens_B1, cache)

  out = jax.jit(lambda cache, first: search(counted, cache, first, **settings))(
      toy.cache(prev_B), jnp.asarray(first_B, jnp.int32))
  return jax.tree.map(np.asarray, out), len(steps)


def steps_with_end_test_every(check_every, end, n):
  """Steps run when all rows end at step `end` of n: on to the end of the chunk; in the last,
  shorter chunk (n mod check_every steps, no test inside), to n."""
  in_full_chunks = n // check_every * check_every
  return -(-end // check_every) * check_every if end <= in_full_chunks else n


@pytest.mark.parametrize("check_every", CHECK_EVERY)
def test_greedy_and_sampling_give_the_python_loops_tokens_for_any_check_interval(check_every):
  toy, prev_B, first_B = early_ending_toy()
  common = dict(max_new_tokens=7, eos_id=EOS, pad_id=PAD, eos_check_every=check_every)
  greedy, steps = run_counting_steps(decoding.greedy, toy, prev_B, first_B, **common)
  want, want_logprobs = python_loop_answer(choose_greedy)
  np.testing.assert_array_equal(greedy.tokens_BN, want)
  np.testing.assert_allclose(greedy.logprobs_B, want_logprobs, rtol=1e-5)
  assert sorted(greedy.lengths_B) == [1, 1, 2, 3, 3]
  assert steps == steps_with_end_test_every(check_every, 3, 7)

  sampled, steps = run_counting_steps(decoding.sample, toy, prev_B, first_B, rng=RNG,
                                      temperature=1.5, **common)
  want, want_logprobs = python_loop_answer(choose_sample)
  np.testing.assert_array_equal(sampled.tokens_BN, want)
  np.testing.assert_allclose(sampled.logprobs_B, want_logprobs, rtol=1e-5)
  assert sorted(sampled.lengths_B) == [1, 1, 1, 2, 3]
  assert steps == steps_with_end_test_every(check_every, 3, 7)


@pytest.mark.parametrize("check_every", [3, 5, 16])
def test_beam_search_that_ends_early_is_the_same_for_any_check_interval(check_every):
  # A likely EOS fills the finished set early, so with a test before every token the search
  # ends within the 9 steps, and without it steps on (the beams unchanged).
  toy = Toy.random(8, vocab_size=5, max_steps=9)
  toy.table[..., EOS] += 3.0
  common = dict(max_new_tokens=9, eos_id=EOS, pad_id=PAD, beam_size=3, length_penalty_alpha=0.6)
  every_token, end = run_counting_steps(decoding.beam_search, toy, [0, 2, 4], [2, 3, 0],
                                        eos_check_every=1, **common)
  chunked, steps = run_counting_steps(decoding.beam_search, toy, [0, 2, 4], [2, 3, 0],
                                      eos_check_every=check_every, **common)
  assert end < 9 and steps == steps_with_end_test_every(check_every, end, 9) > end
  for field, want in every_token._asdict().items():
    np.testing.assert_array_equal(getattr(chunked, field), want, err_msg=field)


@pytest.mark.parametrize("check_every", [2, 3])
def test_beam_search_with_enough_beams_is_exhaustive_for_any_check_interval(check_every):
  toy = Toy.random(1, vocab_size=3, max_steps=5)
  toy.table[..., EOS] += 2.0
  out = run(decoding.beam_search, toy, [0, 2], [1, 2], max_new_tokens=5, eos_id=EOS,
            pad_id=PAD, beam_size=24, length_penalty_alpha=0.6, eos_check_every=check_every)
  for b, (prev, first) in enumerate([(0, 1), (2, 2)]):
    best = np_all_sequences(toy, prev, first, 5, EOS, 0.6)[:24]
    np.testing.assert_allclose(out.beam_scores_BK[b], [s for s, _ in best], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.beam_tokens_BKN[b], [t for _, t in best])


@pytest.mark.slow
@pytest.mark.parametrize("family,name", [(LM, "gpt2"), (Seq2Seq, "t5")])
def test_models_decode_as_full_forward_passes_for_any_check_interval(family, name):
  model = build(family, name)
  eos_id = int(reference_greedy(model, None)[0, 1])  # Example 0 ends after 2 tokens.
  want = reference_greedy(model, eos_id)
  for check_every in (1, 3):
    greedy = model.generate(decoding.Search(max_new_tokens=N, eos_id=eos_id,
                                            eos_check_every=check_every))
    np.testing.assert_array_equal(greedy.tokens_BN, want)


def compiled_while_trip_counts(search, toy, max_new_tokens, check_every):
  """The known trip count (None: unknown) of every while loop XLA compiled for the search."""
  decode = jax.jit(lambda cache, first_B: search(
      toy.tokens_to_logits, cache, first_B, max_new_tokens=max_new_tokens, eos_id=EOS,
      pad_id=PAD, eos_check_every=check_every))
  hlo = decode.lower(toy.cache([0, 0]), jnp.array([2, 3])).compile().as_text()
  counts = [re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            for line in hlo.splitlines() if re.search(r"\swhile\(", line)]
  return sorted((int(c.group(1)) if c else 0) for c in counts)


@pytest.mark.parametrize("search", [decoding.greedy, decoding.beam_search])
def test_only_the_loops_over_chunks_have_an_unknown_trip_count(search):
  """10 tokens, every 4: a loop over chunks of a 4-step loop, then one of a 2-step loop."""
  toy = Toy.random(0, vocab_size=5, max_steps=10)
  if search is decoding.beam_search:
    search = lambda *args, **kwargs: decoding.beam_search(*args, beam_size=2, **kwargs)
  assert compiled_while_trip_counts(search, toy, 10, 1) == [0]
  assert compiled_while_trip_counts(search, toy, 10, 4) == [0, 0, 2, 4]
  assert compiled_while_trip_counts(search, toy, 10, 16) == [0, 10]
  assert compiled_while_trip_counts(search, toy, 10, None) == [0]  # This CPU's default: 1.


def test_the_default_interval_is_16_on_a_gpu_only(monkeypatch):
  assert searches.eos_check_interval(None) == 1 and searches.eos_check_interval(3) == 3
  monkeypatch.setattr(searches.jax, "default_backend", lambda: "gpu")
  assert searches.eos_check_interval(None) == 16


def test_command_buffers_that_take_in_the_loop_are_a_gpu_option_only(monkeypatch):
  """On a GPU the loops compile with WHILE among the command buffer types, spelled as this XLA
  reads them (a name it lacks fails the compile, on any backend), unless XLA_FLAGS sets them;
  elsewhere no option at all."""
  assert decoding.decode_compiler_options() == {} == decoding.decode_compiler_options("tpu")
  monkeypatch.setattr(decoding.jax, "default_backend", lambda: "gpu")
  options = decoding.decode_compiler_options()
  assert "WHILE" in options["xla_gpu_enable_command_buffer"].split(",")
  loop = jax.jit(lambda x: jax.lax.while_loop(lambda x: x < 5, lambda x: x + 1, x),
                 compiler_options=options)
  assert int(loop(jnp.int32(0))) == 5
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")  # The user's choice.
  assert decoding.decode_compiler_options() == {}


def full_width_greedy(model):
  """Argmax over full forward passes (no cache) of prompts that fill their width."""
  tokens_BT = np.asarray(model.prompt, np.int32)
  for _ in range(N):
    logits_BV = np.asarray(model.forward(tokens_BT))[:, -1]
    tokens_BT = np.concatenate([tokens_BT, logits_BV.argmax(-1)[:, None]], axis=1)
  return tokens_BT[:, -N:]


def test_rows_that_share_their_cache_slot_decode_greedily_as_full_forward_passes():
  """Prompts of one length, or one prompt, write the cache with one dynamic_update_slice and
  decode the tokens of repeated full forward passes."""
  model = build(LM, "gpt2")
  out = decoding.generate_decoder_only(model.module, model.params, jnp.asarray(model.prompt),
                                       None, decoding.Search(max_new_tokens=N))
  np.testing.assert_array_equal(out.tokens_BN, full_width_greedy(model))
  one_row = decoding.generate_decoder_only(  # A padded prompt: its row alone shares its slot.
      model.module, model.params, jnp.asarray(model.prompt[:1]), jnp.asarray(model.lengths[:1]),
      decoding.Search(max_new_tokens=N))
  np.testing.assert_array_equal(one_row.tokens_BN[0], reference_greedy(model, None)[0])


@pytest.mark.parametrize("rows_share_slot", [True, False])
def test_greedy_decoding_copies_no_cache_inside_its_loops(rows_share_slot):
  """The cache is written in place (one dynamic_update_slice where every row writes the same
  slot, a per-row scatter otherwise) and the attention reads it in its stored layout: nothing
  inside the loops copies or transposes a cache-sized array, in any order of its dimensions."""
  model = build(LM, "gpt2")
  search = decoding.Search(max_new_tokens=N, eos_check_every=2)
  lengths = None if rows_share_slot else jnp.asarray(model.lengths)
  args = model.params, jnp.asarray(model.prompt)
  generate = jax.jit(lambda params, prompt: decoding.generate_decoder_only(
      model.module, params, prompt, lengths, search))
  cache = jax.eval_shape(lambda *args: decoding.prepare_decoder_only(
      model.module, *args, lengths, N)[1], *args)
  shape = cache["decoder"]["layers_0"]["self_attention"]["cached_key"].shape
  cache_sized = lambda dims: sorted(d for d in dims if d > 1) == sorted(d for d in shape if d > 1)
  output = re.compile(r"= f32\[([\d,]*)\]\S* (copy|transpose|scatter|dynamic-update-slice)\(")
  computation, moved, writes = None, [], set()
  for line in generate.lower(*args).compile().as_text().splitlines():
    if line and not line.startswith(" "):
      computation = line.split()[0]
    found = output.search(line)
    if not found or not cache_sized([int(d) for d in found[1].split(",") if d]):
      continue
    if found[2] in ("copy", "transpose") and computation != "ENTRY":
      moved.append(line.strip()[:120])
    writes.add(found[2])
  assert not moved
  if rows_share_slot:  # (XLA may expand a small per-row scatter into dynamic_update_slices.)
    assert "dynamic-update-slice" in writes and "scatter" not in writes


def test_a_bad_check_interval_is_one_clear_error():
  for bad in (0, 2.0):
    with pytest.raises(ValueError, match="eos_check_every must be a positive int"):
      decoding.Search(eos_check_every=bad)
  toy = Toy.random(0, vocab_size=4, max_steps=2)
  with pytest.raises(ValueError, match="eos_check_every must be a positive int"):
    decoding.greedy(toy.tokens_to_logits, toy.cache([0]), jnp.array([1]), max_new_tokens=2,
                    eos_id=EOS, pad_id=PAD, eos_check_every=-1)
