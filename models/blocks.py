"""Encoder and decoder layers built from their own fields, and the stacks the families run.

  EncoderLayer(num_heads=8, head_dim=64, d_ff=2048, ...)(x_BTD, *, mask=None, bias=None,
      segment_ids=None, positions=None, deterministic=True) -> x_BTD
  DecoderLayer(..., cross_attention=False)(x_BTD, *, encoded=None, mask=None, bias=None,
      cross_mask=None, segment_ids=None, encoded_segment_ids=None, positions=None,
      decode=False, deterministic=True) -> x_BTD

The layers drop into any Flax module; `layer_fields(cfg)` gives the fields a TransformerConfig
sets. `Encoder` and `Decoder` (embeddings, a stack of layers, final norm; the decoder's logits)
take a TransformerConfig and keep the stacking to themselves: unrolled `layers_{i}`, or one
`layers` under nn.scan (`scan_layers`), optionally rematerialised (`remat_policy`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.config import REMAT_POLICIES, TransformerConfig
from models.errors import InputError
from models.multi_head_attention import WEIGHTS_COLLECTION, MultiHeadAttention


class _Layer(nn.Module):
  """The fields and sublayers EncoderLayer and DecoderLayer share (d_model: the input width)."""
  num_heads: int = 8                    # query heads
  head_dim: int = 64
  num_kv_heads: int | None = None       # key/value heads (grouped-query); None = num_heads
  d_ff: int = 2048                      # hidden width of the feed-forward layer
  norm: str = "layernorm"               # layernorm | rmsnorm
  norm_epsilon: float = 1e-6
  norm_use_bias: bool = True
  norm_scale_plus_one: bool = False     # norms multiply by 1 + scale, scale starting at 0
  pre_norm: bool = True                 # pre-LN x + f(norm(x)), or post-LN norm(x + f(x))
  activation: str = "relu"              # relu | gelu | gelu_tanh | silu
  gated_ffn: bool = False               # GLU feed-forward: GEGLU (gelu), SwiGLU (silu)
  use_bias: bool = True                 # biases in attention and feed-forward projections
  qkv_bias: bool | None = None          # query/key/value biases; None = use_bias
  ffn_bias: bool | None = None          # feed-forward biases; None = use_bias
  attention_scale: float | None = None  # None = 1/sqrt(head_dim)
  rope_max_wavelength: float | None = None  # RoPE base of self-attention; None = no RoPE
  rope_llama3_scaling: tuple | None = None  # see layers.rope_frequencies; None = unscaled
  sliding_window: int | None = None     # self-attention: keys < W positions away
  dropout_rate: float = 0.0             # on each residual branch
  attention_dropout_rate: float = 0.0   # on attention weights
  ffn_dropout_rate: float = 0.0         # inside the feed-forward, after the activation
  attention_implementation: str | None = None  # see attention.dot_product_attention
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _attention(self, name: str) -> MultiHeadAttention:
    return MultiHeadAttention(
        num_heads=self.num_heads, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
        use_bias=self.use_bias, qkv_bias=self.qkv_bias, dropout_rate=self.attention_dropout_rate,
        scale=self.attention_scale, rope_max_wavelength=self.rope_max_wavelength,
        rope_llama3_scaling=self.rope_llama3_scaling,
        sliding_window=self.sliding_window if name == "self_attention" else None,
        implementation=self.attention_implementation, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)

  def _feed_forward(self, x_BTD, deterministic: bool):
    use_bias = self.use_bias if self.ffn_bias is None else self.ffn_bias
    return layers.FeedForward(self.d_ff, activation=self.activation, gated=self.gated_ffn,
                              use_bias=use_bias, dropout_rate=self.ffn_dropout_rate,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              name="mlp")(x_BTD, deterministic=deterministic)

  def _add_and_norm(self, name: str, x_BTD, branch, deterministic: bool):
    """A residual branch: pre-LN x + f(norm(x)), or post-LN norm(x + f(x)); dropout on f."""
    norm = layers.Norm(self.norm, epsilon=self.norm_epsilon, use_bias=self.norm_use_bias,
                       scale_plus_one=self.norm_scale_plus_one, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"{name}_norm")
    dropout = nn.Dropout(self.dropout_rate)
    if self.pre_norm:
      return x_BTD + dropout(branch(norm(x_BTD)), deterministic=deterministic)
    return norm(x_BTD + dropout(branch(x_BTD), deterministic=deterministic))


class EncoderLayer(_Layer):
  """Self-attention and feed-forward, each with add & norm.

  mask: [B, 1|N, T|1, T] True where a query may attend a key; bias: added to the attention
  logits (T5's relative positions); segment_ids [B, T] of packed rows (0: padding);
  positions [B, T] for RoPE (None: 0, 1, 2, ...).
  """

  @nn.compact
  def __call__(self, x_BTD, *, mask=None, bias=None, segment_ids=None, positions=None,
               deterministic: bool = True):
    attend = lambda h: self._attention("self_attention")(
        h, mask=mask, bias=bias, query_segment_ids=segment_ids, kv_segment_ids=segment_ids,
        positions=positions, deterministic=deterministic)
    x_BTD = self._add_and_norm("self_attention", x_BTD, attend, deterministic)
    mlp = lambda h: self._feed_forward(h, deterministic)
    return self._add_and_norm("mlp", x_BTD, mlp, deterministic)


class DecoderLayer(_Layer):
  """Causal self-attention, cross-attention to `encoded` (if cross_attention), feed-forward.

  mask and bias: of the self-attention, on top of the causal mask; cross_mask: [B, 1|N, T|1, S]
  over the encoded positions; encoded_segment_ids [B, S] pair with segment_ids [B, T].
  decode=True keeps keys and values in the "cache" collection (see MultiHeadAttention).
  """
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x_BTD, *, encoded=None, mask=None, bias=None, cross_mask=None,
               segment_ids=None, encoded_segment_ids=None, positions=None, decode: bool = False,
               deterministic: bool = True):
    if self.cross_attention != (encoded is not None):
      raise InputError("A DecoderLayer attends to `encoded` exactly when it has "
                       f"cross_attention (here {self.cross_attention}): pass the encoder's "
                       "output [B, S, D] with cross_attention=True, or neither.")
    attend = lambda h: self._attention("self_attention")(
        h, mask=mask, bias=bias, is_causal=not decode, query_segment_ids=segment_ids,
        kv_segment_ids=segment_ids, positions=positions, decode=decode,
        deterministic=deterministic)
    x_BTD = self._add_and_norm("self_attention", x_BTD, attend, deterministic)
    if self.cross_attention:
      cross = lambda h: self._attention("cross_attention")(
          h, encoded, mask=cross_mask, query_segment_ids=segment_ids,
          kv_segment_ids=encoded_segment_ids, decode=decode, deterministic=deterministic)
      x_BTD = self._add_and_norm("cross_attention", x_BTD, cross, deterministic)
    mlp = lambda h: self._feed_forward(h, deterministic)
    return self._add_and_norm("mlp", x_BTD, mlp, deterministic)


_SAME_NAMED_FIELDS = (
    "num_heads", "head_dim", "num_kv_heads", "d_ff", "norm", "norm_epsilon", "norm_use_bias",
    "norm_scale_plus_one", "pre_norm", "activation", "gated_ffn", "use_bias", "qkv_bias",
    "ffn_bias", "attention_scale", "sliding_window", "dropout_rate", "attention_dropout_rate",
    "ffn_dropout_rate", "attention_implementation", "dtype", "param_dtype")


def layer_fields(cfg: TransformerConfig) -> dict:
  """The fields of an EncoderLayer or DecoderLayer that `cfg` sets (all but cross_attention)."""
  rope = cfg.position == "rope"
  llama3 = (cfg.rope_llama3_factor, cfg.rope_llama3_low_freq_factor,
            cfg.rope_llama3_high_freq_factor, cfg.rope_llama3_original_max_len)
  return {**{name: getattr(cfg, name) for name in _SAME_NAMED_FIELDS},
          "rope_max_wavelength": cfg.rope_max_wavelength if rope else None,
          "rope_llama3_scaling": llama3 if rope and cfg.rope_llama3_factor is not None else None}


def norm_from_config(cfg: TransformerConfig, name: str) -> layers.Norm:
  """The Norm `cfg` describes (kind, epsilon, bias, scale), named `name`."""
  return layers.Norm(cfg.norm, epsilon=cfg.norm_epsilon, use_bias=cfg.norm_use_bias,
                     scale_plus_one=cfg.norm_scale_plus_one, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, name=name)


class _StackedEncoderLayer(EncoderLayer):
  """EncoderLayer called positionally, as nn.remat's static_argnums and nn.scan's in_axes
  need; under nn.scan (`scanned`) it returns nn.scan's (carry, output) pair."""
  scanned: bool = False

  def __call__(self, x_BTD, mask, bias, segment_ids_BT, positions_BT, deterministic):
    x_BTD = super().__call__(x_BTD, mask=mask, bias=bias, segment_ids=segment_ids_BT,
                             positions=positions_BT, deterministic=deterministic)
    return (x_BTD, None) if self.scanned else x_BTD


class _StackedDecoderLayer(DecoderLayer):
  """DecoderLayer called positionally (see _StackedEncoderLayer)."""
  scanned: bool = False

  def __call__(self, x_BTD, encoded_BSD, self_bias, cross_mask, segment_ids_BT,
               encoder_segment_ids_BS, positions_BT, deterministic, decode):
    x_BTD = super().__call__(x_BTD, encoded=encoded_BSD, bias=self_bias, cross_mask=cross_mask,
                             segment_ids=segment_ids_BT,
                             encoded_segment_ids=encoder_segment_ids_BS, positions=positions_BT,
                             decode=decode, deterministic=deterministic)
    return (x_BTD, None) if self.scanned else x_BTD


def _layer_stack(layer_cls, cfg: TransformerConfig, num_layers: int, static_argnums,
                 **layer_kwargs):
  """`num_layers` layers, unrolled or under nn.scan, optionally rematerialised."""
  if cfg.remat_policy != "none":
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                         static_argnums=static_argnums, prevent_cse=not cfg.scan_layers)
  fields = layer_fields(cfg)
  if not cfg.scan_layers:
    return [layer_cls(**fields, name=f"layers_{i}", **layer_kwargs) for i in range(num_layers)]
  num_args = max(static_argnums)
  scanned = nn.scan(
      layer_cls, length=num_layers,
      variable_axes={"params": 0, "cache": 1, WEIGHTS_COLLECTION: 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * (num_args - 1),
      metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(**fields, name="layers", scanned=True, **layer_kwargs)


def _run_stack(stack, x_BTD, *args):
  if isinstance(stack, list):
    for layer in stack:
      x_BTD = layer(x_BTD, *args)
    return x_BTD
  x_BTD, _ = stack(x_BTD, *args)
  return x_BTD


def default_positions(tokens_BT, segment_ids_BT=None):
  """0, 1, 2, ... per row; restarting at each new segment of a packed row."""
  batch, length = tokens_BT.shape
  index_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if segment_ids_BT is None:
    return index_BT
  starts_BT = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  start_index_BT = jax.lax.cummax(jnp.where(starts_BT, index_BT, 0), axis=1)
  return index_BT - start_index_BT


class _Embedder(nn.Module):
  """Token (+ position, + token type) embeddings, scaled, normed and dropped out per config."""
  cfg: TransformerConfig
  embed: layers.Embed

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, token_types_BT, deterministic: bool):
    cfg = self.cfg
    x_BTD = self.embed(tokens_BT)
    if cfg.scale_embeddings:
      x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), x_BTD.dtype)
    if cfg.position == "learned":
      x_BTD = x_BTD + layers.LearnedPositions(cfg.max_len, cfg.d_model, dtype=cfg.dtype,
                                              param_dtype=cfg.param_dtype,
                                              name="position_embed")(positions_BT)
    elif cfg.position == "sinusoidal":
      x_BTD = x_BTD + layers.sinusoidal_positions(positions_BT, cfg.d_model).astype(x_BTD.dtype)
    if cfg.num_token_types:
      if token_types_BT is None:
        token_types_BT = jnp.zeros_like(tokens_BT)
      x_BTD = x_BTD + layers.Embed(cfg.num_token_types, cfg.d_model, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype,
                                   embedding_init=nn.initializers.normal(0.02),
                                   name="token_type_embed")(token_types_BT)
    if cfg.embedding_norm:
      x_BTD = norm_from_config(cfg, "embed_norm")(x_BTD)
    return nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)


def _relative_bias(cfg: TransformerConfig, bidirectional: bool, query_positions_BT,
                   key_positions_BS):
  if cfg.position != "relative":
    return None
  return layers.RelativePositionBias(
      cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance, bidirectional,
      dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      name="relative_bias")(query_positions_BT, key_positions_BS)


def real_vocab_logits(cfg: TransformerConfig, logits_BTV):
  """The logits of the real vocabulary: the padded rows never reach a softmax or a search (the
  slice fuses into the ops that read the logits). The training loss takes the padded width
  instead (`padded_vocab=True`) and masks the padding itself: its reductions then run over a
  multiple of 128 columns, not an odd 50,257."""
  if cfg.padded_vocab_size == cfg.vocab_size:
    return logits_BTV
  return logits_BTV[..., :cfg.vocab_size]


class Encoder(nn.Module):
  """Embeddings and a stack of encoder layers (bidirectional self-attention)."""
  cfg: TransformerConfig
  embed: layers.Embed

  @nn.compact
  def __call__(self, tokens_BS, padding_mask_BS, segment_ids_BS, positions_BS, token_types_BS,
               deterministic: bool):
    cfg = self.cfg
    if positions_BS is None:
      positions_BS = default_positions(tokens_BS, segment_ids_BS)
    x_BSD = _Embedder(cfg, self.embed, name="embedder")(tokens_BS, positions_BS, token_types_BS,
                                                        deterministic)
    mask = None if padding_mask_BS is None else padding_mask_BS[:, None, None, :]
    bias = _relative_bias(cfg, True, positions_BS, positions_BS)
    stack = _layer_stack(_StackedEncoderLayer, cfg, cfg.num_layers, static_argnums=(6,))
    x_BSD = _run_stack(stack, x_BSD, mask, bias, segment_ids_BS, positions_BS, deterministic)
    return norm_from_config(cfg, "final_norm")(x_BSD) if cfg.pre_norm else x_BSD


class Decoder(nn.Module):
  """Embeddings, a stack of decoder layers and the output logits."""
  cfg: TransformerConfig
  embed: layers.Embed
  num_layers: int
  cross_attention: bool = False

  @nn.compact
  def __call__(self, tokens_BT, encoded_BSD, encoder_padding_mask_BS, segment_ids_BT,
               encoder_segment_ids_BS, positions_BT, deterministic: bool, decode: bool,
               padded_vocab: bool = False):
    cfg = self.cfg
    if decode:
      positions_BT = self._decode_positions(tokens_BT, positions_BT)
    elif positions_BT is None:
      positions_BT = default_positions(tokens_BT, segment_ids_BT)
    x_BTD = _Embedder(cfg, self.embed, name="embedder")(tokens_BT, positions_BT, None,
                                                        deterministic)
    key_positions = self._key_positions(positions_BT) if decode else positions_BT
    self_bias = _relative_bias(cfg, False, positions_BT, key_positions)
    cross_mask = (None if encoder_padding_mask_BS is None
                  else encoder_padding_mask_BS[:, None, None, :])
    stack = _layer_stack(_StackedDecoderLayer, cfg, self.num_layers, static_argnums=(8, 9),
                         cross_attention=self.cross_attention)
    x_BTD = _run_stack(stack, x_BTD, encoded_BSD, self_bias, cross_mask, segment_ids_BT,
                       encoder_segment_ids_BS, positions_BT, deterministic, decode)
    if cfg.pre_norm:
      x_BTD = norm_from_config(cfg, "final_norm")(x_BTD)
    if cfg.tie_output:
      if cfg.scale_tied_logits:
        x_BTD = x_BTD * jnp.asarray(cfg.d_model ** -0.5, x_BTD.dtype)
      logits_BTV = self.embed.attend(x_BTD)
    else:
      logits_BTV = nn.Dense(cfg.padded_vocab_size, use_bias=False, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype,
                            kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                           "embed", "vocab"),
                            name="logits_dense")(x_BTD)
    if not padded_vocab:
      logits_BTV = real_vocab_logits(cfg, logits_BTV)
    return logits_BTV.astype(cfg.logits_dtype)

  def _decode_positions(self, tokens_BT, positions_BT):
    """In decode mode, positions continue from the tokens already in the cache."""
    batch, length = tokens_BT.shape
    initialized = self.has_variable("cache", "cache_index")
    index = self.variable("cache", "cache_index", jnp.zeros, (batch,), jnp.int32)
    if positions_BT is None:
      positions_BT = index.value[:, None] + jnp.arange(length, dtype=jnp.int32)
    if initialized:
      index.value = index.value + length
    return positions_BT

  def _key_positions(self, positions_BT):
    """The position of each cache slot (slot s holds position s); sized at cache init."""
    batch, length = positions_BT.shape
    return self.variable("cache", "key_positions",
                         lambda: jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                                  (batch, length))).value
