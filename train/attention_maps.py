"""Draw a trained model's attention for one input as a grid of per-head heatmaps.

  python -m train.attention_maps --workdir=DIR --input=TEXT --out=FILE.png [--kind=cross]

seq2seq: the input is encoded, the answer decoded greedily, and the chosen attention (cross
by default: which input tokens each output word looks at) drawn over input and answer;
lm / classify / mlm: the self-attention over the input (its padding left out). The input is
laid out as in training (`workdir.model_inputs`).
"""

import dataclasses
import os

from absl import flags
import jax.numpy as jnp
import numpy as np

from models.attention_weights import attention_maps
from models.errors import InputError, named_path
from train import generate
from train.run import cli, figures, workdir as workdir_lib

FLAGS = flags.FLAGS
KINDS = ("self", "cross", "encoder")


@dataclasses.dataclass(frozen=True)
class HeadMaps:
  """One layer's attention for one input: weights [N, T, S] and the tokens they relate."""
  weights_NTS: np.ndarray
  query_labels: list[str]
  key_labels: list[str]
  title: str


def head_maps(run: workdir_lib.Run, text: str, kind: str | None = None,
              layer: int = -1) -> HeadMaps:
  """The attention of layer `layer` for `text`; `kind` (seq2seq) one of KINDS."""
  batch = workdir_lib.model_inputs(run, text)
  task = run.config.task
  if task != "seq2seq":
    if kind not in (None, "self"):
      raise InputError(f"--kind={kind} needs a seq2seq run; this one is {task}.")
    if task == "lm":
      tokens, kwargs = batch["inputs"], {}
    else:
      tokens, kwargs = batch["tokens"], {k: jnp.asarray(batch[k])
                                         for k in ("padding_mask", "token_types")}
    length = int(batch["padding_mask"].sum()) if kwargs else tokens.shape[1]
    maps = attention_maps(run.model, run.params, jnp.asarray(tokens), **kwargs)
    family, kind_key = next(iter(maps)), "self"
    weights = maps[family][kind_key][:, 0, :, :length, :length]
    queries = keys = workdir_lib.token_labels(run.input_tokenizer, tokens[0, :length])
  else:
    search = dataclasses.replace(workdir_lib.decoding_search(run.config.decode, run.config.task,
                                                             run.config.data.targets_len,
                                                             run.target_tokenizer),
                                 method="greedy")
    answer = list(generate.continuation(run, text, search, rng=None))
    stops = [i for i, token in enumerate(answer) if token in (search.eos_id or ())]
    answer = answer[:stops[0]] if stops else answer
    batch = workdir_lib.model_inputs(run, text, target=answer)
    maps = attention_maps(run.model, run.params, jnp.asarray(batch["encoder_tokens"]),
                          jnp.asarray(batch["decoder_inputs"]))
    source_labels = workdir_lib.token_labels(run.input_tokenizer, batch["encoder_tokens"][0])
    target_labels = workdir_lib.token_labels(run.target_tokenizer, batch["decoder_inputs"][0])
    kind = kind or "cross"
    family, kind_key = ("encoder", "self") if kind == "encoder" else ("decoder", kind)
    weights = maps[family][kind_key][:, 0]
    queries = source_labels if kind == "encoder" else target_labels
    keys = target_labels if kind == "self" else source_labels
  num_layers = weights.shape[0]
  if not -num_layers <= layer < num_layers:
    raise InputError(f"--layer={layer}: the model has {num_layers} layers (0..{num_layers - 1}).")
  title = f"{family} {kind_key}-attention, layer {layer % num_layers}: {text!r}"
  return HeadMaps(np.asarray(weights[layer]), queries, keys, title)


def define_flags():
  """The flags of `python -m train.attention_maps`, defined when it runs (not on import)."""
  cli.define_workdir_flags()
  flags.adopt_module_key_flags(cli)  # --help lists --workdir and --input too.
  flags.DEFINE_string("out", None, "PNG file to write.")
  flags.DEFINE_enum("kind", None, KINDS,
                    "seq2seq: cross (default), decoder self, or encoder self-attention.")
  flags.DEFINE_integer("layer", -1, "Layer to draw; -1 = the last.")
  flags.mark_flags_as_required(["out"])


def check_out(path: str):
  """--out must be a file that can be written: not a folder, nor inside a file."""
  if os.path.isdir(path):
    raise InputError(f"--out={path} is a folder; give the PNG file to write, such as "
                     f"--out={os.path.join(path, 'attention.png')}.")
  parent = os.path.dirname(path)
  if parent and os.path.exists(parent) and not os.path.isdir(parent):
    raise InputError(f"--out={path}: {parent} is a file, not a folder; give a PNG file in a "
                     "folder.")


def draw(run: workdir_lib.Run, texts: list[str]):
  if len(texts) != 1:
    raise InputError("train.attention_maps draws one input: give --input once.")
  maps = head_maps(run, texts[0], FLAGS.kind, FLAGS.layer)
  with named_path(f"--out={FLAGS.out}"):
    path = figures.save_attention_figure(FLAGS.out, maps.weights_NTS, maps.query_labels,
                                         maps.key_labels, title=maps.title)
  print(f"Wrote {path}")


def main(argv):
  del argv
  cli.guarded(check_out)(FLAGS.out)
  cli.answer_inputs(draw)


if __name__ == "__main__":
  define_flags()
  cli.run(main, cli.parse_flags)
