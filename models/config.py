"""TransformerConfig: the hyperparameters of every model family, validated on construction."""

import dataclasses

import jax
import jax.numpy as jnp

from models import layers
from models.attention_choice import IMPLEMENTATIONS
from models.errors import InputError

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
  attention_implementation: str | None = None  # None (fastest) or attention_choice.IMPLEMENTATIONS

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
