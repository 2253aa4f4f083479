"""Experiment configs: the shared defaults, the tiny variants, assets, and the model config.

An experiment file's `get_config()` starts from `base_config()` and sets what it needs.
train/run/validation.py checks a config once, where a run starts, before anything compiles.

Assets: a folder a config names (init_from="hf:FOLDER", data.source="local:PATH",
data.tokenizer_path and the like) may be given as `asset:NAME`, e.g. "hf:asset:tiny_bert" or
"local:asset:shakespeare_genres": a folder that train/assets builds (or finds) when the run
starts. `resolve_assets(config)` replaces the names by the folders; train.engine.loop does it first,
so the workdir's config.json holds real paths, and get_config() reads and writes no file.
"""

import copy
import dataclasses
import pathlib
import re
import typing

import ml_collections
from ml_collections import config_dict

from models import presets
from models.errors import InputError
from models.config import TransformerConfig
from train import assets
from train.engine import optim

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


def base_config() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with its default and a comment."""
  c = ml_collections.ConfigDict()
  c.seed = 0                          # one seed: data order, init and dropout derive from it
  c.task = "lm"                       # lm | seq2seq | classify | mlm
  c.init_from = ""                    # "" | ckpt:WORKDIR (params of another run) | hf:FOLDER
                                      # (Hugging Face gpt2/llama/mistral/qwen2/gemma, bert, t5;
                                      # see train/engine/trainable.py)
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


def model_fields(model) -> dict:
  """The TransformerConfig fields the config's `model` section sets."""
  fields = {k: v for k, v in model.items()
            if k not in ("preset", "num_classes", "pooling") and v is not None}
  unknown = sorted(set(fields) - MODEL_FIELDS)
  if unknown:
    raise InputError(f"config.model has unknown field(s) {unknown}; TransformerConfig knows "
                     f"{sorted(MODEL_FIELDS)}.")
  return fields


def hf_overrides(model) -> dict:
  """The fields the config's `model` section sets over an hf:FOLDER's config.json (vocab_size
  is the folder's)."""
  return {k: v for k, v in model_fields(model).items() if k != "vocab_size"}


def model_config(config, vocab_size: int,
                 pretrained_cfg: TransformerConfig | None = None) -> TransformerConfig:
  """The TransformerConfig of `config.model`: its preset with every field set as override;
  with init_from=hf:FOLDER, `pretrained_cfg` (the folder's, with the fields that keep shapes)."""
  fields = model_fields(config.model)
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

