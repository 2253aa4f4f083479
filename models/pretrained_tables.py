"""What maps to what between Hugging Face checkpoints and our models (used by pretrained.py).

For each family (gpt2, bert, t5, and the LLaMA-style llama, mistral, qwen2, gemma):
config.json -> TransformerConfig (through models/presets.py, with the defaults of transformers'
config classes for fields a config.json leaves out), and a table of rows `our param path <- HF
tensor name`, each with the tensor's expected shape and a conversion (transpose of torch's
Linear [out, in], split into heads, GPT-2's fused Conv1D `c_attn`).
"""

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from models import presets
from models.errors import InputError
from models.config import TransformerConfig

# Hugging Face activation names (transformers.activations.ACT2FN) -> ours.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "silu": "silu",
               "swish": "silu"}


class PretrainedError(InputError):
  """A checkpoint folder cannot be imported: missing, unsupported or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One parameter: `ours` (a '/' path) <- `convert(file[hf])`; `hf_shape` is checked first."""
  ours: str
  hf: str
  hf_shape: tuple[int, ...]
  convert: Callable[[np.ndarray], np.ndarray] = lambda x: x
  # Missing from the file: freshly initialised (logged), not an error. A param the module does
  # not take (BertModel's pooler, for an EncoderOnly) is carried in its params for the export.
  optional: bool = False


# ------------------------------------------------------------------------------------------
# Conversions. torch's Linear stores [out, in]; GPT-2's Conv1D stores [in, out].


def transpose(w):
  return w.T


def _to_heads(w, n, h):
  """Linear [N*H, D] -> kernel [D, N, H] (query, key, value)."""
  return w.T.reshape(-1, n, h)


def _from_heads(w, n, h):
  """Linear [D, N*H] -> kernel [N, H, D] (attention output)."""
  return w.T.reshape(n, h, -1)


def _bias_heads(b, n, h):
  """Linear bias [N*H] -> [N, H]."""
  return b.reshape(n, h)


def _fused_part(x, i, n, h):
  """Part i of GPT-2's fused q|k|v: Conv1D [D, 3*N*H] -> [D, N, H], its bias -> [N, H]."""
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
      "layer_norm_epsilon": ("norm_epsilon", float),
      "activation_function": ("activation", _activation), "resid_pdrop": ("dropout_rate", float),
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


# The LLaMA-style decoders. Defaults of transformers' LlamaConfig, MistralConfig, Qwen2Config
# and GemmaConfig, for the fields a config.json may leave out.
_DECODER_DEFAULTS = {
    "llama": {"vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 11_008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
              "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "mistral": {"vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 14_336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "hidden_act": "silu", "max_position_embeddings": 131_072,
                "tie_word_embeddings": False, "sliding_window": 4096},
    "qwen2": {"vocab_size": 151_936, "hidden_size": 4096, "intermediate_size": 22_016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "hidden_act": "silu", "max_position_embeddings": 32_768,
              "tie_word_embeddings": False},
    "gemma": {"vocab_size": 256_000, "hidden_size": 3072, "intermediate_size": 24_576,
              "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
              "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
              "max_position_embeddings": 8192, "tie_word_embeddings": True},
}


def _rope(hf: dict) -> dict:
  """RoPE fields from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise PretrainedError("config.json sets a partial_rotary_factor; from_hf supports only RoPE "
                          "over the whole head.")
  fields = {"rope_max_wavelength": float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))}
  if kind == "llama3":
    fields.update(rope_llama3_factor=float(rope["factor"]),
                  rope_llama3_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_llama3_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_llama3_original_max_len=int(rope.get(
                      "original_max_position_embeddings", hf["max_position_embeddings"])))
  elif kind != "default":
    raise PretrainedError(f"config.json sets the RoPE type {kind!r}; from_hf supports 'default' "
                          "and 'llama3'.")
  return fields


def _decoder_config(hf: dict, tensors: dict) -> TransformerConfig:
  """LLaMA, Mistral, Qwen2 and Gemma: the LLaMA switches (presets.llama) and each one's own."""
  model_type = hf["model_type"]
  hf = {**_DECODER_DEFAULTS[model_type], **hf}
  heads = int(hf["num_attention_heads"])
  kv_heads = int(hf.get("num_key_value_heads") or heads)
  fields = {
      "vocab_size": int(hf["vocab_size"]), "d_model": int(hf["hidden_size"]),
      "num_heads": heads, "num_kv_heads": None if kv_heads == heads else kv_heads,
      "head_dim": int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
      "d_ff": int(hf["intermediate_size"]), "num_layers": int(hf["num_hidden_layers"]),
      "max_len": int(hf["max_position_embeddings"]),
      "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
      "attention_dropout_rate": float(hf.get("attention_dropout", 0.0)),
      "tie_output": _tied(hf, tensors, "lm_head.weight", "embed_tokens.weight"), **_rope(hf)}
  act = hf.get("hidden_activation") or hf["hidden_act"]
  attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
  biases = {"use_bias": attention_bias,
            "ffn_bias": None if mlp_bias == attention_bias else mlp_bias}
  if model_type == "gemma":  # As GemmaConfig: its legacy "gelu" means the tanh approximation.
    if hf.get("use_bidirectional_attention"):
      raise PretrainedError("config.json sets use_bidirectional_attention=True; from_hf supports "
                            "only causal Gemma models.")
    return presets.gemma(**fields, **biases, activation=_activation(
        "gelu_pytorch_tanh" if act == "gelu" else act))
  if model_type == "qwen2":
    layer_types = hf.get("layer_types") or ["full_attention"]
    if hf.get("use_sliding_window") or set(layer_types) != {"full_attention"}:
      raise PretrainedError("config.json sets use_sliding_window (or sliding_attention layers); "
                            "from_hf supports Qwen2 with full attention in every layer.")
    return presets.qwen2(**fields, activation=_activation(act), use_bias=False, qkv_bias=True)
  if model_type == "mistral":
    window = hf.get("sliding_window")
    return presets.mistral(**fields, activation=_activation(act),
                           sliding_window=None if window is None else int(window))
  return presets.llama(**fields, **biases, activation=_activation(act))


# ------------------------------------------------------------------------------------------
# Tables: our path <- HF name (after the base-model prefix is stripped).


def _dims(cfg: TransformerConfig):
  return cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff


def qkv_bias(cfg: TransformerConfig) -> bool:
  """Whether the query, key and value projections have biases (qkv_bias; None: use_bias)."""
  return cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias


def ffn_bias(cfg: TransformerConfig) -> bool:
  """Whether the feed-forward layers have biases (ffn_bias; None: use_bias)."""
  return cfg.use_bias if cfg.ffn_bias is None else cfg.ffn_bias


def gpt2_table(cfg: TransformerConfig, hf_config: dict, tensors: dict, **no_heads) -> list[Row]:
  del hf_config, tensors, no_heads
  D, N, H, F = _dims(cfg)
  rows = [Row("token_embed/embedding", "wte.weight", (cfg.vocab_size, D)),
          Row("decoder/embedder/position_embed/embedding", "wpe.weight", (cfg.max_len, D)),
          Row("decoder/final_norm/scale", "ln_f.weight", (D,)),
          Row("decoder/final_norm/bias", "ln_f.bias", (D,))]
  if not cfg.tie_output:
    rows.append(Row("decoder/logits_dense/kernel", "lm_head.weight", (cfg.vocab_size, D),
                    transpose))
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


def _bert_table(cfg: TransformerConfig, hf_config: dict, tensors: dict, *, head: str | None,
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
        Row(f"{ours}/mlp/wi/kernel", f"{hf}.intermediate.dense.weight", (F, D), transpose),
        Row(f"{ours}/mlp/wi/bias", f"{hf}.intermediate.dense.bias", (F,)),
        Row(f"{ours}/mlp/wo/kernel", f"{hf}.output.dense.weight", (D, F), transpose),
        Row(f"{ours}/mlp/wo/bias", f"{hf}.output.dense.bias", (D,)),
        Row(f"{ours}/mlp_norm/scale", f"{hf}.output.LayerNorm.weight", (D,)),
        Row(f"{ours}/mlp_norm/bias", f"{hf}.output.LayerNorm.bias", (D,))]
  if head is None or (head == "classifier" and pooling == "cls"):  # EncoderOnly: carried.
    rows += [Row("pooler/kernel", "pooler.dense.weight", (D, D), transpose, optional=True),
             Row("pooler/bias", "pooler.dense.bias", (D,), optional=True)]
  classifier = tensors.get("classifier.weight")
  same_task = ("BertForSequenceClassification" in hf_config.get("architectures", ())
               and classifier is not None and classifier.shape == (num_classes, D))
  if head == "classifier" and same_task:  # Else a new task: a fresh classifier.
    rows += [Row("classifier/kernel", "classifier.weight", (num_classes, D), transpose),
             Row("classifier/bias", "classifier.bias", (num_classes,))]
  if head == "mlm":
    mlm = "cls.predictions"
    rows += [Row("transform/kernel", f"{mlm}.transform.dense.weight", (D, D), transpose),
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
  return [Row(f"{ours}/{name}/kernel", f"{hf}.{name}.weight", (F, D), transpose)
          for name in inputs] + [Row(f"{ours}/wo/kernel", f"{hf}.wo.weight", (D, F), transpose)]


def _t5_table(cfg: TransformerConfig, hf_config: dict, tensors: dict, **no_heads) -> list[Row]:
  del hf_config, tensors, no_heads
  D, N, _, _ = _dims(cfg)
  rows = [Row("token_embed/embedding", "shared.weight", (cfg.vocab_size, D))]
  if not cfg.tie_output:
    rows.append(Row("decoder/logits_dense/kernel", "lm_head.weight", (cfg.vocab_size, D),
                    transpose))
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


def _decoder_table(cfg: TransformerConfig, hf_config: dict, tensors: dict,
                   **no_heads) -> list[Row]:
  """LLaMA, Mistral, Qwen2 and Gemma (LlamaModel's names; the biases the config has)."""
  del hf_config, tensors, no_heads
  D, N, H, F = _dims(cfg)
  K = cfg.num_kv_heads or N
  has_qkv_bias, has_ffn_bias = qkv_bias(cfg), ffn_bias(cfg)
  rows = [Row("token_embed/embedding", "embed_tokens.weight", (cfg.vocab_size, D)),
          Row("decoder/final_norm/scale", "norm.weight", (D,))]
  if not cfg.tie_output:
    rows.append(Row("decoder/logits_dense/kernel", "lm_head.weight", (cfg.vocab_size, D),
                    transpose))
  for i in range(cfg.num_layers):
    ours, hf = f"decoder/layers_{i}", f"layers.{i}"
    attention = f"{ours}/self_attention"
    for name, short, heads in (("query", "q", N), ("key", "k", K), ("value", "v", K)):
      rows.append(Row(f"{attention}/{name}/kernel", f"{hf}.self_attn.{short}_proj.weight",
                      (heads * H, D), functools.partial(_to_heads, n=heads, h=H)))
      if has_qkv_bias:
        rows.append(Row(f"{attention}/{name}/bias", f"{hf}.self_attn.{short}_proj.bias",
                        (heads * H,), functools.partial(_bias_heads, n=heads, h=H)))
    rows.append(Row(f"{attention}/out/kernel", f"{hf}.self_attn.o_proj.weight", (D, N * H),
                    functools.partial(_from_heads, n=N, h=H)))
    if cfg.use_bias:
      rows.append(Row(f"{attention}/out/bias", f"{hf}.self_attn.o_proj.bias", (D,)))
    for name, hf_name, shape in (("wi_0", "gate_proj", (F, D)), ("wi_1", "up_proj", (F, D)),
                                 ("wo", "down_proj", (D, F))):
      rows.append(Row(f"{ours}/mlp/{name}/kernel", f"{hf}.mlp.{hf_name}.weight", shape,
                      transpose))
      if has_ffn_bias:
        rows.append(Row(f"{ours}/mlp/{name}/bias", f"{hf}.mlp.{hf_name}.bias", shape[:1]))
    rows += [Row(f"{ours}/self_attention_norm/scale", f"{hf}.input_layernorm.weight", (D,)),
             Row(f"{ours}/mlp_norm/scale", f"{hf}.post_attention_layernorm.weight", (D,))]
  return rows


@dataclasses.dataclass(frozen=True)
class Family:
  config: Callable[[dict, dict], TransformerConfig]
  table: Callable[..., list[Row]]
  prefix: str                   # The base model's prefix inside *For* checkpoints.
  tied_copies: dict[str, str]   # HF name -> the tensor it is tied to (and must equal).
  unused: str                   # Regex of tensors known not to be parameters here (buffers, heads).


FAMILIES = {
    "gpt2": Family(_gpt2_config, gpt2_table, "transformer.",
                    {"lm_head.weight": "wte.weight"}, r"h\.\d+\.attn\.(bias|masked_bias)"),
    "bert": Family(_bert_config, _bert_table, "bert.",
                    {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
                     "cls.predictions.decoder.bias": "cls.predictions.bias"},
                    r"embeddings\.position_ids|pooler\..*|cls\..*|classifier\..*"),
    "t5": Family(_t5_config, _t5_table, "",
                  {"encoder.embed_tokens.weight": "shared.weight",
                   "decoder.embed_tokens.weight": "shared.weight"},
                  r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"),
    **{name: Family(_decoder_config, _decoder_table, "model.",
                    {"lm_head.weight": "embed_tokens.weight"},
                    r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
       for name in ("llama", "mistral", "qwen2", "gemma")},
}
