"""Import of Hugging Face checkpoints (GPT-2, BERT, T5) from a local folder; GPT-2 export.

  module, params = from_hf(folder)   # gpt2 -> DecoderOnly, bert -> EncoderOnly,
                                     # t5 -> EncoderDecoder (v1.0, v1.1 / Flan-T5)
  module, params = from_hf(folder, head="classifier", num_classes=3)   # bert: EncoderClassifier
  module, params = from_hf(folder, head="mlm")                         # bert: EncoderMaskedLM
  logits_BTV = module.apply({"params": params}, tokens_BT)

The folder holds `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`;
a `pytorch_model.bin` is read only when torch is installed). Weights are copied by one table
per family, `our path <- HF name` with a conversion (transpose, head split, GPT-2's fused
`c_attn`), onto the unchanged models of models/transformer.py. `params` is a plain nested dict
of host numpy arrays in `param_dtype` (no logical-axis boxes), ready for `jax.device_put`.
Bad input (no folder, no config.json, an unsupported model_type, a missing, misshapen or
unexpected tensor) raises one `PretrainedError` naming it.
"""

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from models import presets
from models.transformer import (DecoderOnly, EncoderClassifier, EncoderDecoder, EncoderMaskedLM,
                                EncoderOnly, TransformerConfig)

SUPPORTED = ("gpt2", "bert", "t5")
HEADS = {"gpt2": (None,), "bert": (None, "classifier", "mlm"), "t5": (None,)}
# Config fields a caller may change: they do not alter the parameters' shapes.
OVERRIDABLE = ("dtype", "param_dtype", "dropout_rate", "attention_dropout_rate",
               "ffn_dropout_rate", "scan_layers", "remat_policy", "attention_implementation")
# Hugging Face activation names (transformers.activations.ACT2FN) -> ours.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "silu": "silu",
               "swish": "silu"}


class PretrainedError(ValueError):
  """A checkpoint folder cannot be imported: missing, unsupported or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One parameter: `ours` (a '/' path) <- `convert(file[hf])`; `hf_shape` is checked first."""
  ours: str
  hf: str
  hf_shape: tuple[int, ...]
  convert: Callable[[np.ndarray], np.ndarray] = lambda x: x
  optional: bool = False  # Missing from the file: freshly initialised (logged), not an error.


# ------------------------------------------------------------------------------------------
# Conversions. torch's Linear stores [out, in]; GPT-2's Conv1D stores [in, out].


def _transpose(w):
  return w.T


def _to_heads(w, n, h):
  """Linear [N*H, D] -> kernel [D, N, H] (query, key, value)."""
  return w.T.reshape(-1, n, h)


def _from_heads(w, n, h):
  """Linear [D, N*H] -> kernel [N, H, D] (attention output)."""
  return w.T.reshape(n, h, -1)


def _fused_part(x, i, n, h):
  """Part i of GPT-2's fused q|k|v along the last axis: Conv1D [D, 3*N*H] -> [D, N, H], bias -> [N, H]."""
  return np.split(x, 3, axis=-1)[i].reshape(*x.shape[:-1], n, h)


# ------------------------------------------------------------------------------------------
# Config mapping: config.json -> TransformerConfig, through the presets (whose defaults are
# those of transformers' GPT2Config, BertConfig and T5Config).


def _require(hf: dict, field: str, supported, default) -> None:
  value = hf.get(field, default)
  if value != supported:
    raise PretrainedError(
        f"config.json sets {field}={value!r}; from_hf supports only {field}={supported!r} for "
        f"model_type {hf['model_type']!r}.")


def _activation(name: str) -> str:
  if name not in ACTIVATIONS:
    raise PretrainedError(f"config.json names the activation {name!r}; from_hf supports "
                          f"{sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _present(hf: dict, fields: dict) -> dict:
  """{our field: convert(hf[hf field])} for the HF fields present (and not null) in hf."""
  out = {}
  for hf_field, (ours, convert) in fields.items():
    if hf.get(hf_field) is not None:
      out[ours] = convert(hf[hf_field])
  return out


_SAME = lambda x: x


def _tied(hf: dict, tensors: dict, output: str, table: str) -> bool:
  """Whether the output layer is the token table: as transformers >= 5 decides, the config's
  tie_word_embeddings, unless the file holds an output layer that differs from the table."""
  if hf.get("tie_word_embeddings", True) is False:
    return False
  return output not in tensors or np.array_equal(tensors[output], tensors.get(table))


def _gpt2_config(hf: dict, tensors: dict) -> TransformerConfig:
  _require(hf, "scale_attn_weights", True, True)
  _require(hf, "scale_attn_by_inverse_layer_idx", False, False)
  _require(hf, "add_cross_attention", False, False)
  fields = _present(hf, {
      "vocab_size": ("vocab_size", int), "n_embd": ("d_model", int), "n_head": ("num_heads", int),
      "n_layer": ("num_layers", int), "n_inner": ("d_ff", int), "n_positions": ("max_len", int),
      "layer_norm_epsilon": ("norm_epsilon", float), "activation_function": ("activation", _activation),
      "resid_pdrop": ("dropout_rate", float),
      "attn_pdrop": ("attention_dropout_rate", float)})
  fields.setdefault("d_ff", 4 * fields.get("d_model", 768))
  return presets.gpt2(**fields, tie_output=_tied(hf, tensors, "lm_head.weight", "wte.weight"))


def _bert_config(hf: dict, tensors: dict) -> TransformerConfig:
  del tensors
  _require(hf, "position_embedding_type", "absolute", "absolute")
  _require(hf, "is_decoder", False, False)
  _require(hf, "add_cross_attention", False, False)
  return presets.bert_base(**_present(hf, {
      "vocab_size": ("vocab_size", int), "hidden_size": ("d_model", int),
      "num_attention_heads": ("num_heads", int), "num_hidden_layers": ("num_layers", int),
      "intermediate_size": ("d_ff", int), "max_position_embeddings": ("max_len", int),
      "type_vocab_size": ("num_token_types", int), "layer_norm_eps": ("norm_epsilon", float),
      "hidden_act": ("activation", _activation), "hidden_dropout_prob": ("dropout_rate", float),
      "attention_probs_dropout_prob": ("attention_dropout_rate", float)}))


def _t5_config(hf: dict, tensors: dict) -> TransformerConfig:
  """T5 v1.0 (ReLU, tied, logits rescaled) and v1.1 (gated GELU, own lm_head, unscaled).

  The rescaling follows `scale_decoder_outputs` (transformers >= 5) or `tie_word_embeddings`.
  """
  proj = hf.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise PretrainedError(f"config.json sets feed_forward_proj={proj!r}; expected 'ACT' or "
                          "'gated-ACT', e.g. 'relu' or 'gated-gelu'.")
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # As transformers' T5Config.
  fields = _present(hf, {
      "vocab_size": ("vocab_size", int), "d_model": ("d_model", int), "d_kv": ("head_dim", int),
      "d_ff": ("d_ff", int), "num_heads": ("num_heads", int), "num_layers": ("num_layers", int),
      "num_decoder_layers": ("num_decoder_layers", int),
      "relative_attention_num_buckets": ("relative_buckets", int),
      "relative_attention_max_distance": ("relative_max_distance", int),
      "layer_norm_epsilon": ("norm_epsilon", float)})
  rate = float(hf.get("dropout_rate", 0.1))
  scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
  return presets.t5_v1_0(**fields, activation=_activation(act), gated_ffn=len(parts) == 2,
                         tie_output=_tied(hf, tensors, "lm_head.weight", "shared.weight"),
                         scale_tied_logits=bool(scale),
                         dropout_rate=rate, attention_dropout_rate=rate, ffn_dropout_rate=rate)


# ------------------------------------------------------------------------------------------
# Tables: our path <- HF name (after the base-model prefix is stripped).


def _dims(cfg: TransformerConfig):
  return cfg.d_model, cfg.num_heads, cfg.head_size, cfg.d_ff


def _gpt2_table(cfg: TransformerConfig, tensors: dict, **no_heads) -> list[Row]:
  del tensors, no_heads
  D, N, H, F = _dims(cfg)
  rows = [Row("token_embed/embedding", "wte.weight", (cfg.vocab_size, D)),
          Row("decoder/embedder/position_embed/embedding", "wpe.weight", (cfg.max_len, D)),
          Row("decoder/final_norm/scale", "ln_f.weight", (D,)),
          Row("decoder/final_norm/bias", "ln_f.bias", (D,))]
  if not cfg.tie_output:
    rows.append(Row("decoder/logits_dense/kernel", "lm_head.weight", (cfg.vocab_size, D),
                    _transpose))
  for i in range(cfg.num_layers):
    ours, hf = f"decoder/layers_{i}", f"h.{i}"
    for j, name in enumerate(("query", "key", "value")):
      rows += [Row(f"{ours}/self_attention/{name}/kernel", f"{hf}.attn.c_attn.weight",
                   (D, 3 * N * H), functools.partial(_fused_part, i=j, n=N, h=H)),
               Row(f"{ours}/self_attention/{name}/bias", f"{hf}.attn.c_attn.bias", (3 * N * H,),
                   functools.partial(_fused_part, i=j, n=N, h=H))]
    rows += [
        Row(f"{ours}/self_attention/out/kernel", f"{hf}.attn.c_proj.weight", (N * H, D),
            lambda w: w.reshape(N, H, D)),
        Row(f"{ours}/self_attention/out/bias", f"{hf}.attn.c_proj.bias", (D,)),
        Row(f"{ours}/self_attention_norm/scale", f"{hf}.ln_1.weight", (D,)),
        Row(f"{ours}/self_attention_norm/bias", f"{hf}.ln_1.bias", (D,)),
        Row(f"{ours}/mlp/wi/kernel", f"{hf}.mlp.c_fc.weight", (D, F)),
        Row(f"{ours}/mlp/wi/bias", f"{hf}.mlp.c_fc.bias", (F,)),
        Row(f"{ours}/mlp/wo/kernel", f"{hf}.mlp.c_proj.weight", (F, D)),
        Row(f"{ours}/mlp/wo/bias", f"{hf}.mlp.c_proj.bias", (D,)),
        Row(f"{ours}/mlp_norm/scale", f"{hf}.ln_2.weight", (D,)),
        Row(f"{ours}/mlp_norm/bias", f"{hf}.ln_2.bias", (D,))]
  return rows


def _bert_table(cfg: TransformerConfig, tensors: dict, *, head: str | None,
                num_classes: int | None, pooling: str) -> list[Row]:
  D, N, H, F = _dims(cfg)
  base = "" if head is None else "encoder/"
  emb = f"{base}encoder/embedder"
  rows = [Row(f"{base}token_embed/embedding", "embeddings.word_embeddings.weight",
              (cfg.vocab_size, D)),
          Row(f"{emb}/position_embed/embedding", "embeddings.position_embeddings.weight",
              (cfg.max_len, D)),
          Row(f"{emb}/embed_norm/scale", "embeddings.LayerNorm.weight", (D,)),
          Row(f"{emb}/embed_norm/bias", "embeddings.LayerNorm.bias", (D,))]
  if cfg.num_token_types:
    rows.append(Row(f"{emb}/token_type_embed/embedding", "embeddings.token_type_embeddings.weight",
                    (cfg.num_token_types, D)))
  for i in range(cfg.num_layers):
    ours, hf = f"{base}encoder/layers_{i}", f"encoder.layer.{i}"
    for name in ("query", "key", "value"):
      rows += [Row(f"{ours}/self_attention/{name}/kernel", f"{hf}.attention.self.{name}.weight",
                   (N * H, D), functools.partial(_to_heads, n=N, h=H)),
               Row(f"{ours}/self_attention/{name}/bias", f"{hf}.attention.self.{name}.bias",
                   (N * H,), lambda b: b.reshape(N, H))]
    rows += [
        Row(f"{ours}/self_attention/out/kernel", f"{hf}.attention.output.dense.weight", (D, N * H),
            functools.partial(_from_heads, n=N, h=H)),
        Row(f"{ours}/self_attention/out/bias", f"{hf}.attention.output.dense.bias", (D,)),
        Row(f"{ours}/self_attention_norm/scale", f"{hf}.attention.output.LayerNorm.weight", (D,)),
        Row(f"{ours}/self_attention_norm/bias", f"{hf}.attention.output.LayerNorm.bias", (D,)),
        Row(f"{ours}/mlp/wi/kernel", f"{hf}.intermediate.dense.weight", (F, D), _transpose),
        Row(f"{ours}/mlp/wi/bias", f"{hf}.intermediate.dense.bias", (F,)),
        Row(f"{ours}/mlp/wo/kernel", f"{hf}.output.dense.weight", (D, F), _transpose),
        Row(f"{ours}/mlp/wo/bias", f"{hf}.output.dense.bias", (D,)),
        Row(f"{ours}/mlp_norm/scale", f"{hf}.output.LayerNorm.weight", (D,)),
        Row(f"{ours}/mlp_norm/bias", f"{hf}.output.LayerNorm.bias", (D,))]
  if head == "classifier" and pooling == "cls":
    rows += [Row("pooler/kernel", "pooler.dense.weight", (D, D), _transpose, optional=True),
             Row("pooler/bias", "pooler.dense.bias", (D,), optional=True)]
  if head == "classifier":
    classifier = tensors.get("classifier.weight")
    if classifier is not None and classifier.shape == (num_classes, D):  # Else a new task.
      rows += [Row("classifier/kernel", "classifier.weight", (num_classes, D), _transpose),
               Row("classifier/bias", "classifier.bias", (num_classes,))]
  if head == "mlm":
    mlm = "cls.predictions"
    rows += [Row("transform/kernel", f"{mlm}.transform.dense.weight", (D, D), _transpose),
             Row("transform/bias", f"{mlm}.transform.dense.bias", (D,)),
             Row("transform_norm/scale", f"{mlm}.transform.LayerNorm.weight", (D,)),
             Row("transform_norm/bias", f"{mlm}.transform.LayerNorm.bias", (D,)),
             Row("output_bias", f"{mlm}.bias", (cfg.vocab_size,))]
  return rows


def _t5_attention(ours: str, hf: str, cfg: TransformerConfig) -> list[Row]:
  D, N, H, _ = _dims(cfg)
  return [Row(f"{ours}/{name}/kernel", f"{hf}.{short}.weight", (N * H, D),
              functools.partial(_to_heads, n=N, h=H))
          for name, short in (("query", "q"), ("key", "k"), ("value", "v"))] + [
              Row(f"{ours}/out/kernel", f"{hf}.o.weight", (D, N * H),
                  functools.partial(_from_heads, n=N, h=H))]


def _t5_mlp(ours: str, hf: str, cfg: TransformerConfig) -> list[Row]:
  D, _, _, F = _dims(cfg)
  inputs = ("wi_0", "wi_1") if cfg.gated_ffn else ("wi",)
  return [Row(f"{ours}/{name}/kernel", f"{hf}.{name}.weight", (F, D), _transpose)
          for name in inputs] + [Row(f"{ours}/wo/kernel", f"{hf}.wo.weight", (D, F), _transpose)]


def _t5_table(cfg: TransformerConfig, tensors: dict, **no_heads) -> list[Row]:
  del tensors, no_heads
  D, N, _, _ = _dims(cfg)
  rows = [Row("token_embed/embedding", "shared.weight", (cfg.vocab_size, D))]
  if not cfg.tie_output:
    rows.append(Row("decoder/logits_dense/kernel", "lm_head.weight", (cfg.vocab_size, D),
                    _transpose))
  for side in ("encoder", "decoder"):
    bias = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    rows += [Row(f"{side}/relative_bias/rel_embedding", bias, (cfg.relative_buckets, N)),
             Row(f"{side}/final_norm/scale", f"{side}.final_layer_norm.weight", (D,))]
    num_layers = cfg.num_layers if side == "encoder" else cfg.num_decoder_layers or cfg.num_layers
    for i in range(num_layers):
      ours, hf = f"{side}/layers_{i}", f"{side}.block.{i}.layer"
      blocks = [("self_attention", "SelfAttention")]
      if side == "decoder":
        blocks.append(("cross_attention", "EncDecAttention"))
      for k, (name, hf_name) in enumerate(blocks):
        rows += _t5_attention(f"{ours}/{name}", f"{hf}.{k}.{hf_name}", cfg)
        rows.append(Row(f"{ours}/{name}_norm/scale", f"{hf}.{k}.layer_norm.weight", (D,)))
      k = len(blocks)
      rows += _t5_mlp(f"{ours}/mlp", f"{hf}.{k}.DenseReluDense", cfg)
      rows.append(Row(f"{ours}/mlp_norm/scale", f"{hf}.{k}.layer_norm.weight", (D,)))
  return rows


@dataclasses.dataclass(frozen=True)
class _Family:
  config: Callable[[dict, dict], TransformerConfig]
  table: Callable[..., list[Row]]
  prefix: str                   # The base model's prefix inside *For* checkpoints.
  tied_copies: dict[str, str]   # HF name -> the tensor it is tied to (and must equal).
  unused: str                   # Regex of tensors known not to be parameters here (buffers, heads).


FAMILIES = {
    "gpt2": _Family(_gpt2_config, _gpt2_table, "transformer.",
                    {"lm_head.weight": "wte.weight"}, r"h\.\d+\.attn\.(bias|masked_bias)"),
    "bert": _Family(_bert_config, _bert_table, "bert.",
                    {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
                     "cls.predictions.decoder.bias": "cls.predictions.bias"},
                    r"embeddings\.position_ids|pooler\..*|cls\..*|classifier\..*"),
    "t5": _Family(_t5_config, _t5_table, "",
                  {"encoder.embed_tokens.weight": "shared.weight",
                   "decoder.embed_tokens.weight": "shared.weight"},
                  r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"),
}


# ------------------------------------------------------------------------------------------
# Reading a folder.


def read_config(path: str) -> dict:
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


def hf_config(path: str, **overrides) -> TransformerConfig:
  """The TransformerConfig of a checkpoint folder (its tensors decide whether logits are tied)."""
  hf = read_config(path)
  family = FAMILIES[hf["model_type"]]
  return _with_overrides(family.config(hf, _normalised(_read_tensors(path), family)), overrides)


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
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(file)
  except TypeError:  # numpy knows no bfloat16: read the raw buffers with ml_dtypes' type.
    return _read_safetensors_raw(file)
  except (SafetensorError, OSError) as e:
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
  state = torch.load(file, map_location="cpu", weights_only=True)
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _normalised(tensors: dict, family: _Family) -> dict[str, np.ndarray]:
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
  return {"gpt2": DecoderOnly, "bert": EncoderOnly, "t5": EncoderDecoder}[family](cfg)


def _init_args(module: nn.Module):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return (tokens, tokens) if isinstance(module, EncoderDecoder) else (tokens,)


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")


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


def _describe(names, limit: int = 8) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


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
                          f"{where}: {_describe(missing)}. Is config.json the one saved with "
                          "these weights, and does the checkpoint hold the requested head?")
  if misshapen:
    raise PretrainedError(f"{len(misshapen)} tensors in {where} do not have the shape that "
                          f"config.json implies: {_describe(misshapen)}. Is config.json the one "
                          "saved with these weights?")
  return params, fresh


def _check_unused(rows: list[Row], tensors: dict, family: _Family, path: str) -> None:
  used = {row.hf for row in rows}
  unused = set(tensors) - used
  ties = {n for n in unused if family.tied_copies.get(n) in used}
  differ = sorted(n for n in ties if not np.array_equal(tensors[n], tensors[family.tied_copies[n]]))
  if differ:
    raise PretrainedError(f"{path}: {differ} differ from the tensors they are tied to "
                          f"({[family.tied_copies[n] for n in differ]}); this model shares them.")
  ignored = {n for n in unused - ties if re.fullmatch(family.unused, n)}
  unexpected = unused - ignored - ties
  if unexpected:
    raise PretrainedError(
        f"{path} holds {len(unexpected)} tensors that the import does not use: "
        f"{_describe(unexpected)}. Is it another architecture than config.json says?")
  heads = sorted(n for n in ignored if not re.search(r"position_ids|attn\.(masked_)?bias", n))
  if heads:
    logging.info("from_hf %s: not imported (a head this module does not have): %s", path,
                 _describe(heads))


def from_hf(path: str, *, head: str | None = None, num_classes: int | None = None,
            pooling: str = "cls", rng=0, **overrides) -> tuple[nn.Module, dict]:
  """(module, params) of the Hugging Face checkpoint in the local folder `path`.

  Args:
    path: a folder with config.json and model.safetensors (model_type gpt2, bert or t5).
    head: bert only. None: EncoderOnly (hidden states); "classifier": EncoderClassifier with
      BERT's pooler restored (pooling "cls"; freshly initialised if the file has none) and the
      classifier restored if the file has one of `num_classes` outputs, else freshly
      initialised from `rng`; "mlm": EncoderMaskedLM with the file's `cls.predictions` head.
    num_classes: outputs of the classifier head.
    pooling: EncoderClassifier's pooling, "cls" (BERT's pooler) or "mean" (no pooler).
    rng: a PRNG key or int seed for freshly initialised parameters.
    **overrides: TransformerConfig fields that do not change shapes (see OVERRIDABLE), e.g.
      dtype="bfloat16", dropout_rate=0.0, scan_layers=True.

  Returns:
    The module and its params: a nested dict of numpy arrays in param_dtype, laid out as
    `module.init` lays it out (also under scan_layers); `module.cfg` is the config.
  """
  hf = read_config(path)
  family = FAMILIES[hf["model_type"]]
  tensors = _normalised(_read_tensors(path), family)
  for copy, original in family.tied_copies.items():  # A tie stored under the copy's name only.
    if copy in tensors and original not in tensors:
      tensors[original] = tensors.pop(copy)
  cfg = _with_overrides(family.config(hf, tensors), overrides)
  module = _make_module(hf["model_type"], cfg, head, num_classes, pooling)
  rows = family.table(cfg, tensors, head=head, num_classes=num_classes, pooling=pooling)
  params, fresh = _fill(rows, tensors, path, hf)
  _check_unused(rows, tensors, family, path)
  if cfg.scan_layers:
    params = _stack_layers(params)

  rng = jax.random.key(rng) if isinstance(rng, int) else rng
  expected = _flat(jax.eval_shape(module.init, rng, *_init_args(module))["params"])
  wrong = {p for p in params if p not in expected or params[p].shape != expected[p].shape}
  if wrong:
    raise AssertionError(f"from_hf's {hf['model_type']} table disagrees with the module: "
                         f"{_describe(wrong)}")  # A bug in the table, not in the input.
  new = sorted(set(expected) - set(params))
  if new:
    logging.info("from_hf %s: freshly initialised: %s (absent from the file: %s)", path,
                 _describe(new), _describe(fresh) or "none")
    initial = _flat(jax.jit(module.init)(rng, *_init_args(module))["params"])
    params.update({p: np.asarray(initial[p]) for p in new})
  dtype = cfg.params_dtype
  params = {p: x.astype(dtype) for p, x in params.items()}
  return module, flax.traverse_util.unflatten_dict(params, sep="/")


# ------------------------------------------------------------------------------------------
# Export.


# Switches that make a DecoderOnly a GPT-2 (sizes, epsilon, activation and tying may vary).
_GPT2_FIXED = ("position", "norm", "norm_use_bias", "pre_norm", "embedding_norm", "gated_ffn",
               "use_bias", "attention_scale", "scale_embeddings", "scale_tied_logits",
               "num_token_types")


def to_hf_gpt2(params: dict, cfg: TransformerConfig, path: str) -> None:
  """Writes DecoderOnly GPT-2 params as a Hugging Face folder (config.json, model.safetensors).

  The config must be GPT-2's shape (presets.gpt2 switches, unrolled or scanned layers);
  transformers' GPT2LMHeadModel.from_pretrained(path) then computes the same logits.
  """
  from safetensors.numpy import save_file
  gpt2 = presets.gpt2()
  differ = [f for f in _GPT2_FIXED if getattr(cfg, f) != getattr(gpt2, f)]
  if cfg.head_size * cfg.num_heads != cfg.d_model or cfg.num_kv_heads not in (None, cfg.num_heads):
    differ.append("head_dim/num_kv_heads")
  if differ:
    raise PretrainedError(f"to_hf_gpt2 needs GPT-2's architecture (presets.gpt2); this config "
                          f"differs in {differ}.")
  flat = {p: np.asarray(x, np.float32) for p, x in _flat(params).items()}
  if cfg.scan_layers:
    flat = _unstack_layers(flat)
  tensors = {}
  for row in _gpt2_table(cfg, {}):  # The inverse of each row; q|k|v parts concatenated.
    x = flat[row.ours]
    x = x.T if row.convert is _transpose else x.reshape(*row.hf_shape[:-1], -1)
    tensors.setdefault(row.hf, []).append(x)
  tensors = {name: np.ascontiguousarray(np.concatenate(parts, axis=-1))
             for name, parts in tensors.items()}
  activation = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
  hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads, "n_inner": cfg.d_ff, "activation_function": activation[cfg.activation],
        "layer_norm_epsilon": cfg.norm_epsilon, "resid_pdrop": cfg.dropout_rate,
        "embd_pdrop": cfg.dropout_rate, "attn_pdrop": cfg.attention_dropout_rate,
        "tie_word_embeddings": cfg.tie_output}
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
