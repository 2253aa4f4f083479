"""Autoregressive decoding of the models on a KV cache: settings, prefill, and generation.

The token loops themselves (greedy, sampling, beam search on any `tokens_to_logits(tokens_B1,
cache) -> (logits_BV, cache)`) live in models/searches.py; their names are re-exported here.

Models. `Search` holds the settings (hashable, so a static `jit` argument) and runs one of
the searches. The entry points (jitted) return the new tokens only:

  generate_decoder_only(module, params, prompt_BT, prompt_lengths_B, search, rng=None, *,
                        padding_mask_BT=None)
  generate_encoder_decoder(module, params, encoder_tokens_BS, search, *,
                           encoder_padding_mask_BS=None, decoder_start_id, rng=None)

Decoder-only prompts come in either convention: right-padded with their lengths
(`prompt_lengths_B`; None: every row fills the width), or with a padding mask
(`padding_mask_BT`, True on the prompt's tokens, left- or right-padded, as Hugging Face's
`attention_mask`). `pad_batch(token_lists)` builds both from lists of ids. Each prompt
continues from its own last token at its own positions, so the padding side and width do not
change the answer.

The entry points compile with `decode_compiler_options()`: on a GPU, CUDA graphs that hold
the whole token loop. Their first halves, `prepare_decoder_only` and `prepare_encoder_decoder`,
return (tokens_to_logits, cache, first_tokens_B) for any search. `prepare_decoder_only` takes
right-padded prompts: the padded prompt is prefilled into the cache in one call, then decoding
restarts from each example's last real token, so every example continues from its own length.
"""

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import kv_cache
from models.errors import InputError
from models.searches import (  # noqa: F401  (greedy, sample, beam_search: re-exported)
    BeamSearchOutput, Decoded, EosIds, PyTree, TokensToLogits, beam_search,
    check_eos_check_every, check_max_new_tokens, expand_to_beams, greedy, sample)


def set_cache_index(cache: PyTree, index_B: jax.Array) -> PyTree:
  """Sets every `cache_index` leaf of a model cache ([B] or, scanned, [B, layers]) to index_B."""
  def set_index(path, x):
    if getattr(path[-1], "key", None) != "cache_index":
      return x
    index = jnp.reshape(index_B, (-1,) + (1,) * (x.ndim - 1))
    return jnp.broadcast_to(index, x.shape).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(set_index, cache)


# ---------------------------------------------------------------------------------------
# Settings and the model entry points


METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Search:
  """Decoding settings, hashable so that they can be a static argument of `jax.jit`."""
  method: str = "greedy"               # greedy | sample | beam
  max_new_tokens: int = 32             # N: tokens generated after the prompt / start token
  eos_id: EosIds = None                # ends a sequence (any of a tuple); None: always N tokens
  pad_id: int = 0                      # fills the positions after EOS
  temperature: float = 1.0             # sample: logits / temperature; 0 = greedy
  top_k: int | None = None             # sample: only the k most likely tokens
  top_p: float | None = None           # sample: only the most likely tokens of mass top_p
  beam_size: int = 4                   # beam
  length_penalty_alpha: float = 0.6    # beam: scores are log-prob / ((5 + len) / 6)^alpha
  eos_check_every: int | None = None  # tokens between end tests (None: 16 on GPU, else 1)

  def __post_init__(self):
    if self.method not in METHODS:
      raise InputError(f"Unknown decoding method {self.method!r}; choose from {METHODS}.")
    check_max_new_tokens(self.max_new_tokens)
    check_eos_check_every(self.eos_check_every)
    if isinstance(self.eos_id, list):  # A list (e.g. from JSON) as a tuple: hashable.
      object.__setattr__(self, "eos_id", tuple(self.eos_id))

  @property
  def copies(self) -> int:
    """How many rows each example takes in the decoding batch."""
    return self.beam_size if self.method == "beam" else 1

  def __call__(self, tokens_to_logits: TokensToLogits, cache: PyTree, first_tokens_B: jax.Array,
               rng: jax.Array | None = None) -> Decoded | BeamSearchOutput:
    common = dict(max_new_tokens=self.max_new_tokens, eos_id=self.eos_id, pad_id=self.pad_id,
                  eos_check_every=self.eos_check_every)
    if self.method == "greedy":
      return greedy(tokens_to_logits, cache, first_tokens_B, **common)
    if self.method == "beam":
      return beam_search(tokens_to_logits, cache, first_tokens_B, beam_size=self.beam_size,
                         length_penalty_alpha=self.length_penalty_alpha, **common)
    if rng is None:
      raise ValueError("Search(method='sample') needs an rng, e.g. rng=jax.random.key(0).")
    return sample(tokens_to_logits, cache, first_tokens_B, rng=rng, temperature=self.temperature,
                  top_k=self.top_k, top_p=self.top_p, **common)


def _check_positions_fit(module, length: int):
  cfg = module.cfg
  if cfg.position == "learned" and length > cfg.max_len:
    raise InputError(f"Decoding needs positions up to {length - 1}, but the learned position "
                     f"table has max_len={cfg.max_len}; shorten the prompt or max_new_tokens.")


def prepare_decoder_only(module, params: PyTree, prompt_BT: jax.Array,
                         prompt_lengths_B: jax.Array | None, max_new_tokens: int):
  """Prefills the cache with right-padded prompts: (tokens_to_logits, cache, first_tokens_B).

  The whole padded prompt goes through the model in one call; then every `cache_index` is
  set back to length - 1, so that the first decoding step feeds the last real prompt token
  again (rewriting the same cache slot) and each example continues from its own length.
  Prompt lengths must be >= 1 (start empty prompts with a BOS token). With prompt_lengths_B
  None (every row fills the width), or one row, the rows write the cache at one slot: one
  `dynamic_update_slice` a step (`kv_cache.rows_share_cache_slot`).
  """
  batch, prompt_len = prompt_BT.shape
  cache_len = prompt_len + max_new_tokens - 1
  _check_positions_fit(module, cache_len)
  rows_share_slot = prompt_lengths_B is None or batch == 1
  if prompt_lengths_B is None:
    prompt_lengths_B = jnp.full((batch,), prompt_len, jnp.int32)

  def logits_and_cache(tokens_BT, cache, rows_share_slot):
    with kv_cache.rows_share_cache_slot(rows_share_slot):
      logits_BTV, variables = module.apply({"params": params, "cache": cache}, tokens_BT,
                                           decode=True, mutable=["cache"])
    return logits_BTV[:, -1], variables["cache"]

  _, variables = module.apply({"params": params}, jnp.zeros((batch, cache_len), jnp.int32),
                              decode=True, mutable=["cache"])
  _, cache = logits_and_cache(prompt_BT, variables["cache"], True)  # All rows from slot 0.
  last_B = jnp.asarray(prompt_lengths_B, jnp.int32) - 1
  first_tokens_B = jnp.take_along_axis(prompt_BT, last_B[:, None], axis=1)[:, 0]
  tokens_to_logits = functools.partial(logits_and_cache, rows_share_slot=rows_share_slot)
  return tokens_to_logits, set_cache_index(cache, last_B), first_tokens_B


def prepare_encoder_decoder(module, params: PyTree, encoder_tokens_BS: jax.Array, *,
                            encoder_padding_mask_BS: jax.Array | None, decoder_start_id: int,
                            max_new_tokens: int, copies: int = 1):
  """Encodes once: (tokens_to_logits, cache, first_tokens_B), first tokens = decoder start.

  `copies` (the beam size for beam search) repeats the encoded states per row of the
  decoding batch; the cache stays [B, ...], as the searches expect.
  """
  batch = encoder_tokens_BS.shape[0]
  _check_positions_fit(module, max_new_tokens)
  encoded_BSD = module.apply({"params": params}, encoder_tokens_BS,
                             encoder_padding_mask=encoder_padding_mask_BS, method="encode")
  _, variables = module.apply({"params": params}, encoded_BSD,
                              jnp.zeros((batch, max_new_tokens), jnp.int32),
                              encoder_padding_mask=encoder_padding_mask_BS, decode=True,
                              method="decode", mutable=["cache"])
  encoded_FSD, mask_FS = expand_to_beams((encoded_BSD, encoder_padding_mask_BS), copies)

  def tokens_to_logits(tokens_B1, cache):
    with kv_cache.rows_share_cache_slot():  # Every row decodes from slot 0, one a step.
      logits_B1V, variables = module.apply(
          {"params": params, "cache": cache}, encoded_FSD, tokens_B1,
          encoder_padding_mask=mask_FS, decode=True, method="decode", mutable=["cache"])
    return logits_B1V[:, -1], variables["cache"]

  first_tokens_B = jnp.full((batch,), decoder_start_id, jnp.int32)
  return tokens_to_logits, variables["cache"], first_tokens_B


class PaddedBatch(NamedTuple):
  tokens_BT: np.ndarray        # int32 ids, pad_id where a row has none
  padding_mask_BT: np.ndarray  # bool, True on each row's ids
  lengths_B: np.ndarray        # int32 ids per row


def pad_batch(token_lists: Sequence[Sequence[int]], *, pad_id: int = 0, width: int | None = None,
              left: bool = False) -> PaddedBatch:
  """Rows of ids as one batch, padded to `width` (default: the longest row) on the right, or on
  the left with `left=True`."""
  lengths_B = np.array([len(ids) for ids in token_lists], np.int32)
  if not len(lengths_B):
    raise ValueError("pad_batch needs at least one row of ids.")
  longest = int(lengths_B.max())
  width = longest if width is None else width
  if width < longest:
    raise ValueError(f"width={width} is shorter than the longest row ({longest} ids); "
                     "pass width >= it, or None.")
  tokens_BT = np.full((len(lengths_B), width), pad_id, np.int32)
  mask_BT = np.zeros((len(lengths_B), width), bool)
  for row, ids in enumerate(token_lists):
    start = width - len(ids) if left else 0
    tokens_BT[row, start:start + len(ids)] = ids
    mask_BT[row, start:start + len(ids)] = True
  return PaddedBatch(tokens_BT, mask_BT, lengths_B)


def _prompt_lengths(prompt_BT, prompt_lengths_B, padding_mask_BT) -> jax.Array | None:
  """The prompts' lengths from either convention, checked where they are concrete values;
  None when every row fills the width."""
  if jnp.ndim(prompt_BT) != 2:
    raise ValueError(f"prompt_BT must be 2-D [batch, width], got shape {jnp.shape(prompt_BT)}.")
  batch, width = jnp.shape(prompt_BT)
  if prompt_lengths_B is not None and padding_mask_BT is not None:
    raise ValueError("Pass prompt_lengths_B (right-padded prompts) or padding_mask_BT (left- or "
                     "right-padded), not both.")
  if padding_mask_BT is not None:
    if jnp.shape(padding_mask_BT) != (batch, width):
      raise ValueError(f"padding_mask_BT has shape {jnp.shape(padding_mask_BT)}; it must be the "
                       f"prompts' shape {(batch, width)}.")
    lengths_B = jnp.sum(jnp.asarray(padding_mask_BT, bool), axis=1, dtype=jnp.int32)
  elif prompt_lengths_B is None:
    return None
  elif jnp.shape(prompt_lengths_B) != (batch,):
    raise ValueError(f"prompt_lengths_B has shape {jnp.shape(prompt_lengths_B)}; it must be "
                     f"[batch] = {(batch,)}.")
  else:
    lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
  try:
    concrete_B = np.asarray(lengths_B)
  except jax.errors.TracerArrayConversionError:
    return lengths_B  # Traced by the caller's jit: values unknown until run, left unchecked.
  bad = np.flatnonzero((concrete_B < 1) | (concrete_B > width))
  if bad.size:
    raise ValueError(f"Prompt lengths must be in [1, {width}] (the prompt width), but row(s) "
                     f"{bad.tolist()[:5]} have {concrete_B[bad].tolist()[:5]}; start an empty "
                     "prompt with a BOS token.")
  return None if np.all(concrete_B == width) else lengths_B


def generate_decoder_only(module, params: PyTree, prompt_BT: jax.Array,
                          prompt_lengths_B: jax.Array | None, search: Search,
                          rng: jax.Array | None = None, *,
                          padding_mask_BT: jax.Array | None = None
                          ) -> Decoded | BeamSearchOutput:
  """Continues the prompts of a `DecoderOnly`; new tokens only.

  Prompts are right-padded with `prompt_lengths_B` (None: no padding), or padded on either
  side with `padding_mask_BT` (True on prompt tokens); lengths must be in [1, width].
  """
  lengths_B = _prompt_lengths(prompt_BT, prompt_lengths_B, padding_mask_BT)
  if padding_mask_BT is not None:
    prompt_BT = _prompt_first(prompt_BT, padding_mask_BT)
  return _generate_decoder_only(module, params, prompt_BT, lengths_B, search, rng)


@jax.jit
def _prompt_first(prompt_BT: jax.Array, padding_mask_BT: jax.Array) -> jax.Array:
  """Each row's prompt tokens moved, in order, to its start: the right-padded layout."""
  order_BT = jnp.argsort(~jnp.asarray(padding_mask_BT, bool), axis=1, stable=True)
  return jnp.take_along_axis(jnp.asarray(prompt_BT), order_BT, axis=1)


COMMAND_BUFFER_COMMANDS = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN",
                           "CONDITIONAL", "WHILE")


def decode_compiler_options(backend: str | None = None) -> dict[str, str]:
  """XLA options for compiling a decoding loop on `backend` (default: jax's default backend).

  On a GPU, command buffers (CUDA graphs) that also take in while loops and conditionals: the
  token loop replays as recorded graphs instead of launching a token's few hundred small
  kernels one by one. XLA's default list lacks WHILE and CONDITIONAL; the names are XLA's
  DebugOptions.CommandBufferCmdType values. None elsewhere (CPU and TPU get no GPU option),
  nor where XLA_FLAGS already sets --xla_gpu_enable_command_buffer (the user's choice stands).
  """
  backend = jax.default_backend() if backend is None else backend
  if backend != "gpu" or "xla_gpu_enable_command_buffer" in os.environ.get("XLA_FLAGS", ""):
    return {}
  return {"xla_gpu_enable_command_buffer": ",".join(COMMAND_BUFFER_COMMANDS)}


def _jit_for_decoding(fun, static_argnames: tuple[str, ...]):
  """`fun` under jax.jit with `decode_compiler_options()`, chosen at the first call."""
  jitted = functools.cache(lambda: jax.jit(fun, static_argnames=static_argnames,
                                           compiler_options=decode_compiler_options()))
  return functools.wraps(fun)(lambda *args, **kwargs: jitted()(*args, **kwargs))


def _generate_decoder_only(module, params, prompt_BT, prompt_lengths_B, search, rng):
  tokens_to_logits, cache, first_tokens_B = prepare_decoder_only(
      module, params, prompt_BT, prompt_lengths_B, search.max_new_tokens)
  return search(tokens_to_logits, cache, first_tokens_B, rng)


_generate_decoder_only = _jit_for_decoding(_generate_decoder_only, ("module", "search"))


def generate_encoder_decoder(module, params: PyTree, encoder_tokens_BS: jax.Array,
                             search: Search, *, encoder_padding_mask_BS: jax.Array | None = None,
                             decoder_start_id: int, rng: jax.Array | None = None
                             ) -> Decoded | BeamSearchOutput:
  """Decodes an `EncoderDecoder` from `decoder_start_id` (T5: the pad id 0)."""
  tokens_to_logits, cache, first_tokens_B = prepare_encoder_decoder(
      module, params, encoder_tokens_BS, encoder_padding_mask_BS=encoder_padding_mask_BS,
      decoder_start_id=decoder_start_id, max_new_tokens=search.max_new_tokens,
      copies=search.copies)
  return search(tokens_to_logits, cache, first_tokens_B, rng)


generate_encoder_decoder = _jit_for_decoding(generate_encoder_decoder,
                                             ("module", "search", "decoder_start_id"))
