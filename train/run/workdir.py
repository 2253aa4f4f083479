"""A run's workdir: checked before a run trains in it, loaded for inference once trained.

`check_workdir(config, workdir)` refuses a workdir whose checkpoints `config` cannot resume.
`load(workdir)` reads config.json, the latest checkpoint's params (with LoRA: merged) and the
tokenizers (trained ones from their cached files; a pretrained one, and the model of an
init_from=hf:FOLDER, from the copy of FOLDER's files the workdir keeps: train/run/hf_copy.py); it
reads no data and builds no optimizer.
`model_inputs(run, text)` lays an input text out as training did (train/data/examples.py);
`unknown_pieces` names what of a text the vocabulary lacks.
"""

import dataclasses
import json
import os
import re
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np

from models import decoding
from models.errors import InputError
from train.data import chat, examples
from train.data.tokenizers import Tokenizer
from train.run import run_tokenizers

MASK = "<mask>"  # mlm: where a token is to be filled in, in an input text


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run, ready to answer."""
  config: ml_collections.ConfigDict
  model: nn.Module
  params: Any                    # the model's (LoRA merged), ready for model.apply
  input_tokenizer: Tokenizer
  target_tokenizer: Tokenizer
  decoder_start_id: int | None   # seq2seq: the decoder's first input; None otherwise
  chat_template: chat.Template | None = None  # a run on chat data (task="chat")


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was trained with (its config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise InputError(f"{workdir} holds no config.json: is it the --workdir of a training run "
                     "(python -m train --config=... --workdir=...)?")
  return ml_collections.ConfigDict(_saved_config(
      path, f"it records how the run in {workdir} was trained, and the run cannot be loaded "
      "without it; restore it."))


def _saved_config(path: str, fix: str) -> dict:
  """A run's config.json as a dict; an InputError ending in `fix` if it cannot be read."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # unreadable, not JSON (cut short, garbled), not text
    raise InputError(f"{path} is not readable JSON ({e}): {fix}") from None


# Keys a resumed run may change: they leave the state's shapes and the data's tokens as trained.
RESUMABLE = re.compile(
    r"^(train\.(num_steps|log_every|eval_every|eval_batches|checkpoint_every|keep_checkpoints"
    r"|peak_flops|print_examples|xla_flags|compilation_cache)|decode\..*|mesh\..*|distributed\..*"
    r"|data\.data_dir"
    r"|label_smoothing"
    r"|model\.(dropout_rate|attention_dropout_rate|ffn_dropout_rate|dtype|logits_dtype"
    r"|remat_policy|attention_implementation)"
    r"|optim\.(learning_rate|schedule|warmup_steps|decay_steps|end_learning_rate_factor|b1|b2"
    r"|eps|weight_decay|grad_accum_steps))$")


def check_workdir(config, workdir: str) -> None:
  """Refuses, before anything is written, a workdir that is a file, or whose checkpoints were
  trained with settings that `config` changes beyond the RESUMABLE keys."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise InputError(f"--workdir={workdir} is a file: give a folder (new or a run's).")
  path = os.path.join(workdir, "config.json")
  if not (os.path.isfile(path) and os.path.isdir(os.path.join(workdir, "checkpoints"))
          and any(name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))):
    return
  saved = _flat_dict(_saved_config(
      path, f"it records the run in {workdir}; restore it, or train in a new --workdir."))
  given = _flat_dict(config.to_dict())
  changed = [f"{key}={saved.get(key)!r} -> {given.get(key)!r}"
             for key in sorted(saved.keys() | given.keys())
             if not RESUMABLE.match(key) and _plain(saved.get(key)) != _plain(given.get(key))
             and not (key == "model.vocab_size" and given.get(key) is None)]
  if changed:
    raise InputError(f"{workdir} holds a run trained with other settings: {'; '.join(changed)}. "
                     "Resume it with its own settings (see its config.json), or train in a new "
                     "--workdir.")


def _flat_dict(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat_dict(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _plain(value):
  """JSON's lists and the config's tuples compare equal; so do {} and an empty section."""
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return None if value == {} else value


def load(workdir: str) -> Run:
  """The run in `workdir`, from its config.json, latest checkpoint and tokenizers."""
  # These import optax (train.engine.optim, the losses); imported here, `import train.generate`
  # stays light and only loading a run pays for them.
  from train.engine import tasks, trainable as trainable_lib
  from train.run import config as config_lib
  config = run_config(workdir)
  input_tokenizer, target_tokenizer = run_tokenizers.make_tokenizers(
      config.data, config.task, config.init_from, workdir)
  vocab_size = max(input_tokenizer.vocab_size, target_tokenizer.vocab_size)
  source = (trainable_lib.read_source(config.init_from, config.task, config.model, config.seed)
            if config.lora.adapter_only_checkpoint else None)
  folder_cfg = trainable_lib.pretrained_model(config.init_from, config.model, workdir, source)
  model = tasks.make_model(config.task, config_lib.model_config(config, vocab_size, folder_cfg),
                           num_classes=config.model.num_classes, pooling=config.model.pooling)
  if source is not None:  # Adapters only: the base is rebuilt in the model's layout.
    params = trainable_lib.Trainable(model, tasks.init_inputs(config.task, config.data),
                                     config.lora, config.optim.freeze,
                                     source).trained_params(workdir)
  else:  # The params as saved, LoRA merged: no model init to trace.
    params = trainable_lib.run_params(workdir)
  start = (run_tokenizers.decoder_start_id(config.init_from, target_tokenizer, workdir)
           if config.task == "seq2seq" else None)
  return Run(config, model, params, input_tokenizer, target_tokenizer, start,
             run_tokenizers.chat_template(config.data, config.init_from, workdir))


def model_inputs(run: Run, text: str, target: list[int] | None = None) -> dict[str, np.ndarray]:
  """One input text laid out as the training pipeline lays it out, as a batch of one.

  lm: {"inputs": BOS text}, or for a chat run the conversation rendered with its generation
  prompt (`chat_prompt`); seq2seq: {"encoder_tokens": text EOS, "decoder_inputs": the
  decoder start + `target` (ids of an answer, for teacher forcing)}; classify and mlm: the
  padded row {"tokens", "padding_mask", "token_types"}, where an mlm text's "<mask>" are
  mask ids.
  """
  config, tokenizer = run.config, run.input_tokenizer
  if config.task == "lm" and run.chat_template is not None:
    return {"inputs": np.asarray(chat_prompt(run, text), np.int32)[None]}
  if config.task == "lm":
    inputs, _ = examples.lm_tokens(tokenizer, tokenizer.encode(text))
    return {"inputs": inputs[None]}
  if config.task == "seq2seq":
    tokens, _ = examples.seq2seq_tokens(
        tokenizer, run.target_tokenizer, tokenizer.encode(text), list(target or []),
        inputs_len=config.data.inputs_len, targets_len=config.data.targets_len,
        decoder_start_id=run.decoder_start_id)
    return {key: tokens[key][None] for key in ("encoder_tokens", "decoder_inputs")}
  ids = _with_masks(tokenizer, text) if config.task == "mlm" else tokenizer.encode(text)
  row, _ = examples.classification_tokens(tokenizer, config.data.seq_len, ids)
  return {key: value[None] for key, value in row.items()}


def chat_prompt(run: Run, text: str) -> list[int]:
  """The ids of a chat run's prompt: `text` as a user turn, or a JSON conversation
  ({"messages": [...]} or the list) ending on a user turn, with the generation prompt."""
  messages = [{"role": "user", "content": text}]
  if text.lstrip().startswith(("{", "[")):
    try:
      record = json.loads(text)
    except ValueError:
      record = None
    if record is not None:
      messages = record.get("messages") if isinstance(record, dict) else record
  try:
    messages = chat.check_messages(messages, for_generation=True)
  except ValueError as e:
    raise InputError(f"A chat run answers a user turn: {e}.") from None
  prompt = run.chat_template.render(messages, add_generation_prompt=True)
  return run.input_tokenizer.encoding(prompt).ids


def _with_masks(tokenizer: Tokenizer, text: str) -> list[int]:
  """The ids of `text` with the mask id for each "<mask>"."""
  pieces = [tokenizer.encode(piece) for piece in text.split(MASK)]
  return sum((piece + [tokenizer.mask_id] for piece in pieces[:-1]), []) + pieces[-1]


def unknown_pieces(tokenizer: Tokenizer, text: str) -> list[str]:
  """What of `text` the tokenizer maps to its unknown id or drops: each word (split on
  whitespace) holding any, narrowed to its characters where the rest of the word is known
  (a char vocabulary: "12a3" -> ["a"]), and whitespace characters the vocabulary lacks."""
  def lost(piece: str) -> bool:
    ids = tokenizer.encode(piece)
    return not ids or tokenizer.unk_id in ids
  pieces = []
  for word in dict.fromkeys(text.split()):
    if not lost(word):
      continue
    chars = [c for c in dict.fromkeys(word) if lost(c)]
    rest = "".join(c for c in word if c not in chars)
    pieces += chars if rest and not lost(rest) else [word]
  spaces = [c for c in dict.fromkeys(text) if c.isspace()
            and tokenizer.unk_id is not None and tokenizer.unk_id in tokenizer.encode(c)]
  return pieces + spaces


def decoding_search(decode, task: str, targets_len: int, tokenizer: Tokenizer,
                    chat_template: chat.Template | None = None) -> decoding.Search:
  """The decoding settings of the config's `decode` section, stopping at the tokenizer's stop
  ids (its EOS, or the list of a pretrained folder's generation_config.json) and at a chat
  template's end of turn. decode.max_new_tokens=0 means `targets_len` for seq2seq, else 64."""
  stop_ids = tuple(tokenizer.stop_ids)
  if chat_template is not None:
    stop_ids += tuple({chat.end_of_turn_id(tokenizer, chat_template)} - set(stop_ids))
  return decoding.Search(
      method=decode.method, max_new_tokens=decode.max_new_tokens or (
          targets_len if task == "seq2seq" else 64),
      eos_id=stop_ids or None, pad_id=tokenizer.pad_id, temperature=decode.temperature,
      top_k=decode.top_k or None, top_p=decode.top_p or None, beam_size=decode.beam_size,
      length_penalty_alpha=decode.length_penalty_alpha)


def token_labels(tokenizer: Tokenizer, ids) -> list[str]:
  """One printable label per id; special ids by name."""
  names = {tokenizer.pad_id: "<pad>", tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>",
           tokenizer.mask_id: MASK}
  return [names.get(int(i)) or tokenizer.decode([int(i)]) or f"#{int(i)}" for i in ids]
