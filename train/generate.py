"""Answer from a trained workdir, in batches.

  python -m train.generate --workdir=DIR --input=TEXT [--input=TEXT ...]
  python -m train.generate --workdir=DIR --input_file=FILE [--output_file=OUT.jsonl]
      [--batch_size=64] [--method=beam --beam_size=4 ...]

Writes one JSON object a line per input, in order (to --output_file, else stdout):
{"input", "output", "score"}, and for classify {"probabilities"}. seq2seq: the output is the
decoded target; lm: the prompt and its continuation (the response alone for a run on
prompt -> response pairs, data.source_options.task="instruct"; for a run on conversations,
task="chat", the assistant's answer alone to the input as a user turn, or to a JSON
{"messages": [...]} conversation ending on one, rendered by the run's chat template with its
generation prompt, decoding stopping at the template's end of turn as well as EOS); classify:
the most likely label (an int); mlm: the input with each "<mask>" filled in. The score is the
model's log-probability of what it added: the new tokens, EOS included (seq2seq, lm), the label
(classify), the filled tokens (mlm). Decoding settings default to the run's `config.decode`.
Inputs are laid out as in training (`workdir.model_inputs`) and decoded `--batch_size` at a
time; stderr gets the tokens/s, and a warning naming what an input holds that the vocabulary
lacks. An empty input is an error.
"""

import dataclasses
import functools
import json
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from models.errors import InputError, named_path
from train.data import examples
from train.run import cli, compilation_cache, workdir as workdir_lib, xla_flags

FLAGS = flags.FLAGS
SEARCH_FLAGS = ("method", "beam_size", "temperature", "top_k", "top_p", "max_new_tokens")
WARNINGS_SHOWN = 10  # per-input warnings printed before the rest are only counted


@dataclasses.dataclass(frozen=True)
class Answer:
  """A run's answer to one input text."""
  input: str
  output: str | int
  score: float                              # log-probability of what the model added
  probabilities: list[float] | None = None  # classify: of each label
  new_tokens: int = 0                       # seq2seq, lm: tokens generated, EOS included

  def to_json(self) -> str:
    fields = {"input": self.input, "output": self.output, "score": self.score}
    if self.probabilities is not None:
      fields["probabilities"] = self.probabilities
    return json.dumps(fields, ensure_ascii=False)


def answer_batch(run: workdir_lib.Run, texts: list[str], search: decoding.Search, rng,
                 rows: int | None = None) -> list[Answer]:
  """The run's answers to `texts`, decoded as one batch of `rows` (default: len(texts)) rows;
  rows past the texts repeat the first (a fixed batch shape compiles once)."""
  rows = rows or len(texts)
  if not 1 <= len(texts) <= rows:
    raise ValueError(f"answer_batch takes 1 to rows={rows} texts, got {len(texts)}.")
  task = run.config.task
  if task in ("seq2seq", "lm"):
    out = jax.tree.map(np.asarray, _decode(run, texts, search, rng, rows))
    tokenizer = run.target_tokenizer if task == "seq2seq" else run.input_tokenizer
    echo = task == "lm" and not (examples.instruct(run.config.data) or run.chat_template)
    return [Answer(text, (text if echo else "") + tokenizer.decode(tokens),
                   float(logprob), new_tokens=int(length))
            for text, tokens, length, logprob in zip(
                texts, out.tokens_BN, out.lengths_B, out.logprobs_B)]
  batch = _padded_rows([workdir_lib.model_inputs(run, text) for text in texts], rows)
  logprobs_BTV = np.asarray(_encoder_logprobs(run.model, run.params, batch))[:len(texts)]
  if task == "classify":
    return [Answer(text, int(np.argmax(logprobs)), float(np.max(logprobs)),
                   probabilities=np.exp(logprobs).tolist())
            for text, logprobs in zip(texts, logprobs_BTV)]
  return [_filled(run, text, tokens, logprobs)
          for text, tokens, logprobs in zip(texts, batch["tokens"], logprobs_BTV)]


def answer(run: workdir_lib.Run, text: str, search: decoding.Search, rng) -> str | int:
  """The run's output for one input text."""
  return answer_batch(run, [text], search, rng)[0].output


def continuation(run: workdir_lib.Run, text: str, search: decoding.Search, rng) -> np.ndarray:
  """The new tokens of an lm or seq2seq run for one text (EOS, then padding, ends them)."""
  return np.asarray(_decode(run, [text], search, rng, 1).tokens_BN)[0]


def _decode(run: workdir_lib.Run, texts: list[str], search: decoding.Search, rng, rows: int):
  """Decoded or BeamSearchOutput of an lm or seq2seq run for `texts`, in a batch of `rows`."""
  fill = [texts[0]] * (rows - len(texts))
  inputs = [workdir_lib.model_inputs(run, text) for text in texts + fill]
  if run.config.task == "seq2seq":
    batch = decoding.pad_batch([x["encoder_tokens"][0] for x in inputs],
                               pad_id=run.input_tokenizer.pad_id,
                               width=run.config.data.inputs_len)
    return decoding.generate_encoder_decoder(
        run.model, run.params, batch.tokens_BT, search,
        encoder_padding_mask_BS=batch.padding_mask_BT,
        decoder_start_id=int(inputs[0]["decoder_inputs"][0, 0]), rng=rng)
  prompts = [x["inputs"][0] for x in inputs]
  batch = decoding.pad_batch(prompts, pad_id=run.input_tokenizer.pad_id,
                             width=_prompt_width(run, max(map(len, prompts)), search))
  return decoding.generate_decoder_only(run.model, run.params, batch.tokens_BT,
                                        batch.lengths_B, search, rng)


def _prompt_width(run: workdir_lib.Run, longest: int, search: decoding.Search) -> int:
  """The longest prompt rounded up to a multiple of 16 (fewer shapes to compile), where the
  position table has room for it and the new tokens."""
  cfg = run.model.cfg
  room = cfg.max_len - search.max_new_tokens + 1 if cfg.position == "learned" else None
  rounded = -(-longest // 16) * 16
  return rounded if room is None or rounded <= room else longest


def _padded_rows(batches: list[dict], rows: int) -> dict[str, np.ndarray]:
  """model_inputs batches of one (classify, mlm rows of seq_len) as one batch of `rows`."""
  batches = batches + [batches[0]] * (rows - len(batches))
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


@functools.partial(jax.jit, static_argnums=0)
def _encoder_logprobs(model, params, batch: dict) -> jax.Array:
  """Log-probabilities of an encoder-only run (classify: [B, labels]; mlm: [B, T, V])."""
  logits = model.apply({"params": params}, batch["tokens"], padding_mask=batch["padding_mask"],
                       token_types=batch["token_types"])
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _filled(run: workdir_lib.Run, text: str, tokens_T: np.ndarray,
            logprobs_TV: np.ndarray) -> Answer:
  """An mlm answer: `text` with each mask id replaced by the most likely token."""
  masked_T = tokens_T == run.input_tokenizer.mask_id
  if not masked_T.any():
    raise InputError(f"An mlm run fills in masks: write {workdir_lib.MASK} where a token is "
                     f"missing in the input {text!r}.")
  best_T = logprobs_TV.argmax(-1)
  filled_T = np.where(masked_T, best_T, tokens_T)
  score = logprobs_TV.max(-1)[masked_T].sum()
  return Answer(text, run.input_tokenizer.decode(filled_T), float(score))


# ---------------------------------------------------------------------------------------
# The CLI


def define_flags():
  """The flags of `python -m train.generate`, defined when it runs (not on import)."""
  cli.define_workdir_flags(input_required=False)
  flags.adopt_module_key_flags(cli)  # --help lists --workdir and --input too.
  flags.DEFINE_string("input_file", None, "A file of inputs, one a line (instead of --input).")
  flags.DEFINE_string("output_file", None, "Where to write the answers (JSONL); default stdout.")
  flags.DEFINE_integer("batch_size", 64, "Inputs decoded at once.")
  flags.DEFINE_enum("method", None, decoding.METHODS, "Decoding method.")
  flags.DEFINE_integer("beam_size", None, "Beam size.")
  flags.DEFINE_float("temperature", None, "Sampling temperature.")
  flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
  flags.DEFINE_float("top_p", None, "Sample from the smallest set of mass top_p.")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (batch i samples with fold_in(seed, i)).")


def search_from_flags(run: workdir_lib.Run) -> decoding.Search:
  """The run's `config.decode`, with the decoding flags given on the command line."""
  search = workdir_lib.decoding_search(run.config.decode, run.config.task,
                                       run.config.data.targets_len, run.target_tokenizer,
                                       run.chat_template)
  changes = {name: FLAGS[name].value for name in SEARCH_FLAGS if FLAGS[name].value is not None}
  return dataclasses.replace(search, **changes)


def read_inputs() -> tuple[list[str], list[str]]:
  """(texts, where each came from) of --input or --input_file; an empty one is an error."""
  if bool(FLAGS.input) == bool(FLAGS.input_file):
    raise InputError("Give the inputs either as --input=TEXT (repeat for several) or as "
                     "--input_file=FILE (one a line).")
  if FLAGS.batch_size < 1:
    raise InputError(f"--batch_size={FLAGS.batch_size}: decode at least 1 input at a time.")
  if FLAGS.input:
    texts = list(FLAGS.input)
    where = [f"--input number {i}" for i in range(1, len(texts) + 1)]
  else:
    with named_path(f"--input_file={FLAGS.input_file}"):
      with open(FLAGS.input_file, encoding="utf-8") as f:
        texts = f.read().splitlines()
    if not texts:
      raise InputError(f"--input_file={FLAGS.input_file} is empty: write one input a line.")
    where = [f"line {i} of {FLAGS.input_file}" for i in range(1, len(texts) + 1)]
  for text, place in zip(texts, where):
    if not text.strip():
      raise InputError(f"The input on {place} is empty: give the model some text to answer.")
  return texts, where


def warn_about_unknowns(run: workdir_lib.Run, texts: list[str], where: list[str]):
  """A warning on stderr for each input holding what the vocabulary lacks (the first few)."""
  warned = 0
  for text, place in zip(texts, where):
    pieces = workdir_lib.unknown_pieces(run.input_tokenizer, text.replace(workdir_lib.MASK, " "))
    if pieces:
      warned += 1
      if warned <= WARNINGS_SHOWN:
        print(f"warning: the input on {place} holds what the vocabulary lacks: "
              f"{', '.join(map(repr, pieces))} (read as unknown tokens, or dropped).",
              file=sys.stderr)
  if warned > WARNINGS_SHOWN:
    print(f"warning: {warned - WARNINGS_SHOWN} more inputs hold what the vocabulary lacks.",
          file=sys.stderr)


def write_answers(run: workdir_lib.Run, texts: list[str], where: list[str]):
  """Answers every input in batches, as JSON lines; tokens/s on stderr."""
  search = search_from_flags(run)
  if run.config.task == "mlm":
    for text, place in zip(texts, where):
      if workdir_lib.MASK not in text:
        raise InputError(f"An mlm run fills in masks: the input on {place} has none; write "
                         f"{workdir_lib.MASK} where a token is missing.")
  warn_about_unknowns(run, texts, where)
  rows = min(FLAGS.batch_size, len(texts))
  seed = jax.random.key(FLAGS.seed) if search.method == "sample" else None
  seconds, new_tokens = 0.0, 0
  out = open(FLAGS.output_file, "w", encoding="utf-8") if FLAGS.output_file else sys.stdout
  try:
    for i, start in enumerate(range(0, len(texts), rows)):
      began = time.perf_counter()
      rng = None if seed is None else jax.random.fold_in(seed, i)
      answers = answer_batch(run, texts[start:start + rows], search, rng, rows)
      seconds += time.perf_counter() - began
      new_tokens += sum(a.new_tokens for a in answers)
      out.write("".join(a.to_json() + "\n" for a in answers))
      out.flush()
  finally:
    if out is not sys.stdout:
      out.close()
  rate = (f"{new_tokens:,} tokens generated, {new_tokens / seconds:,.0f} tokens/s"
          if new_tokens else f"{len(texts) / seconds:,.1f} inputs/s")
  print(f"{len(texts):,} inputs in {seconds:.2f} s of decoding (compilation included, batches "
        f"of {rows}): {rate}.", file=sys.stderr)


def main(argv):
  del argv
  texts, where = cli.guarded(read_inputs)()
  xla_flags.compile_quickly_on_cpu()
  compilation_cache.use()
  cli.answer_inputs(lambda run, _: write_answers(run, texts, where))


if __name__ == "__main__":
  define_flags()
  cli.run(main, cli.parse_flags)
