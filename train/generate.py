"""Answer from a trained workdir.

  python -m train.generate --workdir=DIR --input=TEXT [--method=beam --beam_size=4 ...]

seq2seq: the decoded target; lm: the prompt's continuation; classify: the label
probabilities; mlm: the input with each "<mask>" filled in. Decoding settings default to
the run's `config.decode`.
"""

import dataclasses
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from train import loop, workdir as workdir_lib
from train.data.examples import bos_eos

_METHOD = flags.DEFINE_enum("method", None, ["greedy", "sample", "beam"], "Decoding method.")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", None, "Beam size.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the smallest set of mass top_p.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["workdir", "input"])
MASK = "<mask>"


def answer(exp, params, text: str, search: decoding.Search, rng) -> str:
  """The run's answer to one input text."""
  task, model = exp.config.task, exp.task.model
  tokens = workdir_lib.encode_source(exp, text)
  if task == "seq2seq":
    out = decoding.generate_encoder_decoder(
        model, params, jnp.asarray(tokens), search,
        decoder_start_id=bos_eos(exp.inputs.target_tokenizer)[0], rng=rng)
    return exp.inputs.target_tokenizer.decode(np.asarray(out.tokens_BN)[0])
  if task == "lm":
    out = decoding.generate_decoder_only(model, params, jnp.asarray(tokens), None, search,
                                         rng=rng)
    return text + exp.inputs.input_tokenizer.decode(np.asarray(out.tokens_BN)[0])
  tokenizer = exp.inputs.input_tokenizer
  bos, eos = bos_eos(tokenizer)
  pieces = [tokenizer.encode(piece) for piece in text.split(MASK)]
  ids = [bos] + sum((piece + [tokenizer.mask_id] for piece in pieces[:-1]), []) + pieces[-1]
  tokens = np.asarray([ids + [eos]], np.int32)
  logits = model.apply({"params": params}, jnp.asarray(tokens))
  if task == "classify":
    probs = np.asarray(jax.nn.softmax(logits[0]))
    return ", ".join(f"label {i}: {p:.3f}" for i, p in enumerate(probs))
  if len(pieces) == 1:
    raise ValueError(f"An mlm run fills in masks: write {MASK} where a token is missing in "
                     "--input.")
  masked = tokens[0] == tokenizer.mask_id
  tokens[0, masked] = np.asarray(logits[0].argmax(-1))[masked]
  return tokenizer.decode(tokens[0])


def search_from_flags(exp) -> decoding.Search:
  search = loop.decoding_search(exp.config, exp.inputs.target_tokenizer)
  changes = {name: flag.value for name, flag in (
      ("method", _METHOD), ("beam_size", _BEAM_SIZE), ("temperature", _TEMPERATURE),
      ("top_k", _TOP_K), ("top_p", _TOP_P), ("max_new_tokens", _MAX_NEW_TOKENS))
      if flag.value is not None}
  return dataclasses.replace(search, **changes)


def main(argv):
  del argv
  workdir_lib.quiet()
  try:
    exp, params = workdir_lib.load(workdir_lib.WORKDIR.value)
    search = search_from_flags(exp)
    for i, text in enumerate(workdir_lib.INPUT.value):
      print(f"{text} -> {answer(exp, params, text, search, jax.random.key(_SEED.value + i))}")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
