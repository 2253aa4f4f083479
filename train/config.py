"""Experiment configs: the shared defaults, validation, and the model config they describe.

An experiment file's `get_config()` starts from `base_config()` and sets what it needs.
`validate(config)` runs before anything compiles and turns a bad value into one sentence.

Assets: a folder a config names (init_from="hf:FOLDER", data.source="local:PATH",
data.tokenizer_path and the like) may be given as `asset:NAME`, e.g. "hf:asset:tiny_bert" or
"local:asset:shakespeare_genres": a folder that train/assets builds (or finds) when the run
starts. `resolve_assets(config)` replaces the names by the folders; train.loop does it first,
so the workdir's config.json holds real paths, and get_config() reads and writes no file.
"""

import copy
import dataclasses
import json
import math
import os
import pathlib
import re
import typing

import ml_collections
from ml_collections import config_dict

from models import decoding, lora, presets, pretrained
from models.errors import InputError
from models.pretrained_tables import FAMILIES, PretrainedError
from models.config import TransformerConfig
from train import assets, hf_copy, optim, xla_flags
from train.data import sources
from train.tasks import TASKS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


def base_config() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with its default and a comment."""
  c = ml_collections.ConfigDict()
  c.seed = 0                          # one seed: data order, init and dropout derive from it
  c.task = "lm"                       # lm | seq2seq | classify | mlm
  c.init_from = ""                    # "" | ckpt:WORKDIR (params of another run) | hf:FOLDER
                                      # (Hugging Face gpt2/llama/mistral/qwen2/gemma, bert, t5;
                                      # see train/trainable.py)
  c.label_smoothing = 0.0             # seq2seq/lm targets: (1 - s)·onehot + s/V

  c.model = ml_collections.ConfigDict()
  c.model.preset = ""                 # "" | transformer_base | gpt2 | bert_base | t5_v1_0 | ...
  c.model.num_classes = 0             # classify: number of labels
  c.model.pooling = "cls"             # classify: cls | mean
  for field in dataclasses.fields(TransformerConfig):  # None = the preset's (or the default)
    c.model[field.name] = config_dict.placeholder(_plain_type(field.type))

  c.data = ml_collections.ConfigDict()
  c.data.source = "numbers"           # numbers | a tfds name | local:PATH
  c.data.source_options = ml_collections.ConfigDict()  # keyword options of the source
  c.data.data_dir = ""                # tfds data dir; "" = tfds' default
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.tokenizer = "bytes"          # bytes | sentencepiece | word | char | pretrained
  c.data.tokenizer_path = ""          # cache/load path; "" = WORKDIR/tokenizers/inputs.*
  c.data.target_tokenizer = ""        # seq2seq: another tokenizer for targets; "" = same
  c.data.target_tokenizer_path = ""
  c.data.tokenizer_dir = ""           # where trained tokenizers are cached; "" = WORKDIR
  c.data.tokenizer_train_examples = 100_000  # examples read to train a tokenizer
  c.data.vocab_size = 0               # sentencepiece/word: vocabulary size; 0 = all words
  c.data.seq_len = 128                # lm / classify / mlm row length
  c.data.inputs_len = 64              # seq2seq source length
  c.data.targets_len = 64             # seq2seq target length
  c.data.mask_rate = 0.15             # mlm
  c.data.pack = True                  # pack several examples into a row (lm, seq2seq)
  c.data.max_segments_per_row = 0     # most examples packed in a row; 0 = as many as fit.
                                      # Each batch's attention is compiled for its own most
                                      # segments a row, rounded up to 4, 8, 16, 32, 64, ...
                                      # (cuDNN's packed layout keeps softmax statistics of
                                      # [B*that, heads, length] float32 a layer); a limit M
                                      # caps them at M's
  c.data.num_workers = 0              # grain worker processes

  c.optim = optim.default_optim_config()

  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = False              # low-rank adapters; the rest of the model frozen
  c.lora.targets = r"attention/(query|value)/kernel"  # regex (re.search) over param paths
  c.lora.rank = 8
  c.lora.alpha = 16.0                 # adapters scaled by alpha / rank
  c.lora.train = ()                   # regexes of model params trained fully too (a new head)
  c.lora.adapter_only_checkpoint = False  # save only what trains; the base from init_from

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.batch_size = 64             # global batch, rows
  c.train.log_every = 50              # steps between train metric lines
  c.train.eval_every = 500            # steps between evals (and at the end); 0 = end only
  c.train.eval_batches = 0            # eval batches (0 = the whole eval split)
  c.train.checkpoint_every = 500      # steps between checkpoints (and at the end, on SIGTERM)
  c.train.keep_checkpoints = 3
  c.train.peak_flops = 0.0            # per device, for MFU; 0 = from the device table
  c.train.print_examples = 5          # seq2seq: translations printed at each eval
  c.train.compilation_cache = True    # JAX's persistent compilation cache (+ XLA's autotune
                                      # results on GPUs), in $TAPETE_CACHE/jax (default
                                      # ~/.cache/tapete/jax) or $JAX_COMPILATION_CACHE_DIR: a
                                      # rerun's step loads in seconds. False (or the env's
                                      # JAX_ENABLE_COMPILATION_CACHE=false) compiles afresh
  c.train.xla_flags = ""              # appended to XLA_FLAGS before JAX starts (the train CLI),
                                      # e.g. on GPUs, to A/B test:
                                      # --xla_gpu_enable_latency_hiding_scheduler=true
                                      # --xla_gpu_enable_triton_gemm=false
                                      # --xla_gpu_enable_command_buffer=  (empty: no CUDA graphs)
                                      # --xla_gpu_enable_command_buffer=+CONDITIONAL

  c.decode = ml_collections.ConfigDict()
  c.decode.method = "greedy"          # greedy | sample | beam (eval, train.generate)
  c.decode.beam_size = 4
  c.decode.length_penalty_alpha = 0.6
  c.decode.temperature = 1.0
  c.decode.top_k = 0                  # 0 = off
  c.decode.top_p = 0.0                # 0 = off
  c.decode.max_new_tokens = 0         # 0 = data.targets_len (seq2seq) / 64

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # -1 = the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False       # jax.distributed.initialize() (also auto on SLURM/TPU)
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def parse_variant(variant: str, *known: str, conflicts: dict | None = None
                  ) -> ml_collections.ConfigDict:
  """The switches of a variant string such as "tiny,lora": each known name, True if given.

  An experiment's get_config(variant) applies the switches in its own fixed order (tiny last,
  so that "tiny,lora" is a tiny LoRA run), whatever their order in the string. `conflicts`
  maps pairs of names that cannot go together to the reason.
  """
  names = [name.strip() for name in variant.split(",") if name.strip()]
  for name in names:
    if name not in known:
      raise InputError(f"Unknown variant {name!r} in {variant!r}: choose from "
                       f"{', '.join(known)} (one or more, joined by commas).")
    if names.count(name) > 1:
      raise InputError(f"The variant {variant!r} names {name!r} twice: name it once.")
  for (a, b), reason in (conflicts or {}).items():
    if a in names and b in names:
      raise InputError(f"The variants {a!r} and {b!r} cannot go together: {reason}.")
  return ml_collections.ConfigDict({name: name in names for name in known})


def shrink_to_tiny(c: ml_collections.ConfigDict, *, local_data: str = "",
                   task: str = "lm") -> ml_collections.ConfigDict:
  """An experiment's tiny variant: a width-32 model, a few float32 steps, seconds on a CPU.

  With `local_data` (a path from the repository root), the experiment reads that bundled file
  as a local dataset of `task` through byte tokens instead of its real data.
  """
  if local_data:
    c.data.source = f"local:{REPO_ROOT / local_data}"
    c.data.source_options = {"task": task, "validation_fraction": 0.15, "test_fraction": 0.15}
    c.data.tokenizer = "bytes"
    c.data.vocab_size = 0
  c.data.num_workers = 0
  c.model.d_model, c.model.num_heads, c.model.d_ff, c.model.num_layers = 32, 4, 64, 2
  c.model.max_len = 128
  c.model.dtype = "float32"
  return shrink_training(c)


def shrink_training(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A tiny variant's training: 4 steps of 8 rows, a checkpoint every 2, eval at the end."""
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 2
  c.train.num_steps = 4
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.eval_every = 0
  c.train.checkpoint_every = 2
  return c


ASSET = re.compile(r"^(?P<scheme>[a-z]+:)?asset:(?P<name>[^/]+)$")


def resolve_assets(config) -> ml_collections.ConfigDict:
  """A copy of `config` with every `asset:NAME` value (alone or after a scheme such as hf: or
  local:) replaced by the asset's folder, built first if the cache lacks it."""
  config = copy.deepcopy(config)
  _resolve_assets(config)
  return config


def _resolve_assets(node: ml_collections.ConfigDict) -> None:
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      _resolve_assets(value)
    elif isinstance(value, str) and (match := ASSET.match(value)):
      node[key] = (match["scheme"] or "") + assets.folder(match["name"])


def _plain_type(annotation) -> type:
  """int for `int | None`, and so on: the type a config field holds when it is set."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if args else annotation


def model_fields(config) -> dict:
  """The TransformerConfig fields `config.model` sets."""
  fields = {k: v for k, v in config.model.items()
            if k not in ("preset", "num_classes", "pooling") and v is not None}
  unknown = sorted(set(fields) - MODEL_FIELDS)
  if unknown:
    raise InputError(f"config.model has unknown field(s) {unknown}; TransformerConfig knows "
                     f"{sorted(MODEL_FIELDS)}.")
  return fields


def hf_overrides(config) -> dict:
  """The fields config.model sets over an hf:FOLDER's config.json (vocab_size is the folder's)."""
  return {k: v for k, v in model_fields(config).items() if k != "vocab_size"}


def model_config(config, vocab_size: int,
                 pretrained_cfg: TransformerConfig | None = None) -> TransformerConfig:
  """The TransformerConfig of `config.model`: its preset with every field set as override;
  with init_from=hf:FOLDER, `pretrained_cfg` (the folder's, with the fields that keep shapes)."""
  fields = model_fields(config)
  if config.init_from.startswith("hf:"):
    if fields.get("vocab_size", pretrained_cfg.vocab_size) != pretrained_cfg.vocab_size:
      raise InputError(f"config.model.vocab_size={fields['vocab_size']} differs from the "
                       f"{pretrained_cfg.vocab_size} of {config.init_from}: leave it unset.")
    if pretrained_cfg.vocab_size < vocab_size:
      raise InputError(f"The tokenizer has {vocab_size} ids, more than the vocab_size "
                       f"{pretrained_cfg.vocab_size} of {config.init_from}: use its tokenizer "
                       "(data.tokenizer='pretrained').")
    return pretrained_cfg
  if not fields.get("vocab_size"):
    fields["vocab_size"] = vocab_size
  elif fields["vocab_size"] < vocab_size:
    raise InputError(f"config.model.vocab_size={fields['vocab_size']} is smaller than the "
                     f"tokenizer's {vocab_size} ids: raise it or set 0 to use the tokenizer's.")
  if config.model.preset:
    if config.model.preset not in presets.PRESETS:
      raise InputError(f"Unknown config.model.preset {config.model.preset!r}; choose from "
                       f"{sorted(presets.PRESETS)} or ''.")
    return presets.PRESETS[config.model.preset](**fields)
  return TransformerConfig(**fields)


def validate(config, workdir: str | None = None) -> None:
  """One clear error for a value or combination that cannot run (an hf:FOLDER's config.json is
  read from the copy `workdir` keeps of it, once it holds one: train/hf_copy.py)."""
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
    from train import run_tokenizers
    run_tokenizers.chat_template(config, workdir)
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
  Returns the folder's model (see _hf_model)."""
  folder = hf_copy.folder(config, workdir)
  hf = pretrained.read_config(folder)
  model_type = hf["model_type"]
  if model_type not in HF_FAMILIES[config.task]:
    raise InputError(f"config.init_from={config.init_from!r} is a {model_type} checkpoint; task "
                     f"{config.task!r} fine-tunes {', '.join(HF_FAMILIES[config.task])} "
                     "checkpoints.")
  if config.model.preset:
    raise InputError(f"config.model.preset={config.model.preset!r} does not apply with "
                     f"init_from={config.init_from!r}, whose config.json sets the model: set "
                     "preset to ''.")
  fixed = sorted(set(hf_overrides(config)) - set(pretrained.OVERRIDABLE))
  if fixed:
    raise InputError(f"config.model sets {fixed}, which {config.init_from!r}'s config.json "
                     f"decides; only {list(pretrained.OVERRIDABLE)} may be set.")
  return _hf_model(config, folder, hf)


def _hf_model(config, folder: str, hf: dict) -> TransformerConfig:
  """The model of an hf:FOLDER as its config.json `hf` describes it, with config.model's
  overrides (the weights, not read here, decide only whether the output layer is tied)."""
  try:
    folder_cfg = FAMILIES[hf["model_type"]].config(hf, {})
  except PretrainedError:
    raise
  except ValueError as e:  # TransformerConfig's validation.
    raise PretrainedError(f"{folder}/config.json describes a model we cannot build: {e}") from e
  return folder_cfg.replace(**hf_overrides(config))


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
  if _is_number(c.alpha) and not math.isfinite(c.alpha):  # LoraConfig checks the rest.
    raise InputError(f"config.lora.alpha must be a finite number > 0, got {c.alpha}.")
  lora.LoraConfig(targets=c.targets, rank=c.rank, alpha=c.alpha)
  for pattern in c.train:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise InputError(f"config.lora.train pattern {pattern!r} is not a valid regular "
                       f"expression ({e}).") from None
  if config.optim.freeze:
    raise InputError("With config.lora.enabled the model is frozen except the adapters and "
                     "config.lora.train: leave config.optim.freeze empty.")
  if c.adapter_only_checkpoint and not config.init_from:
    raise InputError("config.lora.adapter_only_checkpoint needs config.init_from: the frozen "
                     "base is rebuilt from it.")


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
  try:
    with open(path) as f:
      saved = _flat_dict(json.load(f))
  except (OSError, ValueError) as e:
    raise InputError(f"{path} is not readable JSON ({e}): it records the run in {workdir}; "
                     "restore it, or train in a new --workdir.") from None
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
