"""Configurations of well-known Transformers, expressed with TransformerConfig switches.

Each function returns the published size; pass keyword overrides for other sizes, e.g.
`gpt2(num_layers=2, d_model=64, num_heads=4, d_ff=256)` for a tiny test model.
"""

from models.config import TransformerConfig


def transformer_base(vocab_size: int = 37_000, **overrides) -> TransformerConfig:
  """Vaswani et al. (2017) base: post-LN, sinusoidal, ReLU, shared embeddings scaled by √d."""
  return TransformerConfig(**{
      "vocab_size": vocab_size, "d_model": 512, "num_heads": 8, "d_ff": 2048, "num_layers": 6,
      "position": "sinusoidal", "norm": "layernorm", "pre_norm": False, "activation": "relu",
      "share_embeddings": True, "tie_output": True, "scale_embeddings": True,
      "dropout_rate": 0.1, **overrides})


def gpt2(vocab_size: int = 50_257, **overrides) -> TransformerConfig:
  """GPT-2 small (124M): pre-LN, learned positions, GELU (tanh), output tied to the input."""
  return TransformerConfig(**{
      "vocab_size": vocab_size, "d_model": 768, "num_heads": 12, "d_ff": 3072, "num_layers": 12,
      "max_len": 1024, "position": "learned", "norm": "layernorm", "norm_epsilon": 1e-5,
      "pre_norm": True, "activation": "gelu_tanh", "tie_output": True,
      "embedding_init_stddev": 0.02, "dropout_rate": 0.1, **overrides})


def bert_base(vocab_size: int = 30_522, **overrides) -> TransformerConfig:
  """BERT base: post-LN, learned positions + token types, embedding LayerNorm, exact GELU."""
  return TransformerConfig(**{
      "vocab_size": vocab_size, "d_model": 768, "num_heads": 12, "d_ff": 3072, "num_layers": 12,
      "max_len": 512, "position": "learned", "num_token_types": 2, "embedding_norm": True,
      "norm": "layernorm", "norm_epsilon": 1e-12, "pre_norm": False, "activation": "gelu",
      "tie_output": True, "embedding_init_stddev": 0.02, "dropout_rate": 0.1, **overrides})


def t5_v1_0(vocab_size: int = 32_128, **overrides) -> TransformerConfig:
  """T5 v1.0 small: RMSNorm without bias, shared relative bias, unscaled logits, ReLU, tied."""
  return TransformerConfig(**{
      "vocab_size": vocab_size, "d_model": 512, "num_heads": 8, "head_dim": 64, "d_ff": 2048,
      "num_layers": 6, "position": "relative", "relative_buckets": 32,
      "relative_max_distance": 128, "norm": "rmsnorm", "norm_use_bias": False,
      "norm_epsilon": 1e-6, "pre_norm": True, "activation": "relu", "use_bias": False,
      "attention_scale": 1.0, "share_embeddings": True, "tie_output": True,
      "scale_tied_logits": True, "embedding_init_stddev": 1.0, "dropout_rate": 0.1,
      "ffn_dropout_rate": 0.1, **overrides})


def t5_v1_1(vocab_size: int = 32_128, **overrides) -> TransformerConfig:
  """T5 v1.1 / Flan-T5 small: as v1.0 with gated GELU (tanh) and an untied output layer."""
  return t5_v1_0(vocab_size, **{
      "d_model": 512, "num_heads": 6, "head_dim": 64, "d_ff": 1024, "num_layers": 8,
      "activation": "gelu_tanh", "gated_ffn": True, "tie_output": False,
      "scale_tied_logits": False, **overrides})


def llama(vocab_size: int = 32_000, **overrides) -> TransformerConfig:
  """LLaMA-2 7B: RMSNorm, RoPE, SwiGLU, untied output, full multi-head attention (no GQA).

  Grouped-query attention (LLaMA-2 70B, LLaMA-3) is an override: `llama(num_kv_heads=8)`.
  """
  return TransformerConfig(**{
      "vocab_size": vocab_size, "d_model": 4096, "num_heads": 32, "num_kv_heads": None,
      "d_ff": 11_008, "num_layers": 32, "position": "rope", "rope_max_wavelength": 10_000.0,
      "norm": "rmsnorm", "norm_use_bias": False, "norm_epsilon": 1e-5, "pre_norm": True,
      "activation": "silu", "gated_ffn": True, "use_bias": False, "tie_output": False,
      "embedding_init_stddev": 0.02, **overrides})


def llama3(vocab_size: int = 128_256, **overrides) -> TransformerConfig:
  """LLaMA 3.1 8B: LLaMA's switches, 8 key/value heads, RoPE base 500,000 and llama3 scaling."""
  return llama(vocab_size, **{
      "num_kv_heads": 8, "d_ff": 14_336, "rope_max_wavelength": 500_000.0,
      "rope_llama3_factor": 8.0, "rope_llama3_low_freq_factor": 1.0,
      "rope_llama3_high_freq_factor": 4.0, "rope_llama3_original_max_len": 8192, **overrides})


def mistral(vocab_size: int = 32_000, **overrides) -> TransformerConfig:
  """Mistral 7B v0.1: LLaMA's switches, 8 key/value heads and a 4,096-token sliding window."""
  return llama(vocab_size, **{"num_kv_heads": 8, "d_ff": 14_336, "sliding_window": 4096,
                              **overrides})


def qwen2(vocab_size: int = 152_064, **overrides) -> TransformerConfig:
  """Qwen2 7B: LLaMA's switches with biases on query, key and value only; 4 key/value heads."""
  return llama(vocab_size, **{
      "d_model": 3584, "num_heads": 28, "num_kv_heads": 4, "d_ff": 18_944, "num_layers": 28,
      "rope_max_wavelength": 1_000_000.0, "norm_epsilon": 1e-6, "qkv_bias": True, **overrides})


def gemma(vocab_size: int = 256_000, **overrides) -> TransformerConfig:
  """Gemma 7B: embeddings scaled by √d and tied, RMSNorm by 1 + scale, GeGLU (tanh), head_dim
  256 (not d_model / heads)."""
  return llama(vocab_size, **{
      "d_model": 3072, "num_heads": 16, "head_dim": 256, "d_ff": 24_576, "num_layers": 28,
      "norm_epsilon": 1e-6, "norm_scale_plus_one": True, "activation": "gelu_tanh",
      "scale_embeddings": True, "tie_output": True, **overrides})


PRESETS = {"transformer_base": transformer_base, "gpt2": gpt2, "bert_base": bert_base,
           "t5_v1_0": t5_v1_0, "t5_v1_1": t5_v1_1, "llama": llama, "llama3": llama3,
           "mistral": mistral, "qwen2": qwen2, "gemma": gemma}
