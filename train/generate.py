"""Answer from a trained workdir.

  python -m train.generate --workdir=DIR --input=TEXT [--method=beam --beam_size=4 ...]

seq2seq: the decoded target; lm: the prompt's continuation; classify: the label
probabilities; mlm: the input with each "<mask>" filled in. Decoding settings default to
the run's `config.decode`. Inputs are laid out as in training (`workdir.model_inputs`).
"""

import dataclasses

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from train import workdir as workdir_lib, workdir_cli

FLAGS = flags.FLAGS
SEARCH_FLAGS = ("method", "beam_size", "temperature", "top_k", "top_p", "max_new_tokens")


def answer(run: workdir_lib.Run, text: str, search: decoding.Search, rng) -> str:
  """The run's answer to one input text."""
  task = run.config.task
  if task == "seq2seq":
    return run.target_tokenizer.decode(continuation(run, text, search, rng))
  if task == "lm":
    return text + run.input_tokenizer.decode(continuation(run, text, search, rng))
  if task == "classify":
    probabilities = label_probabilities(run, text)
    return ", ".join(f"label {i}: {p:.3f}" for i, p in enumerate(probabilities))
  return fill_masks(run, text)


def continuation(run: workdir_lib.Run, text: str, search: decoding.Search, rng) -> np.ndarray:
  """The new tokens of an lm or seq2seq run for one text (EOS, then padding, ends them)."""
  batch = workdir_lib.model_inputs(run, text)
  if run.config.task == "seq2seq":
    out = decoding.generate_encoder_decoder(
        run.model, run.params, jnp.asarray(batch["encoder_tokens"]), search,
        decoder_start_id=int(batch["decoder_inputs"][0, 0]), rng=rng)
  else:
    out = decoding.generate_decoder_only(run.model, run.params, jnp.asarray(batch["inputs"]),
                                         None, search, rng=rng)
  return np.asarray(out.tokens_BN)[0]


def _encoder_logits(run: workdir_lib.Run, batch: dict) -> np.ndarray:
  return np.asarray(run.model.apply({"params": run.params}, jnp.asarray(batch["tokens"]),
                                    padding_mask=jnp.asarray(batch["padding_mask"]),
                                    token_types=jnp.asarray(batch["token_types"]))[0])


def label_probabilities(run: workdir_lib.Run, text: str) -> np.ndarray:
  """A classify run's probability of each label for one text."""
  return np.asarray(jax.nn.softmax(_encoder_logits(run, workdir_lib.model_inputs(run, text))))


def fill_masks(run: workdir_lib.Run, text: str) -> str:
  """An mlm run's text with each "<mask>" replaced by the most likely token."""
  batch = workdir_lib.model_inputs(run, text)
  tokens = batch["tokens"][0].copy()
  masked = tokens == run.input_tokenizer.mask_id
  if not masked.any():
    raise ValueError(f"An mlm run fills in masks: write {workdir_lib.MASK} where a token is "
                     "missing in --input.")
  tokens[masked] = _encoder_logits(run, batch).argmax(-1)[masked]
  return run.input_tokenizer.decode(tokens)


def define_flags():
  """The flags of `python -m train.generate`, defined when it runs (not on import)."""
  workdir_cli.define_flags()
  flags.adopt_module_key_flags(workdir_cli)  # --help lists --workdir and --input too.
  flags.DEFINE_enum("method", None, decoding.METHODS, "Decoding method.")
  flags.DEFINE_integer("beam_size", None, "Beam size.")
  flags.DEFINE_float("temperature", None, "Sampling temperature.")
  flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
  flags.DEFINE_float("top_p", None, "Sample from the smallest set of mass top_p.")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def search_from_flags(run: workdir_lib.Run) -> decoding.Search:
  """The run's `config.decode`, with the decoding flags given on the command line."""
  search = workdir_lib.decoding_search(run.config, run.target_tokenizer)
  changes = {name: FLAGS[name].value for name in SEARCH_FLAGS if FLAGS[name].value is not None}
  return dataclasses.replace(search, **changes)


def print_answers(run: workdir_lib.Run, texts: list[str]):
  search = search_from_flags(run)
  for i, text in enumerate(texts):
    print(f"{text} -> {answer(run, text, search, jax.random.key(FLAGS.seed + i))}")


def main(argv):
  del argv
  workdir_cli.main(print_answers)


if __name__ == "__main__":
  define_flags()
  app.run(main)
