"""Import of Hugging Face checkpoints (GPT-2, BERT, T5, LLaMA, Mistral, Qwen2, Gemma) from a
local folder (export: models/pretrained_export.py).

  module, params = from_hf(folder)   # gpt2, llama, mistral, qwen2, gemma -> DecoderOnly,
                                     # bert -> EncoderOnly,
                                     # t5 -> EncoderDecoder (v1.0, v1.1 / Flan-T5)
  module, params = from_hf(folder, head="classifier", num_classes=3)   # bert: EncoderClassifier
  module, params = from_hf(folder, head="mlm")                         # bert: EncoderMaskedLM
  logits_BTV = module.apply({"params": params}, tokens_BT)

The folder holds `config.json` and `model.safetensors` (or the shards that
`model.safetensors.index.json` lists; a `pytorch_model.bin` is read only when torch is
installed). Weights are copied by one table per family (models/pretrained_tables.py: `our
path <- HF name`, with a conversion) onto the unchanged models of models/transformer.py.
`params` is a plain nested dict of host numpy arrays in `param_dtype` (no logical-axis boxes),
ready for `jax.device_put`. Tokenizers: train.data.tokenizers.tokenizer_for(folder) (with the
end-of-sequence ids of the folder's generation_config.json as its `stop_ids`).
Bad input (no folder, no config.json, an unsupported model_type, a missing, misshapen or
unexpected tensor) raises one `PretrainedError` naming it.
"""

import json
import os
import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging

from models import paths
from models.config import TransformerConfig
from models.pretrained_tables import FAMILIES, Family, PretrainedError, Row
from models.transformer import (DecoderOnly, EncoderClassifier, EncoderDecoder, EncoderMaskedLM,
                                EncoderOnly)

SUPPORTED = tuple(FAMILIES)
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "gemma")  # model types imported as DecoderOnly
HEADS = {"bert": (None, "classifier", "mlm"), "t5": (None,), **{d: (None,) for d in DECODERS}}
# Config fields a caller may change: they do not alter the parameters' shapes, except
# vocab_pad_multiple, whose extra rows of the token table and logits layer start at zero.
OVERRIDABLE = ("dtype", "param_dtype", "logits_dtype", "vocab_pad_multiple", "dropout_rate",
               "attention_dropout_rate", "ffn_dropout_rate", "scan_layers", "remat_policy",
               "attention_implementation")


# ------------------------------------------------------------------------------------------
# Reading a folder.


def config_json(path: str) -> dict:
  """config.json of a checkpoint folder, after checking the folder and its model_type."""
  if not os.path.isdir(path):
    raise PretrainedError(f"No checkpoint folder at {path!r}: give the path of a local folder "
                          "holding a Hugging Face config.json and model.safetensors.")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise PretrainedError(f"{path} holds no config.json: copy the checkpoint's config.json there "
                          "(transformers' save_pretrained writes it).")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise PretrainedError(f"{config_path} is not readable JSON ({e}).") from e
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise PretrainedError(f"{config_path} has model_type {model_type!r} (architectures "
                          f"{hf.get('architectures')}); from_hf supports {list(SUPPORTED)}.")
  return hf


def hf_config(path: str, *, tie_output: bool | None = None, **overrides) -> TransformerConfig:
  """The TransformerConfig of a checkpoint folder. Whether its output layer is the token table:
  `tie_output` where it is known (a run keeps it beside its copy of the folder's config.json:
  train/run/hf_copy.py), else its tensors decide (all of them are read)."""
  if tie_output is None:
    return _read_folder(path, overrides)[3]
  hf = config_json(path)
  return _with_overrides(family_config(hf, {}, path).replace(tie_output=tie_output), overrides)


def _read_folder(path: str, overrides: dict) -> tuple[dict, Family, dict, TransformerConfig]:
  """config.json, the family, the tensors (names normalised) and the TransformerConfig."""
  hf = config_json(path)
  family = FAMILIES[hf["model_type"]]
  tensors = _normalised(_read_tensors(path), family)
  for copy, original in family.tied_copies.items():  # A tie stored under the copy's name only.
    if copy in tensors and original not in tensors:
      tensors[original] = tensors.pop(copy)
  return hf, family, tensors, _with_overrides(family_config(hf, tensors, path), overrides)


def family_config(hf: dict, tensors: dict, path: str) -> TransformerConfig:
  """The TransformerConfig that PATH's config.json `hf` describes; the tensors (may be {}: unread)
  decide only whether the output layer is tied."""
  try:
    return FAMILIES[hf["model_type"]].config(hf, tensors)
  except PretrainedError:
    raise
  except ValueError as e:  # TransformerConfig's validation.
    raise PretrainedError(f"{path}/config.json describes a model we cannot build: {e}") from e


def _with_overrides(cfg: TransformerConfig, overrides: dict) -> TransformerConfig:
  fixed = sorted(set(overrides) - set(OVERRIDABLE))
  if fixed:
    raise PretrainedError(f"from_hf cannot override {fixed}: they come from config.json and "
                          f"must match the weights; overridable fields: {list(OVERRIDABLE)}.")
  return cfg.replace(**overrides)


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors (or its shards, or pytorch_model.bin) as numpy arrays."""
  single, index = (os.path.join(path, n) for n in ("model.safetensors",
                                                   "model.safetensors.index.json"))
  if os.path.isfile(single):
    return _read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for s in shards for k, v in _read_safetensors(os.path.join(path, s)).items()}
  torch_file = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(torch_file):
    return _read_torch(torch_file)
  raise PretrainedError(f"{path} holds no model.safetensors (nor model.safetensors.index.json "
                        "or pytorch_model.bin): copy the checkpoint's weights there.")


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(file)
  except TypeError:  # numpy knows no bfloat16: read the raw buffers with ml_dtypes' type.
    return _read_safetensors_raw(file)
  except (safetensors.SafetensorError, OSError) as e:
    raise PretrainedError(f"{file} is not a readable safetensors file ({e}).") from e


def _read_safetensors_raw(file: str) -> dict[str, np.ndarray]:
  dtypes = {"BF16": jnp.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}
  with open(file, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
    data = f.read()
  tensors = {}
  for name, info in header.items():
    if name != "__metadata__":
      start, end = info["data_offsets"]
      tensors[name] = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"])
  return tensors


def _read_torch(file: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise PretrainedError(f"{file} is a PyTorch file and torch is not installed: install the "
                          "`pretrained` extra (pip install -e '.[pretrained]'), or convert the "
                          "checkpoint to model.safetensors.") from e
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many kinds (pickle, zip, weights-only refusals).
    raise PretrainedError(f"{file} is not a readable PyTorch state dict ({e}).") from e
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _normalised(tensors: dict, family: Family) -> dict[str, np.ndarray]:
  """Names without the base-model prefix, with old LayerNorm gamma/beta names modernised."""
  out = {}
  for name, x in tensors.items():
    if family.prefix and name.startswith(family.prefix):
      name = name[len(family.prefix):]
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    out[name] = x
  return out


# ------------------------------------------------------------------------------------------
# Import.


def _make_module(family: str, cfg: TransformerConfig, head, num_classes, pooling) -> nn.Module:
  if head not in HEADS[family]:
    raise PretrainedError(f"head={head!r} is not available for {family}; choose from "
                          f"{list(HEADS[family])}.")
  if head == "classifier":
    if not isinstance(num_classes, int) or num_classes <= 0:
      raise PretrainedError(f"head='classifier' needs num_classes > 0, got {num_classes!r}.")
    return EncoderClassifier(cfg, num_classes=num_classes, pooling=pooling)
  if head == "mlm":
    return EncoderMaskedLM(cfg)
  if family in DECODERS:
    return DecoderOnly(cfg)
  return {"bert": EncoderOnly, "t5": EncoderDecoder}[family](cfg)


def _init_args(module: nn.Module):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return (tokens, tokens) if isinstance(module, EncoderDecoder) else (tokens,)


def _flat(tree) -> dict:
  return paths.flatten(nn.meta.unbox(tree))


def _stack_layers(flat: dict) -> dict:
  """Unrolled `.../layers_{i}/rest` -> nn.scan's `.../layers/rest` stacked on axis 0."""
  out, groups = {}, {}
  for path, x in flat.items():
    match = re.fullmatch(r"(.*/)?layers_(\d+)/(.*)", path)
    if match is None:
      out[path] = x
    else:
      prefix, i, rest = match.groups()
      groups.setdefault(f"{prefix or ''}layers/{rest}", {})[int(i)] = x
  for path, layers in groups.items():
    out[path] = np.stack([layers[i] for i in range(len(layers))])
  return out


def _unstack_layers(flat: dict) -> dict:
  """The inverse of _stack_layers."""
  out = {}
  for path, x in flat.items():
    if re.fullmatch(r"(.*/)?layers/.*", path):
      out.update({re.sub(r"(^|/)layers/", rf"\g<1>layers_{i}/", path, count=1): x_i
                  for i, x_i in enumerate(x)})
    else:
      out[path] = x
  return out


def _fill(rows: list[Row], tensors: dict, path: str, hf: dict):
  """{our path: array} from the rows; one error for every missing or misshapen tensor."""
  params, missing, misshapen, fresh = {}, [], [], []
  for row in rows:
    x = tensors.get(row.hf)
    if x is None:
      (fresh if row.optional else missing).append(row.hf)
    elif tuple(x.shape) != row.hf_shape:
      misshapen.append(f"{row.hf} {tuple(x.shape)} (expected {row.hf_shape})")
    else:
      params[row.ours] = np.asarray(row.convert(x))
  where = f"the weights in {path} (model_type {hf['model_type']!r}, {hf.get('architectures')})"
  if missing:
    raise PretrainedError(f"{len(missing)} tensors that config.json implies are missing from "
                          f"{where}: {paths.listing(missing)}. Is config.json the one saved with "
                          "these weights, and does the checkpoint hold the requested head?")
  if misshapen:
    raise PretrainedError(f"{len(misshapen)} tensors in {where} do not have the shape that "
                          f"config.json implies: {paths.listing(misshapen)}. Is config.json the one "
                          "saved with these weights?")
  return params, fresh


def _check_unused(rows: list[Row], tensors: dict, family: Family, path: str) -> None:
  used = {row.hf for row in rows}
  unused = set(tensors) - used
  ties = {n for n in unused if family.tied_copies.get(n) in used}
  originals = {n: family.tied_copies[n] for n in ties}
  differ = sorted(n for n, o in originals.items() if not np.array_equal(tensors[n], tensors[o]))
  if differ:
    raise PretrainedError(f"{path}: {differ} differ from the tensors they are tied to "
                          f"({[originals[n] for n in differ]}); this model shares one tensor.")
  ignored = {n for n in unused - ties if re.fullmatch(family.unused, n)}
  unexpected = unused - ignored - ties
  if unexpected:
    raise PretrainedError(
        f"{path} holds {len(unexpected)} tensors that the import does not use: "
        f"{paths.listing(unexpected)}. Is it another architecture than config.json says?")
  heads = sorted(n for n in ignored
                 if not re.search(r"position_ids|attn\.(masked_)?bias|inv_freq", n))
  if heads:
    logging.info("from_hf %s: not imported (heads the module does not take): %s", path,
                 paths.listing(heads))


def _vocab_padded(x: np.ndarray, shape: tuple, cfg: TransformerConfig) -> np.ndarray:
  """`x` with zeros appended on each axis that is vocab_size long where `shape` has the padded
  vocabulary; any other mismatch is left for the shape check."""
  if x.ndim != len(shape):
    return x
  return np.pad(x, [(0, n - m) if (m, n) == (cfg.vocab_size, cfg.padded_vocab_size) else (0, 0)
                    for m, n in zip(x.shape, shape)])


class Imported(NamedTuple):
  """A Hugging Face checkpoint as `import_hf` returns it."""
  module: nn.Module
  params: dict          # as from_hf's
  initialised: frozenset[str]  # "/" paths of the params not in the file: freshly initialised


def from_hf(path: str, *, head: str | None = None, num_classes: int | None = None,
            pooling: str = "cls", rng=0, **overrides) -> tuple[nn.Module, dict]:
  """(module, params) of the Hugging Face checkpoint in the local folder `path`.

  `import_hf` takes the same arguments and also says which params were freshly initialised.

  Args:
    path: a folder with config.json and model.safetensors (model_type gpt2, bert, t5, llama,
      mistral, qwen2 or gemma).
    head: bert only. None: EncoderOnly (hidden states), its params carrying the file's pooler
      (BertModel's) where an EncoderClassifier keeps it, "pooler/", unused by the module and
      written back by to_hf; "classifier": EncoderClassifier with
      BERT's pooler restored (pooling "cls"; freshly initialised if the file has none) and the
      classifier restored from a BertForSequenceClassification file with `num_classes`
      labels, else freshly initialised from `rng`; "mlm": EncoderMaskedLM with the file's
      `cls.predictions` head (an error if it has none).
    num_classes: outputs of the classifier head.
    pooling: EncoderClassifier's pooling, "cls" (BERT's pooler) or "mean" (no pooler).
    rng: a PRNG key or int seed for freshly initialised parameters.
    **overrides: TransformerConfig fields that do not change shapes (see OVERRIDABLE), e.g.
      dtype="bfloat16", dropout_rate=0.0, scan_layers=True.

  Returns:
    The module and its params: a nested dict of numpy arrays in param_dtype, laid out as
    `module.init` lays it out (also under scan_layers; an EncoderOnly's with BERT's pooler
    besides); `module.cfg` is the config.
  """
  imported = import_hf(path, head=head, num_classes=num_classes, pooling=pooling, rng=rng,
                       **overrides)
  return imported.module, imported.params


def import_hf(path: str, *, head: str | None = None, num_classes: int | None = None,
              pooling: str = "cls", rng=0, **overrides) -> Imported:
  """`from_hf`'s module and params, and the paths of the params the file did not hold."""
  hf, family, tensors, cfg = _read_folder(path, overrides)
  module = _make_module(hf["model_type"], cfg, head, num_classes, pooling)
  rows = family.table(cfg.replace(vocab_pad_multiple=1), hf, tensors, head=head,
                      num_classes=num_classes, pooling=pooling)
  params, fresh = _fill(rows, tensors, path, hf)
  _check_unused(rows, tensors, family, path)
  if cfg.scan_layers:
    params = _stack_layers(params)

  rng = jax.random.key(rng) if isinstance(rng, int) else rng
  expected = _flat(jax.eval_shape(module.init, rng, *_init_args(module))["params"])
  if cfg.vocab_pad_multiple > 1:
    params = {p: _vocab_padded(x, expected[p].shape, cfg) if p in expected else x
              for p, x in params.items()}
  new = sorted(set(expected) - set(params))
  carried = {row.ours for row in rows if row.optional} - set(expected)  # BertModel's pooler
  wrong = {p for p in set(params) - carried
           if p not in expected or params[p].shape != expected[p].shape}
  wrong |= {p for p in new if not p.startswith(("pooler/", "classifier/"))}
  if wrong:
    raise AssertionError(f"from_hf's {hf['model_type']} table disagrees with the module: "
                         f"{paths.listing(wrong)}")  # A bug in the table, not in the input.
  if new:
    logging.info("from_hf %s: freshly initialised: %s (absent from the file: %s)", path,
                 paths.listing(new), paths.listing(fresh) or "none")
    init_new = lambda r: {p: x for p, x in _flat(module.init(r, *_init_args(module))["params"]
                                                  ).items() if p in new}  # XLA drops the rest.
    params.update(jax.tree.map(np.asarray, jax.jit(init_new)(rng)))
  dtype = cfg.param_dtype
  params = {p: x.astype(dtype) for p, x in params.items()}
  return Imported(module, paths.unflatten(params), frozenset(new))
