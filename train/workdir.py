"""A trained workdir, loaded back: its config, tokenizers, model and latest parameters."""

import json
import os

from absl import flags, logging
import jax
import ml_collections
import numpy as np

from train import finetune, loop, parallel
from train.data.examples import bos_eos


# The flags of the CLIs over a workdir (train.generate, train.attention_maps), defined once.
WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
INPUT = flags.DEFINE_multi_string("input", None, "Input text (repeat for several).")


def quiet():
  """Keeps orbax's and grain's INFO lines off the terminal."""
  logging.set_verbosity(logging.WARNING)


def load(workdir: str):
  """(experiment, params) of the run in `workdir`, from config.json and its latest checkpoint
  (with LoRA: the base merged with its adapters)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} holds no config.json: is it the --workdir of a training run "
                     "(python -m train --config=... --workdir=...)?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  exp = loop.build(config, workdir)
  abstract_params = parallel.unbox(jax.eval_shape(lambda: finetune.init_params(
      exp.task.model, config, jax.random.key(0), *loop.dummy_inputs(config))))
  return exp, finetune.load_params(config, workdir, abstract_params, exp.trainable)


def encode_source(exp, text: str) -> np.ndarray:
  """The model input of one text as training saw it: [1, length] ids, ending in EOS."""
  tokenizer = exp.inputs.input_tokenizer
  _, eos = bos_eos(tokenizer)
  ids = tokenizer.encode(text)
  if exp.config.task == "lm":
    return np.asarray([[bos_eos(tokenizer)[0]] + ids], np.int32)
  return np.asarray([ids + [eos]], np.int32)


def token_labels(tokenizer, ids) -> list[str]:
  """One printable label per id; special ids by name."""
  names = {tokenizer.pad_id: "<pad>", tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>",
           tokenizer.mask_id: "<mask>"}
  return [names.get(int(i)) or tokenizer.decode([int(i)]) or f"#{int(i)}" for i in ids]
