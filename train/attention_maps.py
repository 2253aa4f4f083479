"""Draw a trained model's attention for one input as a grid of per-head heatmaps.

  python -m train.attention_maps --workdir=DIR --input=TEXT --out=FILE.png [--kind=cross]

seq2seq: the input is encoded, the answer decoded greedily, and the chosen attention (cross
by default: which input tokens each output word looks at) drawn over input and answer;
lm / classify / mlm: the self-attention over the input.
"""

import sys

from absl import app, flags
import jax.numpy as jnp
import numpy as np

from models import decoding
from models.attention_maps import attention_maps, save_attention_figure
from train import loop, workdir as workdir_lib
from train.data.examples import bos_eos

_OUT = flags.DEFINE_string("out", None, "PNG file to write.")
_KIND = flags.DEFINE_enum("kind", None, ["self", "cross", "encoder"],
                          "seq2seq: cross (default), decoder self, or encoder self-attention.")
_LAYER = flags.DEFINE_integer("layer", -1, "Layer to draw; -1 = the last.")
flags.mark_flags_as_required(["workdir", "input", "out"])


def draw(exp, params, text: str, out: str, kind: str | None, layer: int) -> str:
  source = workdir_lib.encode_source(exp, text)
  source_labels = workdir_lib.token_labels(exp.inputs.input_tokenizer, source[0])
  if exp.config.task != "seq2seq":
    if kind not in (None, "self"):
      raise ValueError(f"--kind={kind} needs a seq2seq run; this one is {exp.config.task}.")
    maps = attention_maps(exp.task.model, params, jnp.asarray(source))
    family, kind_key = next(iter(maps)), "self"
    queries = keys = source_labels
  else:
    tokenizer = exp.inputs.target_tokenizer
    start = bos_eos(tokenizer)[0]
    search = loop.decoding_search(exp.config, tokenizer)
    answer = np.asarray(decoding.generate_encoder_decoder(
        exp.task.model, params, jnp.asarray(source), decoding.Search(
            method="greedy", max_new_tokens=search.max_new_tokens, eos_id=search.eos_id,
            pad_id=search.pad_id), decoder_start_id=start).tokens_BN)[0]
    if search.eos_id in answer:
      answer = answer[:list(answer).index(search.eos_id) + 1]
    target = np.asarray([[start] + list(answer[:-1])], np.int32)
    maps = attention_maps(exp.task.model, params, jnp.asarray(source), jnp.asarray(target))
    target_labels = workdir_lib.token_labels(tokenizer, target[0])
    kind = kind or "cross"
    family, kind_key = ("encoder", "self") if kind == "encoder" else ("decoder", kind)
    queries = source_labels if kind == "encoder" else target_labels
    keys = target_labels if kind == "self" else source_labels
  weights = maps[family][kind_key]
  num_layers = weights.shape[0]
  if not -num_layers <= layer < num_layers:
    raise ValueError(f"--layer={layer}: the model has {num_layers} layers (0..{num_layers - 1}).")
  title = f"{family} {kind_key}-attention, layer {layer % num_layers}: {text!r}"
  return save_attention_figure(out, np.asarray(weights[layer, 0]), queries, keys, title=title)


def main(argv):
  del argv
  workdir_lib.quiet()
  try:
    if len(workdir_lib.INPUT.value) != 1:
      raise ValueError("train.attention_maps draws one input: give --input once.")
    exp, params = workdir_lib.load(workdir_lib.WORKDIR.value)
    text = workdir_lib.INPUT.value[0]
    print(f"Wrote {draw(exp, params, text, _OUT.value, _KIND.value, _LAYER.value)}")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
