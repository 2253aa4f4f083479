"""Export to a local Hugging Face folder: models/pretrained.py's import, run backwards.

  to_hf(module, params, folder)   # DecoderOnly -> gpt2, llama, mistral, qwen2 or gemma;
                                  # EncoderDecoder -> t5; EncoderOnly -> bert (BertModel);
                                  # EncoderClassifier -> BertForSequenceClassification;
                                  # EncoderMaskedLM -> BertForMaskedLM
  to_hf(cfg, params, folder, head="mlm")   # a TransformerConfig and from_hf's head

writes config.json and model.safetensors (in the params' dtype): transformers'
`AutoModel*.from_pretrained(folder)` computes the module's outputs, and `from_hf(folder,
head=...)` reads back the same params. The family is the one the config's switches name (or
`model_type`). Its config.json is checked by importing it again: a model that the family's
Hugging Face class cannot compute (a switch the class lacks) is a PretrainedError naming the
fields. The tensors come from the import's own tables (models/pretrained_tables.py): each row's
conversion is a rearrangement, applied to an array of indices to learn where each of our
elements came from, and each element is put back there.

Every tensor the import reads is written back, so transformers initialises nothing anew:
  gpt2      all weights (lm_head.weight only when untied: else transformers ties it to wte)
  bert      embeddings, layers and the pooler: BertModel's is carried in an EncoderOnly's params
            at "pooler/" (from_hf puts it there; an EncoderOnly without one is a BertModel with a
            fresh pooler), BertForSequenceClassification's is the classifier's own; the mlm
            head's cls.predictions (its decoder tied to the word embeddings)
  t5        all weights (encoder/decoder.embed_tokens are ties of shared)
  llama, mistral, qwen2, gemma   all weights (lm_head.weight only when untied)
What the import does not read is no weight of the exported class: buffers (gpt2's attn.bias,
bert's position_ids, rotary inv_freq), heads of other tasks (bert's cls.seq_relationship, or a
classifier under head=None), and T5's unused cross-attention relative_attention_bias.
"""

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from models import paths
from models.config import TransformerConfig
from models.pretrained import _flat, _init_args, _unstack_layers
from models.pretrained_tables import FAMILIES, PretrainedError, Row, ffn_bias, qkv_bias
from models.transformer import (DecoderOnly, EncoderClassifier, EncoderDecoder, EncoderMaskedLM,
                                EncoderOnly)

ARCHITECTURES = {
    ("gpt2", None): "GPT2LMHeadModel", ("bert", None): "BertModel",
    ("bert", "classifier"): "BertForSequenceClassification", ("bert", "mlm"): "BertForMaskedLM",
    ("t5", None): "T5ForConditionalGeneration", ("llama", None): "LlamaForCausalLM",
    ("mistral", None): "MistralForCausalLM", ("qwen2", None): "Qwen2ForCausalLM",
    ("gemma", None): "GemmaForCausalLM"}
_MODULES = {"gpt2": (DecoderOnly,), "llama": (DecoderOnly,), "mistral": (DecoderOnly,),
            "qwen2": (DecoderOnly,), "gemma": (DecoderOnly,), "t5": (EncoderDecoder,),
            "bert": (EncoderOnly, EncoderClassifier, EncoderMaskedLM)}
_HEADS = {EncoderClassifier: "classifier", EncoderMaskedLM: "mlm"}
_MODEL_CLASSES = (DecoderOnly, EncoderDecoder, EncoderOnly, EncoderClassifier, EncoderMaskedLM)
_HEAD_TENSORS = re.compile(r"(lm_head|cls|classifier)\..*")  # Outside the base model's prefix.
# Fields that change no output of a trained model (written where a family has them, not compared).
_RUNTIME_FIELDS = ("dtype", "param_dtype", "logits_dtype", "scan_layers", "remat_policy",
                   "attention_implementation", "embedding_init_stddev", "dropout_rate",
                   "attention_dropout_rate", "ffn_dropout_rate")
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


def to_hf(model: nn.Module | TransformerConfig, params, folder: str, *, head: str | None = None,
          model_type: str | None = None, extra_config: dict | None = None) -> dict:
  """Writes `params` as a Hugging Face folder (config.json, model.safetensors); returns the
  config.json it wrote.

  Args:
    model: the module the params are for, or its TransformerConfig; then `head` names the
      module as from_hf's does: "classifier", "mlm", or None (DecoderOnly, EncoderOnly or
      EncoderDecoder, as the params' top-level names say).
    params: laid out as module.init lays them out (unrolled or scanned layers; after LoRA,
      merged), host or device arrays.
    folder: created if missing; its config.json and model.safetensors are replaced.
    model_type: the family to write; by default the one the switches name (default_model_type).
    extra_config: more config.json fields, such as the tokenizer's pad_token_id, bos_token_id
      and eos_token_id (t5: decoder_start_token_id).
  """
  if not isinstance(model, (*_MODEL_CLASSES, TransformerConfig)):
    names = ", ".join(c.__name__ for c in _MODEL_CLASSES)
    raise TypeError(f"to_hf takes the module the params are for ({names}) or its "
                    f"TransformerConfig, not {type(model).__name__}.")
  if not isinstance(params, Mapping):
    raise TypeError(f"to_hf takes the params as a nested dict (as module.init returns them), not "
                    f"{type(params).__name__}.")
  module = _module(model, params, head)
  model_type = model_type or default_model_type(module)
  head = _HEADS.get(type(module))
  if model_type not in _MODULES or not isinstance(module, _MODULES[model_type]):
    kinds = sorted(t for t, modules in _MODULES.items() if isinstance(module, modules))
    raise PretrainedError(f"model_type={model_type!r} cannot hold a {type(module).__name__}; "
                          f"choose from {kinds}.")
  if isinstance(module, EncoderClassifier) and module.pooling != "cls":
    raise PretrainedError(
        f"A classifier with pooling={module.pooling!r} has no Hugging Face class: "
        "BertForSequenceClassification classifies the first token through BERT's pooler; train "
        "with model.pooling='cls' to export a classifier.")
  carried = {row.ours: _origins(row).shape for row in _rows(module, {"model_type": model_type})
             if row.optional}
  module, flat = _without_vocab_padding(module, _checked_params(module, params, carried))
  hf = {"model_type": model_type, "architectures": [ARCHITECTURES[model_type, head]],
        **_CONFIGS[model_type](module.cfg, module)}
  _check_expressible(module, hf)
  clash = sorted(set(extra_config or {}) & set(hf))
  if clash:
    raise PretrainedError(f"extra_config sets {clash}, which the export derives from the model.")
  hf.update(extra_config or {})
  tensors = hf_tensors([row for row in _rows(module, hf) if row.ours in flat or not row.optional],
                       flat)
  prefix = "" if head is None and model_type == "bert" else FAMILIES[model_type].prefix
  tensors = {(name if _HEAD_TENSORS.fullmatch(name) else prefix + name): x
             for name, x in tensors.items()}
  os.makedirs(folder, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(folder, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2)
  return hf


def default_model_type(module: nn.Module) -> str:
  """The family a module's switches name: t5 for an EncoderDecoder, bert for an encoder; a
  DecoderOnly is gpt2 (learned positions), gemma (embeddings scaled by √d, or norms by 1 +
  scale), mistral (a sliding window), qwen2 (biases on query, key and value only) or llama."""
  if isinstance(module, EncoderDecoder):
    return "t5"
  if not isinstance(module, DecoderOnly):
    return "bert"
  cfg = module.cfg
  if cfg.position != "rope":
    return "gpt2"
  if cfg.norm_scale_plus_one or cfg.scale_embeddings:
    return "gemma"
  if cfg.sliding_window is not None:
    return "mistral"
  return "qwen2" if qkv_bias(cfg) and not cfg.use_bias else "llama"


def hf_tensors(rows: list[Row], flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{Hugging Face name: tensor} that the rows read `flat` ({our path: array}) from.

  Every element of every tensor is put back from the one param the row's conversion moved it
  to; a conversion that computes rather than moves is an AssertionError (it needs an inverse of
  its own), as are a param no row reads and a tensor element no row or two rows fill.
  """
  unread = set(flat) - {row.ours for row in rows}
  if unread:
    raise AssertionError(f"No table row reads {paths.listing(unread)}.")  # A bug in the table.
  tensors, counts = {}, {}
  for row in rows:
    size = math.prod(row.hf_shape)
    where = _origins(row)
    x = np.asarray(flat[row.ours])
    if where.shape != x.shape:
      raise AssertionError(f"{row.hf} -> {row.ours}: the table makes {where.shape}, the param "
                           f"is {x.shape}.")
    tensors.setdefault(row.hf, np.zeros(size, x.dtype))[where.ravel()] = x.ravel()
    counts[row.hf] = counts.get(row.hf, 0) + np.bincount(where.ravel(), minlength=size)
  wrong = sorted(name for name, count in counts.items() if not (count == 1).all())
  if wrong:
    raise AssertionError(f"The rows do not fill each element of {wrong} exactly once.")
  shapes = {row.hf: row.hf_shape for row in rows}
  return {name: x.reshape(shapes[name]) for name, x in tensors.items()}


def _origins(row: Row) -> np.ndarray:
  """For each element of our param, its flat index in the Hugging Face tensor."""
  size = math.prod(row.hf_shape)
  index = np.arange(size).reshape(row.hf_shape)
  where, shifted = (np.asarray(row.convert(i)) for i in (index, index + size))
  if (where.dtype.kind not in "iu" or not np.array_equal(shifted, where + size)
      or where.size and (where.min() < 0 or where.max() >= size)):
    raise AssertionError(f"{row.hf} -> {row.ours}: the conversion is not a rearrangement; it "
                         "needs an inverse of its own.")
  return where


# ------------------------------------------------------------------------------------------
# The module and its params.


def _module(model, params, head: str | None) -> nn.Module:
  if isinstance(model, nn.Module):
    if head is not None and head != _HEADS.get(type(model)):
      raise PretrainedError(f"head={head!r} does not name a {type(model).__name__}; leave it "
                            "out when passing a module.")
    return model
  if head == "classifier":
    if "classifier" not in params:
      raise PretrainedError("head='classifier' needs params with a classifier.")
    num_classes = int(params["classifier"]["kernel"].shape[-1])
    return EncoderClassifier(model, num_classes, "cls" if "pooler" in params else "mean")
  if head == "mlm":
    return EncoderMaskedLM(model)
  if head is not None:
    raise PretrainedError(f"Unknown head {head!r}: use None, 'classifier' or 'mlm'.")
  stacks = tuple(sorted({"encoder", "decoder"} & set(params)))
  modules = {("decoder",): DecoderOnly, ("encoder",): EncoderOnly,
             ("decoder", "encoder"): EncoderDecoder}
  if stacks not in modules:
    raise PretrainedError(f"params with top-level names {sorted(params)} are none of "
                          "DecoderOnly's, EncoderOnly's or EncoderDecoder's.")
  return modules[stacks](model)


def _checked_params(module: nn.Module, params, carried: dict[str, tuple]
                    ) -> dict[str, np.ndarray]:
  """{our path: host array}, layers unrolled, after checking that they fit the module; params
  the module does not take but the file has a place for (`carried`: BertModel's pooler) are
  kept, all of them or none."""
  expected = {p: x.shape for p, x in _flat(jax.eval_shape(
      module.init, jax.random.key(0), *_init_args(module))["params"]).items()}
  flat = _flat(params)
  carried = {p: shape for p, shape in carried.items() if p not in expected}
  if carried.keys() & flat.keys():
    expected.update(carried)
  missing, unexpected = set(expected) - set(flat), set(flat) - set(expected)
  problems = ([f"missing {paths.listing(missing)}"] if missing else []) + (
      [f"unexpected {paths.listing(unexpected)}"] if unexpected else []) + [
          f"{p} {tuple(x.shape)} (expected {expected[p]})" for p, x in flat.items()
          if p in expected and tuple(x.shape) != tuple(expected[p])]
  if problems:
    raise PretrainedError(f"The params do not fit the {type(module).__name__} of this config: "
                          f"{'; '.join(problems)}.")
  flat = {p: np.asarray(x) for p, x in flat.items()}
  return _unstack_layers(flat) if module.cfg.scan_layers else flat


def _without_vocab_padding(module: nn.Module, flat: dict) -> tuple[nn.Module, dict]:
  """A module with vocab_pad_multiple > 1 as its unpadded twin: the token tables and the
  logits layer cut back to vocab_size (the padded rows reach no output). Those params sit
  outside the layer stack, so `flat` (layers unrolled) and the twin's paths meet there."""
  if module.cfg.vocab_pad_multiple == 1:
    return module, flat
  module = module.clone(cfg=module.cfg.replace(vocab_pad_multiple=1))
  expected = _flat(jax.eval_shape(module.init, jax.random.key(0), *_init_args(module))["params"])
  cut = lambda p, x: x[tuple(slice(0, n) for n in expected[p].shape)] if p in expected else x
  return module, {p: cut(p, x) for p, x in flat.items()}


def _rows(module: nn.Module, hf: dict) -> list[Row]:
  cfg, num_classes = module.cfg, getattr(module, "num_classes", None)
  # The BERT table restores a classifier from a file holding one of its shape: a stand-in.
  tensors = ({} if num_classes is None else
             {"classifier.weight": np.broadcast_to(np.float32(0), (num_classes, cfg.d_model))})
  return FAMILIES[hf["model_type"]].table(cfg, hf, tensors, head=_HEADS.get(type(module)),
                                          num_classes=num_classes,
                                          pooling=getattr(module, "pooling", "cls"))


# ------------------------------------------------------------------------------------------
# config.json: each family's config mapping (models/pretrained_tables.py), inverted.


def _gpt2_config(cfg: TransformerConfig, module: nn.Module) -> dict:
  del module
  return {"vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
          "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
          "activation_function": _ACTIVATIONS[cfg.activation],
          "layer_norm_epsilon": cfg.norm_epsilon, "resid_pdrop": cfg.dropout_rate,
          "embd_pdrop": cfg.dropout_rate, "attn_pdrop": cfg.attention_dropout_rate,
          "tie_word_embeddings": cfg.tie_output}


def _bert_config(cfg: TransformerConfig, module: nn.Module) -> dict:
  if cfg.num_token_types < 1:
    raise PretrainedError("A BERT checkpoint has token-type embeddings (type_vocab_size >= 1); "
                          "this model has none (num_token_types=0).")
  hf = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
        "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.num_token_types, "layer_norm_eps": cfg.norm_epsilon,
        "hidden_act": _ACTIVATIONS[cfg.activation], "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "position_embedding_type": "absolute"}
  if isinstance(module, EncoderClassifier):
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(module.num_classes)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(module.num_classes)}
  return hf


def _t5_config(cfg: TransformerConfig, module: nn.Module) -> dict:
  del module
  act = _ACTIVATIONS[cfg.activation]
  proj = ("gated-gelu" if act == "gelu_new" else f"gated-{act}") if cfg.gated_ffn else act
  return {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim,
          "d_ff": cfg.d_ff, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
          "num_decoder_layers": cfg.num_decoder_layers or cfg.num_layers,
          "relative_attention_num_buckets": cfg.relative_buckets,
          "relative_attention_max_distance": cfg.relative_max_distance,
          "layer_norm_epsilon": cfg.norm_epsilon, "feed_forward_proj": proj,
          "dropout_rate": cfg.dropout_rate, "is_encoder_decoder": True,
          # transformers < 5 scales the outputs of tied models; >= 5 reads scale_decoder_outputs.
          "tie_word_embeddings": cfg.tie_output,
          "scale_decoder_outputs": cfg.tie_output and cfg.scale_tied_logits}


def _decoder_config(cfg: TransformerConfig, module: nn.Module, model_type: str) -> dict:
  """LLaMA, Mistral, Qwen2, Gemma: the RoPE settings as transformers < 5 (rope_theta,
  rope_scaling) and >= 5 (rope_parameters) read them."""
  del module
  scaling = None
  if cfg.rope_llama3_factor is not None:
    scaling = {"rope_type": "llama3", "factor": cfg.rope_llama3_factor,
               "low_freq_factor": cfg.rope_llama3_low_freq_factor,
               "high_freq_factor": cfg.rope_llama3_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_llama3_original_max_len}
  act = "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else _ACTIVATIONS[cfg.activation]
  hf = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_epsilon,
        "hidden_act": act, "attention_dropout": cfg.attention_dropout_rate,
        "tie_word_embeddings": cfg.tie_output, "rope_theta": cfg.rope_max_wavelength,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_max_wavelength,
                            **(scaling or {})}}
  if model_type == "llama":
    hf.update(attention_bias=cfg.use_bias, mlp_bias=ffn_bias(cfg))
  elif model_type == "mistral":
    hf.update(sliding_window=cfg.sliding_window)
  elif model_type == "qwen2":
    hf.update(use_sliding_window=False)
  else:  # gemma
    hf.update(hidden_activation=act, attention_bias=cfg.use_bias)
  return hf


_CONFIGS = {"gpt2": _gpt2_config, "bert": _bert_config, "t5": _t5_config,
            **{name: (lambda cfg, module, name=name: _decoder_config(cfg, module, name))
               for name in ("llama", "mistral", "qwen2", "gemma")}}


def _check_expressible(module: nn.Module, hf: dict) -> None:
  """The config.json, imported again, computes what the module computes."""
  model_type, architecture = hf["model_type"], hf["architectures"][0]
  try:
    imported = FAMILIES[model_type].config(hf, {})
  except ValueError as e:
    raise PretrainedError(f"This model cannot be written as a {model_type} checkpoint: {e}") from e
  ours, theirs = _resolved(module.cfg), _resolved(imported)
  differ = [f"{name}={ours[name]!r} ({architecture} has {theirs[name]!r})"
            for name in sorted(set(ours) - _unused(module.cfg, module))
            if ours[name] != theirs[name]]
  if differ:
    raise PretrainedError(f"This {type(module).__name__} cannot be written as a {model_type} "
                          f"checkpoint: it differs from {architecture} in {'; '.join(differ)}.")


def _resolved(cfg: TransformerConfig) -> dict:
  """The fields of `cfg` that decide outputs, with the defaults that stand for others resolved."""
  values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in _RUNTIME_FIELDS}
  values.update(num_kv_heads=cfg.num_kv_heads or cfg.num_heads, qkv_bias=qkv_bias(cfg),
                ffn_bias=ffn_bias(cfg), num_decoder_layers=cfg.num_decoder_layers or
                cfg.num_layers, scale_tied_logits=cfg.tie_output and cfg.scale_tied_logits)
  return values


def _unused(cfg: TransformerConfig, module: nn.Module) -> set[str]:
  """The fields that `module` with `cfg` does not read."""
  unused = set()
  if cfg.position != "learned":
    unused.add("max_len")
  if cfg.position != "rope" or cfg.rope_llama3_factor is None:
    unused |= {"rope_llama3_factor", "rope_llama3_low_freq_factor",
               "rope_llama3_high_freq_factor", "rope_llama3_original_max_len"}
  if cfg.position != "rope":
    unused.add("rope_max_wavelength")
  if cfg.position != "relative":
    unused |= {"relative_buckets", "relative_max_distance"}
  if not isinstance(module, EncoderDecoder):
    unused |= {"num_decoder_layers", "share_embeddings"}
  if not isinstance(module, (DecoderOnly, EncoderDecoder)):
    unused |= {"tie_output", "scale_tied_logits"}
  return unused
