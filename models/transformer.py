"""The three Transformer families and their task heads, on the stacks of models/blocks.py.

`TransformerConfig` (models/config.py) switches express the paper's base model, GPT-2, BERT,
T5 v1.0/v1.1 and the LLaMA-style decoders LLaMA, Mistral, Qwen2 and Gemma (see
models/presets.py). How each is called:

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

import flax.linen as nn
import jax.numpy as jnp

from models import layers
from models.blocks import Decoder, Encoder, norm_from_config, real_vocab_logits
from models.config import TransformerConfig
from models.errors import InputError


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
    return real_vocab_logits(self.cfg, self.token_embed.attend(hidden_BTD))


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
    h_BTD = norm_from_config(cfg, "transform_norm")(layers.ACTIVATIONS[cfg.activation](h_BTD))
    bias_V = self.param("output_bias", layers.partitioned(nn.initializers.zeros, "vocab"),
                        (cfg.vocab_size,), cfg.param_dtype)
    return (encoder.attend(h_BTD) + bias_V).astype(cfg.logits_dtype)
