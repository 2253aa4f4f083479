"""Config validation: a value or combination that cannot run refused with one sentence, before
any data is read, anything written or compiled; called once where a config enters (the train
CLI's train.engine.loop.train_and_evaluate, train.evaluate, launch's sweeps, the benchmarks)."""

import math

import ml_collections

from models import decoding, lora, paths, pretrained
from models.errors import InputError
from models.config import TransformerConfig
from train.data import sources
from train.engine import optim
from train.engine.tasks import TASKS
from train.run import hf_copy, xla_flags
from train.run.config import hf_overrides, model_config


def validate(config, workdir: str | None = None) -> None:
  """One clear error for a value or combination that cannot run (an hf:FOLDER's config.json is
  read from the copy `workdir` keeps of it, once it holds one: train/run/hf_copy.py)."""
  if config.task not in TASKS:
    raise InputError(f"config.task={config.task!r}: choose from {TASKS}.")
  _validate_numbers(config)
  if config.task == "classify" and config.model.num_classes < 2:
    raise InputError("config.task='classify' needs config.model.num_classes >= 2.")
  _validate_source_options(config.data)
  local_task = config.data.source_options.get("task")
  if local_task in ("instruct", "chat") and config.task != "lm":
    raise InputError(f"config.data.source_options.task={local_task!r} (prompt -> response pairs"
                     " or conversations) trains an lm run, not config.task="
                     f"{config.task!r}: set task='lm'.")
  if local_task == "chat" and config.data.tokenizer != "pretrained":
    raise InputError("config.data.source_options.task='chat' tokenizes conversations as their "
                     "template writes them, with a Hugging Face tokenizer: set "
                     f"data.tokenizer='pretrained', not {config.data.tokenizer!r}.")
  if "chat_template" in config.data.source_options and local_task != "chat":
    raise InputError("config.data.source_options.chat_template is read by task='chat' only; "
                     "set source_options.task='chat' or drop it.")
  if config.init_from and not config.init_from.startswith(("ckpt:", "hf:")):
    raise InputError(f"config.init_from={config.init_from!r}: use 'ckpt:WORKDIR' or "
                     "'hf:FOLDER'.")
  hf_model = _validate_hf(config, workdir) if config.init_from.startswith("hf:") else None
  if local_task == "chat":  # Its template, before any data; tokenizers imported by chat runs.
    from train.run import run_tokenizers
    run_tokenizers.chat_template(config.data, config.init_from, workdir)
  _validate_lora(config)
  if config.decode.method not in decoding.METHODS:
    raise InputError(f"config.decode.method={config.decode.method!r}: use one of "
                     f"{', '.join(decoding.METHODS)}.")
  if config.decode.method == "sample" and config.decode.temperature == 0:
    raise InputError("config.decode.temperature=0 with decode.method='sample': give a "
                     "temperature > 0, or use decode.method='greedy'.")
  optim.validate_optim_config(config.optim, config.train.batch_size)
  xla_flags.validate(config.train.xla_flags)
  # The model as far as it is known before any data or tokenizer work (vocab_size aside).
  _validate_lengths(config, hf_model or model_config(config, vocab_size=1))
  _validate_finite(config)


# Counts: (key, the smallest value allowed). Each must be an integer.
INTEGERS = (
    ("train.num_steps", 1), ("train.batch_size", 1), ("train.log_every", 1),
    ("train.keep_checkpoints", 1), ("train.eval_every", 0), ("train.checkpoint_every", 0),
    ("train.eval_batches", 0), ("train.print_examples", 0),
    ("data.seq_len", 1), ("data.inputs_len", 1), ("data.targets_len", 1),
    ("data.tokenizer_train_examples", 1), ("data.vocab_size", 0), ("data.num_workers", 0),
    ("data.max_segments_per_row", 0),
    ("decode.beam_size", 1), ("decode.top_k", 0), ("decode.max_new_tokens", 0),
)
# Real numbers: (key, the range allowed, in words). Each must be finite.
REALS = (
    ("label_smoothing", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("data.mask_rate", lambda x: 0 < x < 1, "in (0, 1)"),
    ("decode.temperature", lambda x: x >= 0, ">= 0"),
    ("decode.top_p", lambda x: 0 <= x <= 1, "in [0, 1] (0 = off)"),
    ("decode.length_penalty_alpha", lambda x: True, ""),
    ("train.peak_flops", lambda x: x >= 0, ">= 0 (0 = from the device table)"),
)
MESH_AXES = ("data", "fsdp", "tensor")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(config, key: str):
  """config.data.seq_len for key "data.seq_len"."""
  for part in key.split("."):
    config = config[part]
  return config


def _validate_source_options(data) -> None:
  known = sources.option_names(data.source)
  unknown = sorted(set(data.source_options) - set(known))
  if unknown:
    raise InputError(f"config.data.source_options has {', '.join(unknown)}, which "
                     f"data.source={data.source!r} does not take; it takes "
                     f"{', '.join(known) or 'no options'}.")


def _validate_numbers(config) -> None:
  """The counts, rates and mesh sizes a user gives are numbers in their ranges (NaN is not)."""
  for key, smallest in INTEGERS:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, int):
      raise InputError(f"config.{key} must be an integer, got {value!r}.")
    if value < smallest:
      allowed = "positive" if smallest == 1 else f">= {smallest}"
      raise InputError(f"config.{key} must be {allowed}, got {value}.")
  for key, in_range, allowed in REALS:
    value = _get(config, key)
    if not _is_number(value) or not math.isfinite(value) or not in_range(value):
      raise InputError(f"config.{key} must be {f'a finite number {allowed}'.strip()}, got "
                       f"{value!r}.")
  sizes = [config.mesh[axis] for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or (size != -1 and size < 1):
      raise InputError(f"config.mesh.{axis} must be a positive integer or -1 (= the devices "
                       f"the other axes leave), got {size!r}.")
  if sizes.count(-1) > 1:
    raise InputError(f"config.mesh sets {sizes.count(-1)} axes to -1: at most one axis may "
                     "take the devices the others leave; give the others explicit sizes.")


def _validate_finite(config, prefix: str = "config") -> None:
  """No float anywhere in the config is NaN or infinite (those with a range are checked first)."""
  for key, value in config.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      _validate_finite(value, f"{prefix}.{key}")
    elif isinstance(value, float) and not math.isfinite(value):
      raise InputError(f"{prefix}.{key}={value} is not a finite number: give a finite value.")


# The Hugging Face model_types each task fine-tunes.
HF_FAMILIES = {"lm": pretrained.DECODERS, "seq2seq": ("t5",), "classify": ("bert",),
               "mlm": ("bert",)}


def _validate_hf(config, workdir: str | None) -> TransformerConfig:
  """The folder's model type fits the task; config.model sets only fields that keep shapes.
  Returns the folder's model with config.model's overrides (its weights unread)."""
  folder = hf_copy.folder(config.init_from, workdir)
  hf = pretrained.config_json(folder)
  model_type = hf["model_type"]
  if model_type not in HF_FAMILIES[config.task]:
    raise InputError(f"config.init_from={config.init_from!r} is a {model_type} checkpoint; task "
                     f"{config.task!r} fine-tunes {', '.join(HF_FAMILIES[config.task])} "
                     "checkpoints.")
  if config.model.preset:
    raise InputError(f"config.model.preset={config.model.preset!r} does not apply with "
                     f"init_from={config.init_from!r}, whose config.json sets the model: set "
                     "preset to ''.")
  fixed = sorted(set(hf_overrides(config.model)) - set(pretrained.OVERRIDABLE))
  if fixed:
    raise InputError(f"config.model sets {fixed}, which {config.init_from!r}'s config.json "
                     f"decides; only {list(pretrained.OVERRIDABLE)} may be set.")
  return pretrained.family_config(hf, {}, folder).replace(**hf_overrides(config.model))


def _validate_lengths(config, model_cfg: TransformerConfig) -> None:
  """The rows the model sees fit its learned position table, if it has one."""
  if model_cfg.position != "learned":
    return
  names = ("inputs_len", "targets_len") if config.task == "seq2seq" else ("seq_len",)
  lengths = {f"data.{name}": config.data[name] for name in names}
  if config.task == "seq2seq":  # The eval's decoder positions.
    lengths["decode.max_new_tokens"] = config.decode.max_new_tokens
  max_len = model_cfg.max_len
  if config.init_from.startswith("hf:"):
    table, fix = (f"max_len={max_len} in {config.init_from}'s config.json",
                  "(a pretrained model's table cannot grow)")
  else:
    table, fix = f"model.max_len={max_len}", "or raise model.max_len"
  for name, value in lengths.items():
    if value > max_len:
      raise InputError(f"config.{name}={value} exceeds the model's learned position table "
                       f"({table}): lower {name} to at most {max_len} {fix}.")


def _validate_lora(config) -> None:
  c = config.lora
  if not c.enabled:
    if c.adapter_only_checkpoint:
      raise InputError("config.lora.adapter_only_checkpoint needs config.lora.enabled.")
    return
  lora.LoraConfig(targets=c.targets, rank=c.rank, alpha=c.alpha)
  problems = paths.pattern_problems("config.lora.train pattern", c.train)
  if problems:
    raise InputError(f"{problems[0]}.")
  if config.optim.freeze:
    raise InputError("With config.lora.enabled the model is frozen except the adapters and "
                     "config.lora.train: leave config.optim.freeze empty.")
  if c.adapter_only_checkpoint and not config.init_from:
    raise InputError("config.lora.adapter_only_checkpoint needs config.init_from: the frozen "
                     "base is rebuilt from it.")
