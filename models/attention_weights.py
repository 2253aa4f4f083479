"""Every layer's and head's attention weights for an input, as arrays (attention maps).

`attention_maps` runs a forward pass with the "attention_weights" collection mutable, so each
`MultiHeadAttention` takes the reference path and sows its float32 softmax weights, and gathers
them by stack and kind, one array per (family, kind) with a leading layer axis:

  maps = attention_maps(model, params, tokens_BT)            # DecoderOnly
  maps["decoder"]["self"]                                     # [L, B, N, T, T]
  maps = attention_maps(model, params, source_BS, target_BT)  # EncoderDecoder
  maps["encoder"]["self"], maps["decoder"]["self"], maps["decoder"]["cross"]
  #   [L, B, N, S, S]          [L, B, N, T, T]          [L, B, N, T, S]

train/run/figures.py draws them (`plot_heads(maps["decoder"]["self"][layer, example], ...)`).
"""

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.multi_head_attention import WEIGHTS_COLLECTION

_UNROLLED_LAYER = re.compile(r"layers_(\d+)")
_SCANNED_LAYERS = "layers"


def attention_maps(module: nn.Module, params, *args, **kwargs) -> dict[str, dict[str, Any]]:
  """{family: {kind: weights [L, B, N, T, S]}} of one forward pass `module.apply(..., *args)`.

  Args:
    module: a model built on `models.multi_head_attention.MultiHeadAttention` (DecoderOnly,
      EncoderDecoder, EncoderOnly, ...), with unrolled (`layers_0`, `layers_1`, ...) or
      scanned (`layers`) stacks.
    params: the "params" collection (or a whole variables dict holding "params").
    *args, **kwargs: the model's call arguments, e.g. `tokens_BT, padding_mask=mask_BT`;
      `method=` picks another method, as in `module.apply`.

  Returns:
    family: the path of the stack's parent module ("encoder", "decoder"); kind: the attention
    sublayer's name without "_attention" ("self", "cross"). Each value is float32 [L, B, N, T, S]:
    layer, example, query head, query position, key position; every row sums to 1 over the keys
    the query may attend (masked keys get zero weight).
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"attention_maps needs a flax.linen Module, got {type(module).__name__}.")
  variables = params if isinstance(params, Mapping) and "params" in params else {"params": params}
  _, state = module.apply(variables, *args, mutable=[WEIGHTS_COLLECTION], **kwargs)
  sown = state.get(WEIGHTS_COLLECTION, {})
  if not sown:
    raise ValueError(f"{type(module).__name__} sowed no attention weights: attention_maps needs "
                     "models.multi_head_attention.MultiHeadAttention layers, which sow into "
                     f"the {WEIGHTS_COLLECTION!r} collection.")
  by_layer: dict[tuple[str, str], dict[int | None, Any]] = {}
  for path, weights in _sown_weights(sown, ()):
    family, kind, layer = _parse_path(path)
    by_layer.setdefault((family, kind), {})[layer] = weights
  maps: dict[str, dict[str, Any]] = {}
  for (family, kind), layers in by_layer.items():
    maps.setdefault(family, {})[kind] = _stack_layers(family, kind, layers)
  return maps


def _sown_weights(tree, path):
  """(module path, weights) for every sown "weights" entry in the collection."""
  for name, value in tree.items():
    if name == "weights" and isinstance(value, tuple):
      if len(value) != 1:
        raise ValueError(f"Attention {'/'.join(path)} ran {len(value)} times in one forward "
                         "pass; attention_maps expects each attention layer to run once.")
      yield path, value[0]
    elif isinstance(value, dict):
      yield from _sown_weights(value, path + (name,))


def _parse_path(path):
  """("decoder", "layers_1", "cross_attention") -> ("decoder", "cross", 1); scanned: None."""
  for i, name in enumerate(path):
    match = _UNROLLED_LAYER.fullmatch(name)
    if match or name == _SCANNED_LAYERS:
      family = "/".join(path[:i])
      kind = path[-1].removesuffix("_attention")
      return family, kind, int(match.group(1)) if match else None
  raise ValueError(f"Attention weights sown at {'/'.join(path)!r} are outside a layer stack "
                   "(`layers_<i>` or a scanned `layers`); attention_maps reads the stacks of "
                   "models.blocks.")


def _stack_layers(family, kind, layers):
  """[L, B, N, T, S]: the scanned stack as sown, or the unrolled layers stacked in order."""
  if None in layers:
    return layers[None]
  if sorted(layers) != list(range(len(layers))):
    raise ValueError(f"{family}/{kind} attention has layers {sorted(layers)}, not 0..L-1.")
  return jnp.stack([layers[i] for i in range(len(layers))])
