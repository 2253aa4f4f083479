"""Figures of a model's attention: one layer's heads as a grid of heatmaps.

The weights are those of models/attention_weights.py. Figures are drawn on matplotlib's Agg
canvas (no screen, no pyplot, no global backend change).
"""

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_heads(weights_NTS, query_tokens: Sequence[str], key_tokens: Sequence[str], *,
               title: str | None = None, max_cols: int = 4) -> Figure:
  """One layer's heads as a grid of heatmaps: x the keys, y the queries, colour 0..1.

  Example (a DecoderOnly whose tokenizer splits words):

    tokens = "gato sentou no tapete".split()          # ["gato", "sentou", "no", "tapete"]
    maps = attention_maps(model, params, token_ids_1T)
    fig = plot_heads(maps["decoder"]["self"][0, 0], tokens, tokens, title="layer 0")
    save_attention_figure("layer0.png", maps["decoder"]["self"][0, 0], tokens, tokens)
  """
  weights_NTS = np.asarray(weights_NTS, dtype=np.float32)
  if weights_NTS.ndim != 3:
    raise ValueError(f"plot_heads takes one layer and one example, weights [N, T, S]; got shape "
                     f"{weights_NTS.shape}. Index maps[family][kind][layer, example].")
  num_heads, q_len, kv_len = weights_NTS.shape
  if len(query_tokens) != q_len or len(key_tokens) != kv_len:
    raise ValueError(f"Weights [N, T, S] = {weights_NTS.shape} need {q_len} query tokens and "
                     f"{kv_len} key tokens; got {len(query_tokens)} and {len(key_tokens)}.")
  if max_cols < 1:
    raise ValueError(f"max_cols must be at least 1, got {max_cols}.")
  cols = min(num_heads, max_cols)
  rows = math.ceil(num_heads / cols)
  panel = 1.5 + 0.3 * max(q_len, kv_len)
  fig = Figure(figsize=(cols * panel + 1.0, rows * panel + (0.5 if title else 0.0)),
               layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False)
  for head, ax in enumerate(axes.flat):
    if head >= num_heads:
      fig.delaxes(ax)
      continue
    image = ax.imshow(weights_NTS[head], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_title(f"head {head}")
    ax.set_xticks(range(kv_len), labels=list(key_tokens), rotation=90)
    ax.set_yticks(range(q_len), labels=list(query_tokens))
  fig.colorbar(image, ax=axes.ravel()[:num_heads].tolist(), label="attention weight")
  fig.supxlabel("key")
  fig.supylabel("query")
  if title:
    fig.suptitle(title)
  return fig


def save_attention_figure(path: str | os.PathLike, weights_NTS, query_tokens: Sequence[str],
                          key_tokens: Sequence[str], *, title: str | None = None,
                          max_cols: int = 4, dpi: int = 100) -> str:
  """Draws `plot_heads(...)` and writes it as a PNG at `path` (folders created); returns path."""
  fig = plot_heads(weights_NTS, query_tokens, key_tokens, title=title, max_cols=max_cols)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, format="png", dpi=dpi)
  return path
