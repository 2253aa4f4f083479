"""tapete's model library: the names a researcher imports, e.g. `from models import DecoderLayer`.

`_PUBLIC` below lists each public name with the module that holds it and one line on what it
is (also `__all__`); a name equal to its module's is that module (`models.presets`). A name is
imported from its module on first use, so `import models` (and `import models.errors`, which the
launchers use) loads neither jax nor flax, and nothing here imports torch or transformers.
"""

import importlib

_PUBLIC = {
    # Configuration.
    "TransformerConfig": "config",      # every hyperparameter of a family; checked on creation
    "presets": "presets",               # the paper's base, GPT-2, BERT, T5, LLaMA, ... configs
    # The families and their task heads: Linen modules over a TransformerConfig.
    "DecoderOnly": "transformer",       # GPT-style LM: tokens_BT -> next-token logits_BTV
    "EncoderDecoder": "transformer",    # the paper's Transformer and T5: source, target -> logits
    "EncoderOnly": "transformer",       # BERT-style encoder: tokens_BT -> hidden_BTD
    "EncoderClassifier": "transformer",  # EncoderOnly + pooled classifier: tokens -> logits_BC
    "EncoderMaskedLM": "transformer",   # EncoderOnly + BERT's masked-LM head: tokens -> logits
    # Blocks: layers built from their own keyword fields, and the families' stacks.
    "EncoderLayer": "blocks",           # self-attention + feed-forward, each with add & norm
    "DecoderLayer": "blocks",           # causal self-, optional cross-attention, feed-forward
    "layer_fields": "blocks",           # TransformerConfig -> the fields of a layer
    "Encoder": "blocks",                # embeddings + encoder layers (scan/remat per config)
    "Decoder": "blocks",                # embeddings + decoder layers + output logits
    "default_positions": "blocks",      # 0, 1, 2, ... per row, restarting at each segment
    # Attention and masks.
    "dot_product_attention": "attention",  # softmax(QKᵀ·scale + bias)·V on the fastest kernel
    "MultiHeadAttention": "multi_head_attention",  # projections, GQA, RoPE, window, KV cache
    "causal_mask": "masks",             # [1, 1, T, S] query t attends keys <= t (+ offset)
    "window_mask": "masks",             # [1, 1, T, S] keys within a local window
    "padding_mask": "masks",            # [B, 1, T, S] from valid query / key flags
    "segment_mask": "masks",            # [B, 1, T, S] same segment of a packed row, id 0 none
    "combine_masks": "masks",           # logical and of masks (None ignored)
    # Layers.
    "Embed": "layers",                  # token table; `attend` gives tied output logits
    "LearnedPositions": "layers",       # learned absolute position table (GPT-2, BERT)
    "sinusoidal_positions": "layers",   # the paper's fixed sin/cos position encoding
    "apply_rope": "layers",             # rotary position embedding of x_BTNH
    "RelativePositionBias": "layers",   # T5's bucketed relative-position attention bias
    "Norm": "layers",                   # LayerNorm or RMSNorm in float32 (optional bias)
    "FeedForward": "layers",            # position-wise MLP, plain or gated (GEGLU, SwiGLU)
    # Decoding.
    "Search": "decoding",               # greedy / sample / beam settings (a static jit arg)
    "generate_decoder_only": "decoding",  # prompts -> new tokens of a DecoderOnly
    "generate_encoder_decoder": "decoding",  # sources -> new tokens of an EncoderDecoder
    "pad_batch": "decoding",            # lists of token ids -> padded prompts, lengths, mask
    "attention_maps": "attention_weights",  # every layer's and head's weights for an input
    # Hugging Face checkpoints and LoRA.
    "from_hf": "pretrained",            # local HF folder -> (module, params), outputs matching
    "to_hf": "pretrained_export",       # (module or config, params) -> a folder HF loads
    "LoraConfig": "lora",               # which kernels get low-rank adapters, rank, alpha
    "lora": "lora",                     # lora.init, lora.merge: adapters as functions of params
    # Errors.
    "InputError": "errors",             # bad input: one sentence naming the thing and the fix
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'models' has no attribute {name!r}")
  module = importlib.import_module(f"models.{_PUBLIC[name]}")
  value = module if name == _PUBLIC[name] else getattr(module, name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
