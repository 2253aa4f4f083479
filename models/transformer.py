"""The three Transformer families on one set of layers.

`TransformerConfig` switches express the paper's base model, GPT-2, BERT, T5 v1.0/v1.1 and the
LLaMA-style decoders LLaMA, Mistral, Qwen2 and Gemma (see models/presets.py). How each is called:

  DecoderOnly(cfg)(tokens_BT, *, segment_ids=None, positions=None) -> logits_BTV
  EncoderDecoder(cfg)(encoder_tokens_BS, decoder_tokens_BT, *, encoder_padding_mask=None,
                      encoder_segment_ids=None, decoder_segment_ids=None) -> logits_BTV
  EncoderOnly(cfg)(tokens_BT, *, padding_mask=None, token_types=None) -> hidden_BTD

The logits have `vocab_size` columns; `padded_vocab=True` (both decoders) gives all
`cfg.padded_vocab_size` of them instead, those past `vocab_size` meaningless, for a loss that
masks them (the training task's); searches never see them. The decoder input is passed already
shifted. Decoding (`decode=True`) keeps keys and values in the "cache" collection; every cache
leaf is batch-leading, also with `scan_layers`.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.attention_choice import IMPLEMENTATIONS
from models.errors import InputError
from models.multi_head_attention import MultiHeadAttention

POSITIONS = ("learned", "sinusoidal", "rope", "relative", "none")
NORMS = ("layernorm", "rmsnorm")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """Hyperparameters of every model family; validated on construction.

  A head_dim left None is resolved to d_model // num_heads on construction; `cfg.replace`
  (rather than dataclasses.replace) derives it again from the new d_model and num_heads.
  """
  vocab_size: int
  d_model: int = 512                    # width of the residual stream
  num_heads: int = 8                    # query heads
  num_kv_heads: int | None = None       # key/value heads (grouped-query); None = num_heads
  head_dim: int | None = None           # None = d_model // num_heads (resolved on construction)
  d_ff: int = 2048                      # hidden width of the feed-forward layer
  num_layers: int = 6                   # layers of the stack (EncoderDecoder: the encoder)
  num_decoder_layers: int | None = None  # EncoderDecoder's decoder; None = num_layers
  max_len: int = 512                    # size of the learned position table
  position: str = "sinusoidal"          # learned | sinusoidal | rope | relative | none
  rope_max_wavelength: float = 10_000.0  # RoPE base
  rope_llama3_factor: float | None = None  # LLaMA 3.1 RoPE scaling (None = off): long
                                           # wavelengths stretched by this factor
  rope_llama3_low_freq_factor: float = 1.0   # wavelengths > original_max_len / this: stretched
  rope_llama3_high_freq_factor: float = 4.0  # wavelengths < original_max_len / this: kept
  rope_llama3_original_max_len: int = 8192   # the pretraining context of the scaled model
  sliding_window: int | None = None     # self-attention: keys < W positions away (causal: last W)
  relative_buckets: int = 32            # T5 relative-position buckets
  relative_max_distance: int = 128      # T5: distance of the last bucket
  norm: str = "layernorm"               # layernorm | rmsnorm
  norm_epsilon: float = 1e-6
  norm_use_bias: bool = True            # LayerNorm/RMSNorm bias (T5, LLaMA: False)
  norm_scale_plus_one: bool = False     # norms multiply by 1 + scale, scale starting at 0 (Gemma)
  pre_norm: bool = True                 # pre-LN (GPT-2, T5) or post-LN (paper, BERT)
  embedding_norm: bool = False          # a norm right after the embeddings (BERT)
  activation: str = "relu"              # relu | gelu | gelu_tanh | silu
  gated_ffn: bool = False               # GLU feed-forward: GEGLU (gelu), SwiGLU (silu)
  use_bias: bool = True                 # biases in attention and feed-forward projections
  qkv_bias: bool | None = None          # query/key/value biases; None = use_bias (Qwen2: True)
  ffn_bias: bool | None = None          # feed-forward biases; None = use_bias (LLaMA mlp_bias)
  attention_scale: float | None = None  # None = 1/sqrt(head_dim); T5 uses 1.0
  scale_embeddings: bool = False        # multiply token embeddings by sqrt(d_model) (paper)
  embedding_init_stddev: float | None = None  # None = d_model ** -0.5
  share_embeddings: bool = True         # EncoderDecoder: one token table for both sides
  tie_output: bool = True               # logits through the token table (else a Dense)
  scale_tied_logits: bool = False       # T5 v1.0: outputs * d_model**-0.5 before tied logits
  num_token_types: int = 0              # BERT segment embeddings (2); 0 = none
  dropout_rate: float = 0.0             # on embeddings and each residual branch
  attention_dropout_rate: float = 0.0   # on attention weights
  ffn_dropout_rate: float = 0.0         # inside the feed-forward, after the activation (T5)
  dtype: str = "float32"                # compute dtype name (bfloat16 on accelerators)
  param_dtype: str = "float32"          # parameter dtype name
  logits_dtype: str = "float32"         # dtype of the returned logits; bfloat16 (with a bf16
                                        # dtype) lets the loss read them without a float32 copy
  vocab_pad_multiple: int = 1           # token table and output layer rounded up to a multiple
                                        # of this (128 on GPUs); logits keep vocab_size entries
  scan_layers: bool = False             # nn.scan over layers: compile time flat in depth
  remat_policy: str = "none"            # none | full | dots | dots_no_batch
  attention_implementation: str | None = None  # None (fastest) or attention.IMPLEMENTATIONS

  _head_dim_derived = False  # Not a field: True once a None head_dim has been resolved.

  def __post_init__(self):
    problems = []
    for name in ("vocab_size", "d_model", "num_heads", "d_ff", "num_layers",
                 "vocab_pad_multiple"):
      if getattr(self, name) <= 0:
        problems.append(f"{name} must be positive, got {getattr(self, name)}")
    derived = self.head_dim is None
    head_dim = self.d_model // max(self.num_heads, 1) if derived else self.head_dim
    if derived and self.num_heads > 0 and self.d_model % self.num_heads:
      problems.append(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}: "
                      "change one of them or set head_dim")
    if not derived and head_dim <= 0:
      problems.append(f"head_dim must be positive, got {head_dim}")
    if self.num_kv_heads is not None and (
        self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
      problems.append(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    for name, value, allowed in (("position", self.position, POSITIONS),
                                 ("norm", self.norm, NORMS),
                                 ("activation", self.activation, tuple(layers.ACTIVATIONS)),
                                 ("remat_policy", self.remat_policy, tuple(REMAT_POLICIES)),
                                 ("attention_implementation", self.attention_implementation,
                                  (None, *IMPLEMENTATIONS))):
      if value not in allowed:
        problems.append(f"unknown {name} {value!r}; choose from {allowed}")
    for name in ("dtype", "param_dtype", "logits_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        problems.append(f"{name}={getattr(self, name)!r} is not a dtype name "
                        "(e.g. 'float32', 'bfloat16')")
    if self.position == "rope" and head_dim % 2:
      problems.append(f"RoPE needs an even head_dim, got {head_dim}")
    if self.rope_llama3_factor is not None:
      if self.position != "rope":
        problems.append("rope_llama3_factor needs position='rope'")
      if not (self.rope_llama3_factor > 0 and self.rope_llama3_original_max_len > 0
              and 0 < self.rope_llama3_low_freq_factor < self.rope_llama3_high_freq_factor):
        problems.append("LLaMA 3 RoPE scaling needs rope_llama3_factor > 0, "
                        "rope_llama3_original_max_len > 0 and 0 < rope_llama3_low_freq_factor < "
                        "rope_llama3_high_freq_factor")
    if self.sliding_window is not None and self.sliding_window <= 0:
      problems.append(f"sliding_window must be positive or None, got {self.sliding_window}")
    if self.position == "learned" and self.max_len <= 0:
      problems.append("learned positions need max_len > 0")
    if self.position == "relative" and (self.relative_buckets < 4 or self.relative_buckets % 2):
      problems.append(f"relative_buckets must be even and >= 4, got {self.relative_buckets}")
    for name in ("dropout_rate", "attention_dropout_rate", "ffn_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
      problems.append(f"num_decoder_layers must be positive, got {self.num_decoder_layers}")
    if problems:
      raise InputError("Invalid TransformerConfig: " + "; ".join(problems) + ".")
    object.__setattr__(self, "head_dim", head_dim)
    object.__setattr__(self, "_head_dim_derived", derived)

  @property
  def padded_vocab_size(self) -> int:
    """Rows of the token table and outputs of the logits layer: vocab_size rounded up."""
    return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

  def replace(self, **changes) -> "TransformerConfig":
    """A copy with `changes`; a head_dim that was derived is derived again."""
    if self._head_dim_derived:
      changes.setdefault("head_dim", None)
    return dataclasses.replace(self, **changes)


def _norm(cfg: TransformerConfig, name: str) -> layers.Norm:
  return layers.Norm(cfg.norm, epsilon=cfg.norm_epsilon, use_bias=cfg.norm_use_bias,
                     scale_plus_one=cfg.norm_scale_plus_one, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, name=name)


def _attention(cfg: TransformerConfig, name: str) -> MultiHeadAttention:
  rope = cfg.position == "rope"
  llama3 = (cfg.rope_llama3_factor, cfg.rope_llama3_low_freq_factor,
            cfg.rope_llama3_high_freq_factor, cfg.rope_llama3_original_max_len)
  return MultiHeadAttention(
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
      use_bias=cfg.use_bias, qkv_bias=cfg.qkv_bias, dropout_rate=cfg.attention_dropout_rate,
      scale=cfg.attention_scale, rope_max_wavelength=cfg.rope_max_wavelength if rope else None,
      rope_llama3_scaling=llama3 if rope and cfg.rope_llama3_factor is not None else None,
      sliding_window=cfg.sliding_window if name == "self_attention" else None,
      implementation=cfg.attention_implementation, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, name=name)


def _feed_forward(cfg: TransformerConfig) -> layers.FeedForward:
  use_bias = cfg.use_bias if cfg.ffn_bias is None else cfg.ffn_bias
  return layers.FeedForward(cfg.d_ff, activation=cfg.activation, gated=cfg.gated_ffn,
                            use_bias=use_bias, dropout_rate=cfg.ffn_dropout_rate,
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="mlp")


def _add_and_norm(cfg: TransformerConfig, name: str, x_BTD, branch, deterministic: bool):
  """A residual branch: pre-LN x + f(norm(x)), or post-LN norm(x + f(x)); dropout on f."""
  norm = _norm(cfg, f"{name}_norm")
  dropout = nn.Dropout(cfg.dropout_rate)
  if cfg.pre_norm:
    return x_BTD + dropout(branch(norm(x_BTD)), deterministic=deterministic)
  return norm(x_BTD + dropout(branch(x_BTD), deterministic=deterministic))


class EncoderLayer(nn.Module):
  """Self-attention and feed-forward, each with add & norm."""
  cfg: TransformerConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BTD, mask, bias, segment_ids_BT, positions_BT, deterministic: bool):
    attend = lambda h: _attention(self.cfg, "self_attention")(
        h, mask=mask, bias=bias, query_segment_ids=segment_ids_BT,
        kv_segment_ids=segment_ids_BT, positions=positions_BT, deterministic=deterministic)
    x_BTD = _add_and_norm(self.cfg, "self_attention", x_BTD, attend, deterministic)
    mlp = lambda h: _feed_forward(self.cfg)(h, deterministic=deterministic)
    x_BTD = _add_and_norm(self.cfg, "mlp", x_BTD, mlp, deterministic)
    return (x_BTD, None) if self.scanned else x_BTD


class DecoderLayer(nn.Module):
  """Causal self-attention, optional cross-attention to the encoder, feed-forward."""
  cfg: TransformerConfig
  cross_attention: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BTD, encoded_BSD, self_bias, cross_mask, segment_ids_BT,
               encoder_segment_ids_BS, positions_BT, deterministic: bool, decode: bool):
    attend = lambda h: _attention(self.cfg, "self_attention")(
        h, bias=self_bias, is_causal=not decode, query_segment_ids=segment_ids_BT,
        kv_segment_ids=segment_ids_BT, positions=positions_BT, decode=decode,
        deterministic=deterministic)
    x_BTD = _add_and_norm(self.cfg, "self_attention", x_BTD, attend, deterministic)
    if self.cross_attention:
      cross = lambda h: _attention(self.cfg, "cross_attention")(
          h, encoded_BSD, mask=cross_mask, query_segment_ids=segment_ids_BT,
          kv_segment_ids=encoder_segment_ids_BS, decode=decode, deterministic=deterministic)
      x_BTD = _add_and_norm(self.cfg, "cross_attention", x_BTD, cross, deterministic)
    mlp = lambda h: _feed_forward(self.cfg)(h, deterministic=deterministic)
    x_BTD = _add_and_norm(self.cfg, "mlp", x_BTD, mlp, deterministic)
    return (x_BTD, None) if self.scanned else x_BTD


def _layer_stack(layer_cls, cfg: TransformerConfig, num_layers: int, static_argnums,
                 **layer_kwargs):
  """`num_layers` layers, unrolled or under nn.scan, optionally rematerialised."""
  if cfg.remat_policy != "none":
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                         static_argnums=static_argnums, prevent_cse=not cfg.scan_layers)
  if not cfg.scan_layers:
    return [layer_cls(cfg, name=f"layers_{i}", **layer_kwargs) for i in range(num_layers)]
  num_args = max(static_argnums)
  scanned = nn.scan(
      layer_cls, length=num_layers,
      variable_axes={"params": 0, "cache": 1, "attention_weights": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * (num_args - 1),
      metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, name="layers", scanned=True, **layer_kwargs)


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
      x_BTD = _norm(cfg, "embed_norm")(x_BTD)
    return nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)


def _relative_bias(cfg: TransformerConfig, bidirectional: bool, query_positions_BT,
                   key_positions_BS):
  if cfg.position != "relative":
    return None
  return layers.RelativePositionBias(
      cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance, bidirectional,
      dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      name="relative_bias")(query_positions_BT, key_positions_BS)


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
    stack = _layer_stack(EncoderLayer, cfg, cfg.num_layers, static_argnums=(6,))
    x_BSD = _run_stack(stack, x_BSD, mask, bias, segment_ids_BS, positions_BS, deterministic)
    return _norm(cfg, "final_norm")(x_BSD) if cfg.pre_norm else x_BSD


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
    stack = _layer_stack(DecoderLayer, cfg, self.num_layers, static_argnums=(8, 9),
                         cross_attention=self.cross_attention)
    x_BTD = _run_stack(stack, x_BTD, encoded_BSD, self_bias, cross_mask, segment_ids_BT,
                       encoder_segment_ids_BS, positions_BT, deterministic, decode)
    if cfg.pre_norm:
      x_BTD = _norm(cfg, "final_norm")(x_BTD)
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
      logits_BTV = _real_vocab(cfg, logits_BTV)
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


def _real_vocab(cfg: TransformerConfig, logits_BTV):
  """The logits of the real vocabulary: the padded rows never reach a softmax or a search (the
  slice fuses into the ops that read the logits). The training loss takes the padded width
  instead (`padded_vocab=True`) and masks the padding itself: its reductions then run over a
  multiple of 128 columns, not an odd 50,257."""
  if cfg.padded_vocab_size == cfg.vocab_size:
    return logits_BTV
  return logits_BTV[..., :cfg.vocab_size]


def _token_embed(cfg: TransformerConfig, name: str) -> layers.Embed:
  stddev = cfg.embedding_init_stddev or cfg.d_model ** -0.5
  return layers.Embed(cfg.padded_vocab_size, cfg.d_model, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype,
                      embedding_init=nn.initializers.normal(stddev), name=name)


class DecoderOnly(nn.Module):
  """A GPT-style language model: tokens_BT -> next-token logits_BTV."""
  cfg: TransformerConfig

  def setup(self):
    self.token_embed = _token_embed(self.cfg, "token_embed")
    self.decoder = Decoder(self.cfg, self.token_embed, self.cfg.num_layers)

  def __call__(self, tokens_BT, *, segment_ids=None, positions=None, decode: bool = False,
               deterministic: bool = True, padded_vocab: bool = False):
    return self.decoder(tokens_BT, None, None, segment_ids, None, positions, deterministic, decode,
                        padded_vocab)


class EncoderDecoder(nn.Module):
  """The paper's Transformer (and T5): encode the source, decode the (shifted) target."""
  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    if cfg.share_embeddings:
      encoder_embed = decoder_embed = _token_embed(cfg, "token_embed")
    else:
      encoder_embed = _token_embed(cfg, "encoder_embed")
      decoder_embed = _token_embed(cfg, "decoder_embed")
    self.encoder = Encoder(cfg, encoder_embed)
    self.decoder = Decoder(cfg, decoder_embed, cfg.num_decoder_layers or cfg.num_layers,
                           cross_attention=True)

  def encode(self, encoder_tokens_BS, *, encoder_padding_mask=None, encoder_segment_ids=None,
             encoder_positions=None, deterministic: bool = True):
    if encoder_padding_mask is None and encoder_segment_ids is not None:
      encoder_padding_mask = encoder_segment_ids != 0
    return self.encoder(encoder_tokens_BS, encoder_padding_mask, encoder_segment_ids,
                        encoder_positions, None, deterministic)

  def decode(self, encoded_BSD, decoder_tokens_BT, *, encoder_padding_mask=None,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
             decode: bool = False, deterministic: bool = True, padded_vocab: bool = False):
    if encoder_padding_mask is None and encoder_segment_ids is not None:
      encoder_padding_mask = encoder_segment_ids != 0
    return self.decoder(decoder_tokens_BT, encoded_BSD, encoder_padding_mask,
                        decoder_segment_ids, encoder_segment_ids, decoder_positions,
                        deterministic, decode, padded_vocab)

  def __call__(self, encoder_tokens_BS, decoder_tokens_BT, *, encoder_padding_mask=None,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, deterministic: bool = True, padded_vocab: bool = False):
    encoded_BSD = self.encode(encoder_tokens_BS, encoder_padding_mask=encoder_padding_mask,
                              encoder_segment_ids=encoder_segment_ids,
                              encoder_positions=encoder_positions, deterministic=deterministic)
    return self.decode(encoded_BSD, decoder_tokens_BT, encoder_padding_mask=encoder_padding_mask,
                       encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions, deterministic=deterministic,
                       padded_vocab=padded_vocab)


class EncoderOnly(nn.Module):
  """A BERT-style encoder: tokens_BT -> contextual hidden_BTD."""
  cfg: TransformerConfig

  def setup(self):
    self.token_embed = _token_embed(self.cfg, "token_embed")
    self.encoder = Encoder(self.cfg, self.token_embed)

  def __call__(self, tokens_BT, *, padding_mask=None, token_types=None, segment_ids=None,
               positions=None, deterministic: bool = True):
    return self.encoder(tokens_BT, padding_mask, segment_ids, positions, token_types,
                        deterministic)

  def attend(self, hidden_BTD):
    """Logits over the vocabulary through the token table (the masked-LM head's decoder)."""
    return _real_vocab(self.cfg, self.token_embed.attend(hidden_BTD))


class EncoderClassifier(nn.Module):
  """EncoderOnly with a pooled classification head: tokens_BT -> logits_BC.

  pooling "cls" takes the first token through a tanh Dense (BERT's pooler); "mean" averages
  the unpadded tokens (sentence-transformers) without a pooler.
  """
  cfg: TransformerConfig
  num_classes: int
  pooling: str = "cls"

  @nn.compact
  def __call__(self, tokens_BT, *, padding_mask=None, token_types=None, deterministic=True):
    cfg = self.cfg
    if self.pooling not in ("cls", "mean"):
      raise InputError(f"Unknown pooling {self.pooling!r}: use 'cls' or 'mean'.")
    hidden_BTD = EncoderOnly(cfg, name="encoder")(
        tokens_BT, padding_mask=padding_mask, token_types=token_types,
        deterministic=deterministic)
    dense = lambda features, names, name: nn.Dense(
        features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=layers.partitioned(nn.initializers.normal(0.02), *names),
        bias_init=layers.partitioned(nn.initializers.zeros, names[-1]), name=name)
    if self.pooling == "cls":
      pooled_BD = jnp.tanh(dense(cfg.d_model, ("embed", "hidden"), "pooler")(hidden_BTD[:, 0]))
    else:
      valid_BT1 = (jnp.ones(tokens_BT.shape, bool) if padding_mask is None
                   else padding_mask)[..., None].astype(hidden_BTD.dtype)
      pooled_BD = (hidden_BTD * valid_BT1).sum(1) / jnp.maximum(valid_BT1.sum(1), 1)
    pooled_BD = nn.Dropout(cfg.dropout_rate)(pooled_BD, deterministic=deterministic)
    return dense(self.num_classes, ("embed", "classes"), "classifier")(pooled_BD).astype(
        jnp.float32)


class EncoderMaskedLM(nn.Module):
  """EncoderOnly with BERT's masked-LM head (Dense, activation, norm, tied logits + bias)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens_BT, *, padding_mask=None, token_types=None, deterministic=True):
    cfg = self.cfg
    encoder = EncoderOnly(cfg, name="encoder")
    hidden_BTD = encoder(tokens_BT, padding_mask=padding_mask, token_types=token_types,
                         deterministic=deterministic)
    h_BTD = nn.Dense(cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     kernel_init=layers.partitioned(nn.initializers.normal(0.02), "embed",
                                                    "hidden"),
                     bias_init=layers.partitioned(nn.initializers.zeros, "hidden"),
                     name="transform")(hidden_BTD)
    h_BTD = _norm(cfg, "transform_norm")(layers.ACTIVATIONS[cfg.activation](h_BTD))
    bias_V = self.param("output_bias", layers.partitioned(nn.initializers.zeros, "vocab"),
                        (cfg.vocab_size,), cfg.param_dtype)
    return (encoder.attend(h_BTD) + bias_V).astype(cfg.logits_dtype)
