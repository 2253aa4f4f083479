"""Inference over a trained run (train.run.workdir, train.generate).

- Inputs are laid out as training lays them out: the tokens generate feeds the model equal
  the rows of the real grain pipelines for the same text, for every task.
- A T5 checkpoint decodes from its decoder_start_token_id, as transformers' generate does.
- Loading a run reads neither its data nor the training split; a missing tokenizer file is a
  clear error; importing the CLI pulls in no training machinery and defines no flags.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments import gpt2_small
from models import decoding, presets, pretrained
from train import generate
from train.data import pipeline, tokenizers
from train.engine import checkpoint, loop, tasks
from train.run import config as config_lib, run_tokenizers, workdir as workdir_lib

import cli_runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
BYTES = tokenizers.ByteTokenizer()
TINY = dict(vocab_size=BYTES.vocab_size, d_model=32, num_heads=4, d_ff=64, num_layers=2,
            max_len=64, dropout_rate=0.0)
PRESETS = {"lm": presets.gpt2, "seq2seq": presets.transformer_base,
           "classify": presets.bert_base, "mlm": presets.bert_base}
TEXT = "o gato sentou no tapete"
ONE_PASS = dict(batch_size=1, shuffle=False, num_epochs=1, process_index=0, process_count=1)


def tiny_run(task: str, with_model: bool = True) -> workdir_lib.Run:
  """A run of `task` with byte tokens and a tiny random model (every param perturbed)."""
  config = config_lib.base_config()
  config.task, config.model.num_classes = task, 3
  config.data.seq_len, config.data.inputs_len, config.data.targets_len = 32, 24, 24
  start = run_tokenizers.decoder_start_id(config.init_from, BYTES) if task == "seq2seq" else None
  if not with_model:
    return workdir_lib.Run(config, None, None, BYTES, BYTES, start)
  model = tasks.make_model(task, PRESETS[task](**TINY), num_classes=3)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, *tasks.init_inputs(task, config.data))))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32),
                        init(jax.random.key(0))["params"])
  return workdir_lib.Run(config, model, params, BYTES, BYTES, start)


def pipeline_row(task: str, config, text: str) -> dict[str, np.ndarray]:
  """Row 0 of the training pipeline's first batch for `text` (one example a row)."""
  d = config.data
  if task == "lm":
    make = pipeline.lm_pipeline([{"text": text}], BYTES, seq_len=d.seq_len, pack=False,
                                **ONE_PASS)
  elif task == "seq2seq":
    make = pipeline.seq2seq_pipeline([{"inputs": text, "targets": "x"}], BYTES,
                                     inputs_len=d.inputs_len, targets_len=d.targets_len,
                                     pack=False, **ONE_PASS)
  elif task == "classify":
    make = pipeline.classification_pipeline([{"text": text, "label": 1}], BYTES,
                                            seq_len=d.seq_len, **ONE_PASS)
  else:
    make = pipeline.mlm_pipeline([{"text": text}], BYTES, seq_len=d.seq_len, **ONE_PASS)
  return {key: value[0] for key, value in next(iter(make)).items()}


@pytest.mark.parametrize("task", ["lm", "seq2seq", "classify", "mlm"])
def test_generate_feeds_the_tokens_training_feeds(task):
  run = tiny_run(task, with_model=False)
  fed = workdir_lib.model_inputs(run, TEXT)
  row = pipeline_row(task, run.config, TEXT)
  if task == "lm":
    np.testing.assert_array_equal(fed["inputs"][0], row["inputs"][row["segment_ids"] > 0])
  elif task == "seq2seq":
    np.testing.assert_array_equal(fed["encoder_tokens"][0],
                                  row["encoder_tokens"][row["encoder_segment_ids"] > 0])
    assert fed["decoder_inputs"][0, 0] == row["decoder_inputs"][0]
  else:
    tokens = row["targets"] if task == "mlm" else row["tokens"]  # mlm: before masking.
    np.testing.assert_array_equal(fed["tokens"][0], tokens)
    np.testing.assert_array_equal(fed["padding_mask"][0], row["padding_mask"])
    np.testing.assert_array_equal(fed["token_types"][0], row["token_types"])


def test_mlm_masks_are_mask_ids_in_the_training_row():
  run = tiny_run("mlm", with_model=False)
  fed = workdir_lib.model_inputs(run, TEXT.replace("gato", "<mask>"))["tokens"][0]
  row = pipeline_row("mlm", run.config, TEXT.replace("gato", "g"))["targets"]
  np.testing.assert_array_equal(fed, np.where(np.arange(len(row)) == 3, BYTES.mask_id, row))


def test_classify_answer_is_the_model_on_the_training_row():
  run = tiny_run("classify")
  for text in (TEXT, f"{TEXT}, {TEXT}"):  # The second is cut to seq_len, as in training.
    row = pipeline_row("classify", run.config, text)
    logits = run.model.apply({"params": run.params}, row["tokens"][None],
                             padding_mask=row["padding_mask"][None],
                             token_types=row["token_types"][None])
    expected = np.asarray(jax.nn.softmax(logits[0]))
    probabilities = generate.answer_batch(run, [text], None, None)[0].probabilities
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6)
    assert generate.answer(run, text, None, None) == np.argmax(expected)


TEXTS = {"lm": ["o", TEXT, "gato", f"{TEXT}, {TEXT}", "tapete azul"],
         "classify": ["o", TEXT, "gato", f"{TEXT}, {TEXT}", "tapete azul"],
         "mlm": ["o <mask>", TEXT.replace("gato", "<mask>"), "<mask> gato <mask>"]}
TEXTS["seq2seq"] = TEXTS["lm"]


def unpadded_answer(run: workdir_lib.Run, text: str, search) -> generate.Answer:
  """An lm or seq2seq answer decoded from the text's own row: no padding, no mask."""
  batch = workdir_lib.model_inputs(run, text)
  if run.config.task == "seq2seq":
    out = decoding.generate_encoder_decoder(run.model, run.params, batch["encoder_tokens"],
                                            search,
                                            decoder_start_id=int(batch["decoder_inputs"][0, 0]))
    output = run.target_tokenizer.decode(np.asarray(out.tokens_BN)[0])
  else:
    out = decoding.generate_decoder_only(run.model, run.params, batch["inputs"], None, search)
    output = text + run.input_tokenizer.decode(np.asarray(out.tokens_BN)[0])
  return generate.Answer(text, output, float(out.logprobs_B[0]))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["lm", "seq2seq", "classify", "mlm"])
def test_a_batch_answers_as_one_input_at_a_time(task):
  run = tiny_run(task)
  greedy = dataclasses.replace(workdir_lib.decoding_search(run.config.decode, run.config.task,
                                                           run.config.data.targets_len,
                                                           run.target_tokenizer),
                               method="greedy", max_new_tokens=12)
  texts = TEXTS[task]
  batched = generate.answer_batch(run, texts, greedy, None, rows=8)
  if task in ("lm", "seq2seq"):
    alone = [unpadded_answer(run, text, greedy) for text in texts]
  else:  # Rows of seq_len, as training feeds them.
    alone = [generate.answer_batch(run, [text], greedy, None)[0] for text in texts]
  assert [a.input for a in batched] == texts
  assert [a.output for a in batched] == [a.output for a in alone]
  assert len({a.score for a in batched}) == len(texts)  # Each row its own answer.
  np.testing.assert_allclose([a.score for a in batched], [a.score for a in alone], rtol=1e-4)
  if task == "classify":
    np.testing.assert_allclose([a.probabilities for a in batched],
                               [a.probabilities for a in alone], rtol=1e-5)


@pytest.mark.slow
def test_the_score_is_the_log_probability_of_the_new_tokens():
  # Teacher forcing the answer through the whole model, with no cache and no padding.
  run = tiny_run("seq2seq")
  search = dataclasses.replace(workdir_lib.decoding_search(run.config.decode, run.config.task,
                                                           run.config.data.targets_len,
                                                           run.target_tokenizer),
                               max_new_tokens=6)
  for method in ("greedy", "beam"):
    answer = generate.answer_batch(run, [TEXT], dataclasses.replace(search, method=method),
                                   None)[0]
    tokens = list(generate.continuation(run, TEXT, dataclasses.replace(search, method=method),
                                        None))
    tokens = tokens[:tokens.index(BYTES.eos_id) + 1] if BYTES.eos_id in tokens else tokens
    batch = workdir_lib.model_inputs(run, TEXT, target=tokens[:-1])
    logits = run.model.apply({"params": run.params}, batch["encoder_tokens"],
                             batch["decoder_inputs"])[0, :len(tokens)]
    logprobs = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    assert answer.new_tokens == len(tokens)
    np.testing.assert_allclose(answer.score, logprobs[np.arange(len(tokens)), tokens].sum(),
                               rtol=1e-4)


def test_unknown_pieces_name_what_the_vocabulary_lacks(tmp_path):
  digits = tokenizers.HFTokenizer.train_or_load(str(tmp_path / "char.json"),
                                                lambda: ["0123456789"], level="char")
  assert workdir_lib.unknown_pieces(digits, "2026") == []
  assert workdir_lib.unknown_pieces(digits, "abc") == ["abc"]
  assert workdir_lib.unknown_pieces(digits, "12a3 4b") == ["a", "b", " "]
  assert workdir_lib.unknown_pieces(digits, "20 26") == [" "]
  words = tokenizers.HFTokenizer.train_or_load(str(tmp_path / "word.json"),
                                               lambda: ["dois mil e vinte"], level="word")
  assert workdir_lib.unknown_pieces(words, "dois  mil e vinte") == []
  assert workdir_lib.unknown_pieces(words, "dois gatos e vinte gatos") == ["gatos"]
  assert workdir_lib.unknown_pieces(BYTES, "abc ñ €") == []


@pytest.mark.slow
def test_t5_decodes_from_its_decoder_start_token_as_transformers(t5_config, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  asset = t5_config.init_from[len("hf:"):]
  # The random checkpoint answers pad to everything; with its output rows shuffled, answers
  # differ from input to input and from start token to start token.
  reference = transformers.T5ForConditionalGeneration.from_pretrained(asset)
  torch.manual_seed(0)
  with torch.no_grad():
    reference.lm_head.weight.copy_(reference.lm_head.weight[torch.randperm(
        reference.lm_head.weight.shape[0])])
  reference.save_pretrained(tmp_path)
  shutil.copy(pathlib.Path(asset) / "tokenizer.json", tmp_path)
  config = t5_config.copy_and_resolve_references()
  config.init_from = f"hf:{tmp_path}"
  model, params = pretrained.from_hf(str(tmp_path))
  tokenizer = tokenizers.tokenizer_for(str(tmp_path))
  run = workdir_lib.Run(config, model, params, tokenizer, tokenizer,
                        run_tokenizers.decoder_start_id(config.init_from, tokenizer))
  search = workdir_lib.decoding_search(config.decode, config.task, config.data.targets_len,
                                       tokenizer)
  assert search.method == "greedy"
  for text in ("2026", "15", "dois mil"):
    encoder_tokens = workdir_lib.model_inputs(run, text)["encoder_tokens"]
    expected = reference.generate(torch.tensor(encoder_tokens), do_sample=False, num_beams=1,
                                  max_new_tokens=search.max_new_tokens)[0].numpy()
    assert expected[0] == reference.config.decoder_start_token_id == 0
    ours = generate.continuation(run, text, search, None)
    np.testing.assert_array_equal(ours[:len(expected) - 1], expected[1:])


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
  """A tiny GPT-2 run on a copy of the bundled corpus, with a char tokenizer trained on it."""
  folder = tmp_path_factory.mktemp("lm")
  corpus = folder / "corpus.txt"
  shutil.copy(ROOT / "experiments" / "data" / "tiny_corpus.txt", corpus)
  config = gpt2_small.get_config("tiny")
  config.data.source, config.data.tokenizer = f"local:{corpus}", "char"
  loop.train_and_evaluate(config, str(folder / "run"))
  return folder / "run", corpus


@pytest.mark.slow
def test_loading_a_run_reads_no_data(trained_lm, tmp_path):
  workdir, corpus = trained_lm
  before = workdir_lib.load(str(workdir))
  search = workdir_lib.decoding_search(before.config.decode, before.config.task,
                                       before.config.data.targets_len, before.target_tokenizer)
  expected = generate.answer(before, "The cat", search, jax.random.key(0))
  moved = tmp_path / "run"
  shutil.copytree(workdir, moved)
  shutil.rmtree(moved / "data")  # The prepared dataset...
  corpus.rename(tmp_path / "elsewhere.txt")  # ...and its source are gone.
  try:
    run = workdir_lib.load(str(moved))
    assert generate.answer(run, "The cat", search, jax.random.key(0)) == expected
  finally:
    (tmp_path / "elsewhere.txt").rename(corpus)
  assert expected.startswith("The cat") and len(expected) > len("The cat")

  (moved / "tokenizers" / "inputs.json").unlink()
  with pytest.raises(ValueError, match=f"{moved / 'tokenizers' / 'inputs.json'}.*missing"):
    workdir_lib.load(str(moved))


@pytest.mark.slow
def test_loading_a_run_traces_no_model_init(trained_lm, monkeypatch):
  # The params' layout is the checkpoint's: building the model's own (a trace of its init,
  # about a second of a cold start) is only needed to rebuild an adapter-only run's base.
  expected = checkpoint.load_params(trained_lm[0])
  def init(*args, **kwargs):
    raise AssertionError("workdir.load traced the model's init")
  monkeypatch.setattr(nn.Module, "init", init)
  run = workdir_lib.load(str(trained_lm[0]))
  assert jax.tree.map(np.shape, run.params) == jax.tree.map(np.shape, expected)


@pytest.mark.slow
def test_the_cli_answers_a_file_in_batches_as_json_lines(trained_lm, tmp_path):
  workdir, _ = trained_lm
  run = workdir_lib.load(str(workdir))
  assert run.input_tokenizer.unk_id in run.input_tokenizer.encode("ж")  # Not in the corpus.
  texts = ["The cat", "A dog sat", "The жat", "Once", "The end"]
  inputs, outputs = tmp_path / "in.txt", tmp_path / "out.jsonl"
  inputs.write_text("\n".join(texts) + "\n")
  (tmp_path / "blank.txt").write_text("The cat\n\nA dog\n")
  common = (f"--workdir={workdir}", "--method=greedy", f"--input_file={inputs}")
  # The first run at the codegen level a user gets (the CLI's own -O1 on the CPU), not the
  # tests' -O0: its answers must still be those of answer_batch in this process.
  users_flags = re.sub(r"--xla_backend_optimization_level=\d+", "", os.environ["XLA_FLAGS"])
  answering, printing, refusing = cli_runs.run_all(
      [("train.generate", [*common, f"--output_file={outputs}", "--batch_size=2"]),
       ("train.generate", common),
       ("train.generate", [f"--workdir={workdir}", f"--input_file={tmp_path / 'blank.txt'}"])],
      tmp_path / "runs", {**os.environ, "TAPETE_CACHE": str(tmp_path / "cache")},
      extra_env=[{"XLA_FLAGS": users_flags.strip()}, {}, {}])
  stderr = answering.stderr
  assert answering.returncode == 0, stderr
  greedy = dataclasses.replace(workdir_lib.decoding_search(run.config.decode, run.config.task,
                                                           run.config.data.targets_len,
                                                           run.target_tokenizer),
                               method="greedy")
  expected = generate.answer_batch(run, texts, greedy, None)
  answers = [json.loads(line) for line in outputs.read_text().splitlines()]
  assert [set(a) for a in answers] == [{"input", "output", "score"}] * len(texts)
  assert [a["input"] for a in answers] == texts
  assert [a["output"] for a in answers] == [a.output for a in expected]
  np.testing.assert_allclose([a["score"] for a in answers], [a.score for a in expected],
                             rtol=1e-4)
  warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and f"line 3 of {inputs}" in warnings[0] and "'ж'" in warnings[0]
  generated = sum(a.new_tokens for a in expected)
  assert re.search(rf"5 inputs in .* s of decoding .*batches of 2\): {generated} tokens "
                   r"generated, [\d,]+ tokens/s", stderr), stderr

  assert printing.returncode == 0, printing.stderr
  # Batches of 64: other rounding.
  printed = [json.loads(line) for line in printing.stdout.splitlines()]
  assert [a["output"] for a in printed] == [a["output"] for a in answers]
  np.testing.assert_allclose([a["score"] for a in printed], [a["score"] for a in answers],
                             rtol=1e-5)

  stderr = refusing.stderr
  assert refusing.returncode == 2 and "Traceback" not in stderr, stderr
  assert stderr.splitlines()[-1] == (f"error: The input on line 2 of {tmp_path / 'blank.txt'} is "
                                     "empty: give the model some text to answer.")


LIGHT_CHECK = """
import sys
from absl import flags
import jax
import train.generate, train.attention_maps, train.run.workdir
print(sorted(m for m in {heavy} if m in sys.modules))
print(sorted(f for f in ("workdir", "input", "method", "out", "kind") if f in flags.FLAGS))
run = train.run.workdir.load(sys.argv[1])
search = train.run.workdir.decoding_search(run.config.decode, run.config.task,
                                           run.config.data.targets_len, run.target_tokenizer)
train.generate.answer(run, "The cat", search, jax.random.key(0))
print(sorted(m for m in {loaded} if m in sys.modules))
"""


@pytest.mark.slow
def test_inference_imports_no_training_machinery_and_defines_no_flags(trained_lm):
  heavy = ("torch", "tensorboardX", "optax", "train.engine.loop")
  loaded = ("torch", "tensorboardX", "train.engine.loop", "train.run.inputs", "tensorflow_datasets")
  code = LIGHT_CHECK.format(heavy=heavy, loaded=loaded)
  out = subprocess.run([sys.executable, "-c", code, str(trained_lm[0])], cwd=ROOT, text=True,
                       capture_output=True, check=True).stdout
  assert out.splitlines() == ["[]", "[]", "[]"]


@pytest.mark.slow
def test_the_generate_benchmark_runs_in_its_tiny_mode(quickstart_tiny_cli, tmp_path):
  workdir = tmp_path / "quickstart"  # conftest.quickstart_tiny_cli's run, not trained again
  shutil.copytree(quickstart_tiny_cli[0], workdir)
  stdout = subprocess.run([sys.executable, "-m", "benchmarks.generate", "--tiny",
                           f"--workdir={workdir}"], cwd=ROOT, text=True, capture_output=True,
                          check=True, timeout=600).stdout
  for line in ("one input, cold compilation cache: [\\d.]+ s wall, [\\d.]+ s CPU",
               "one input, warm compilation cache: [\\d.]+ s wall",
               "20 inputs, batches of 64: [\\d.]+ s wall, [\\d.]+ s CPU; train.generate says: "
               "20 inputs in .* tokens/s"):
    assert re.search(line, stdout), stdout
