"""The training system from the outside: the CLIs, every experiment, config errors.

- `python -m train` runs the quickstart's tiny variant end to end (a subprocess, as a user
  types it); `train.generate` answers from its workdir (tests/test_readme.py draws its
  attention maps with the README's `train.attention_maps` command).
- The other experiments' tiny variants train in-process (8 forced CPU devices) and answer.
- The real-data configs (WMT14, lm1b) run on `tfds.testing.mock_data`, shrunk by overrides.
- Bad flags and configs end with one `error:` line naming the problem, no traceback, and
  nothing trained.

Workdir files are checked against readers we did not write: `json` and TensorBoard's `Event`
protobuf (via tensorboardX's copy of the schema).
"""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import struct
import subprocess
import sys

from absl import flags
import jax
import numpy as np
import pytest
from ml_collections import config_flags
import tensorflow_datasets as tfds
from tensorboardX.proto import event_pb2

from train import generate
from train.data import pipeline
from train.engine import loop
from train.run import validation, workdir as workdir_lib

import cli_runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART_TINY = "experiments/quickstart.py:tiny"


def cli_env() -> dict:
  """The subprocesses' environment: CPU with one device, as on a laptop."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  return env


def load_experiment(name: str):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}",
                                                ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def read_scalars(tensorboard_dir: pathlib.Path) -> dict:
  """{(tag, step): value} of every event file, records framed as TFRecords (len, crc, data, crc)."""
  scalars = {}
  for path in sorted(tensorboard_dir.glob("**/events.out.tfevents*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars[value.tag, event.step] = value.simple_value
  return scalars


def check_workdir(workdir: pathlib.Path, config, eval_keys=()) -> list[dict]:
  """config.json, metrics.jsonl, TensorBoard events and checkpoints of a finished run."""
  with open(workdir / "config.json") as f:
    resolved = json.load(f)
  assert resolved["model"]["vocab_size"] > 0
  assert resolved["task"] == config.task
  assert resolved["train"]["num_steps"] == config.train.num_steps

  lines = read_metrics(workdir)
  t = config.train
  for line in lines:
    assert {"step", "split", "loss"} <= set(line), line
    assert math.isfinite(line["loss"])
  train = [line for line in lines if line["split"] == "train"]
  evals = [line for line in lines if line["split"] == "eval"]
  train_steps = [line["step"] for line in train]
  assert train_steps == sorted(set(train_steps))
  assert {*range(t.log_every, t.num_steps + 1, t.log_every), t.num_steps} <= set(train_steps)
  assert {"learning_rate", "grad_norm", "accuracy"} <= set(train[-1])
  assert evals and evals[-1]["step"] == t.num_steps
  assert set(eval_keys) <= set(evals[-1]), evals[-1]

  scalars = read_scalars(workdir / "tensorboard")
  for line in lines:
    for name, value in line.items():
      if name not in ("step", "split"):
        assert scalars[f"{line['split']}/{name}", line["step"]] == pytest.approx(value, rel=1e-6)

  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  expected = [s for s in range(1, t.num_steps + 1) if s % t.checkpoint_every == 0]
  assert steps == sorted({*expected, t.num_steps})[-t.keep_checkpoints:]
  return lines


@pytest.mark.pretrained
def test_the_tensorboard_writer_writes_events_without_importing_torch(tmp_path):
  """tensorboardX imports torch, where it is installed (as here), unless train.engine.metrics hides
  it: a second of every run's start-up."""
  script = (f"import sys; from train.engine import metrics; "
            f"w = metrics.MetricsWriter({str(tmp_path)!r},"
            " num_steps=2, start_step=0); w.write(2, 'train', {'loss': 0.25}); w.close(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "import torch; assert torch.tensor(1.0).item() == 1.0")  # and importable after it
  subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(), check=True, timeout=120)
  assert read_scalars(tmp_path / "tensorboard") == {("train/loss", 2): 0.25}


# ---------------------------------------------------------------------------------------
# The quickstart through the CLIs.


@pytest.mark.slow
def test_quickstart_tiny_through_the_clis(quickstart_tiny_cli, tmp_path):
  workdir, stdout = quickstart_tiny_cli  # `python -m train` of the quickstart's tiny variant
  assert f"tensorboard --logdir {workdir / 'tensorboard'}" in stdout
  config = load_experiment("quickstart").get_config("tiny")
  config.train.num_steps = 4
  check_workdir(workdir, config, eval_keys=("exact_match", "bleu", "accuracy"))

  # The eval printed some held-out translations: generate must answer them the same way.
  printed = re.findall(r"^  (\d+) -> (.*?)(?:   \(expected: .*\))?$", stdout, re.MULTILINE)
  assert len(printed) >= 2 and len({answer for _, answer in printed}) > 1, stdout
  # test_readme.py runs the README's generate command (other inputs) and draws the attention
  # maps over this workdir too.
  (asking,) = cli_runs.run_all(
      [("train.generate", [f"--workdir={workdir}", "--input=2026", "--input=15",
                           *(f"--input={number}" for number, _ in printed[:2])])],
      tmp_path / "runs", cli_env())
  assert asking.returncode == 0, asking.stderr[-3000:]
  answers = [json.loads(line) for line in asking.stdout.splitlines()]
  assert [a["input"] for a in answers] == ["2026", "15", printed[0][0], printed[1][0]], answers
  assert [a["output"] for a in answers[2:]] == [answer for _, answer in printed[:2]]


# ---------------------------------------------------------------------------------------
# Every experiment file.


def documented_commands(doc: str) -> list[list[str]]:
  """The arguments of every `python -m train ...` command in a docstring."""
  return [shlex.split(line) for line in re.findall(r"python -m train (.+)",
                                                    doc.replace("\\\n", " "))]


def parse_command(args: list[str]):
  """The config that `python -m train ARGS` resolves: its file and overrides, through
  ml_collections' own loader (train/__main__.py loads the file through train/run/experiment_file.py
  for its error messages, with the same result)."""
  argv = ["train", *args]
  flag_values = flags.FlagValues()
  config = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                           sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  flag_values(argv)
  return config.value


@pytest.mark.parametrize("name", [
    "quickstart", "transformer_base", "bert_base",
    "gpt2_small",
])
def test_documented_commands_parse_and_validate(name, monkeypatch):
  monkeypatch.chdir(ROOT)
  module = load_experiment(name)
  commands = documented_commands(module.__doc__)
  assert [f"--config=experiments/{name}.py", f"--workdir=/tmp/{name}"] in commands
  assert f"--config=experiments/{name}.py:tiny" in module.__doc__
  for args in commands:
    config = parse_command(args)
    validation.validate(config)
    assert config.train.batch_size % jax.device_count() == 0, args
  for variant in ("", "tiny") + (("billions",) if name == "quickstart" else ()):
    validation.validate(module.get_config(variant))
  with pytest.raises(ValueError, match="variant 'huge'"):
    module.get_config("huge")


def greedy_by_hand(run, text: str, max_new_tokens: int) -> list[int]:
  """Greedy decoding without the KV cache: the whole decoder prefix through the model at each
  step, from the encoder tokens and decoder start of the training pipeline's row for `text`."""
  d = run.config.data
  rows = pipeline.seq2seq_pipeline(
      [{"inputs": text, "targets": "x"}], run.input_tokenizer, run.target_tokenizer,
      batch_size=1, inputs_len=d.inputs_len, targets_len=d.targets_len, pack=False,
      shuffle=False, num_epochs=1, process_index=0, process_count=1)
  row = next(iter(rows))
  encoder_BS = row["encoder_tokens"][:, row["encoder_segment_ids"][0] > 0]
  decoder_BT = np.full((1, max_new_tokens + 1), run.target_tokenizer.pad_id, np.int32)
  decoder_BT[0, 0] = row["decoder_inputs"][0, 0]
  logits = jax.jit(lambda e, t: run.model.apply({"params": run.params}, e, t))
  new = []
  for i in range(max_new_tokens):  # causal: position i's logits see tokens 0..i only
    new.append(int(np.argmax(logits(encoder_BS, decoder_BT)[0, i])))
    decoder_BT[0, i + 1] = new[-1]
    if new[-1] == run.target_tokenizer.eos_id:
      break
  return new


def check_translations(run, search, prompt: str, printed: str):
  """A seq2seq run's answers: the translations its eval printed for held-out inputs (laid out
  by the eval pipeline), and greedy decoding by hand."""
  translations = dict(re.findall(r"^  (.+?) -> (.*?)(?:   \(expected: .*\))?$", printed,
                                 re.MULTILINE))
  assert len(translations) >= 2 and len(set(translations.values())) > 1, printed
  for source, translation in translations.items():
    assert generate.answer(run, source, search, jax.random.key(0)) == translation, source
  greedy = dataclasses.replace(search, method="greedy")
  for text in [prompt, *list(translations)[:2]]:
    expected = run.target_tokenizer.decode(greedy_by_hand(run, text, greedy.max_new_tokens))
    assert generate.answer(run, text, greedy, jax.random.key(0)) == expected, text


@pytest.mark.slow
@pytest.mark.parametrize("name, prompt", [
    ("transformer_base", "The house is small."),
    ("gpt2_small", "The cat"),
    ("bert_base", "The <mask> sat on the mat."),
])
def test_tiny_variant_trains_and_answers(name, prompt, tmp_path, capsys):
  config = load_experiment(name).get_config("tiny")
  seq2seq = config.task == "seq2seq"
  results = loop.train_and_evaluate(config, str(tmp_path))
  printed = capsys.readouterr().out
  lines = check_workdir(tmp_path, config, eval_keys=("exact_match", "bleu") if seq2seq else ())
  last_eval = [line for line in lines if line["split"] == "eval"][-1]
  assert results == pytest.approx({k: v for k, v in last_eval.items()
                                   if k not in ("step", "split")})

  run = workdir_lib.load(str(tmp_path))
  search = workdir_lib.decoding_search(run.config.decode, run.config.task,
                                       run.config.data.targets_len, run.target_tokenizer)
  answer = generate.answer(run, prompt, search, jax.random.key(0))
  if seq2seq:
    check_translations(run, search, prompt, printed)
  if config.task == "lm":
    assert answer.startswith(prompt) and len(answer) > len(prompt)
  if config.task == "mlm":
    before, after = prompt.split(workdir_lib.MASK)
    assert workdir_lib.MASK not in answer
    assert answer.startswith(before) and answer.endswith(after) and answer != prompt


@pytest.mark.slow
@pytest.mark.parametrize("name, source", [
    ("transformer_base", "wmt14_translate/de-en"),
    ("gpt2_small", "lm1b"),
])
def test_real_data_config_runs_on_mock_tfds(name, source, tmp_path):
  c = load_experiment(name).get_config()
  assert c.data.source == source
  c.data.tokenizer, c.data.vocab_size, c.data.num_workers = "bytes", 0, 0
  c.data.seq_len = c.data.inputs_len = c.data.targets_len = 32
  c.model.d_model, c.model.num_heads, c.model.d_ff, c.model.num_layers = 32, 4, 64, 1
  c.model.dtype = "float32"
  c.train.num_steps, c.train.batch_size, c.train.eval_batches = 2, 8, 1
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 0, 2
  c.decode.max_new_tokens, c.optim.warmup_steps = 4, 1
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    results = loop.train_and_evaluate(c, str(tmp_path))
  assert math.isfinite(results["loss"])
  if c.task == "seq2seq":
    assert {"bleu", "exact_match"} <= set(results) and results["decoded"] > 0
  assert (tmp_path / "checkpoints" / "2").is_dir()


# ---------------------------------------------------------------------------------------
# Errors: one line naming the problem, before anything trains.

ERRORS = {  # case: (module, arguments, words the error line must hold)
    "unknown_key": ("train", [f"--config={QUICKSTART_TINY}", "--config.train.nope=1"],
                    ["unknown config key 'nope'", "--config.train.nope"]),
    "misspelt_key": ("train", [f"--config={QUICKSTART_TINY}", "--config.train.num_step=1"],
                     ["'num_step'", "num_steps"]),
    "misspelt_model_key": ("train", [f"--config={QUICKSTART_TINY}",
                                     "--config.model.activaton=gelu"],
                           ["'activaton'", "activation"]),
    "wrong_type": ("train", [f"--config={QUICKSTART_TINY}", "--config.train.num_steps=abc"],
                   ["config.train.num_steps", "abc"]),
    "accumulation": ("train", [f"--config={QUICKSTART_TINY}",
                               "--config.optim.grad_accum_steps=3"],
                     ["grad_accum_steps=3", "16"]),
    "classify": ("train", [f"--config={QUICKSTART_TINY}", "--config.task=classify"],
                 ["classify", "num_classes"]),
    "heads": ("train", [f"--config={QUICKSTART_TINY}", "--config.model.num_heads=5"],
              ["num_heads=5", "d_model=32"]),
    "variant": ("train", ["--config=experiments/gpt2_small.py:huge"],
                ["gpt2_small", "variant 'huge'"]),
    "no_config_file": ("train", ["--config=experiments/nope.py"],
                       ["--config=experiments/nope.py: no such file"]),
    "no_data": ("train", ["--config=experiments/gpt2_small.py:tiny",
                          "--config.data.source=local:experiments/data/nope.txt"],
                ["experiments/data/nope.txt", "does not exist"]),
    "no_workdir": ("train", [f"--config={QUICKSTART_TINY}"], ["--workdir"]),
    "generate_not_a_run": ("train.generate", ["--input=2026"], ["config.json"]),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory) -> dict:
  """{case: (workdir, returncode, stderr)} of every error case."""
  root = tmp_path_factory.mktemp("errors")
  commands = [(module, args + ([] if case == "no_workdir" else [f"--workdir={root / case}"]))
              for case, (module, args, _) in ERRORS.items()]
  finished = cli_runs.run_all(commands, root / "outputs", cli_env())
  return {case: (root / case, done.returncode, done.stderr)
          for case, done in zip(ERRORS, finished)}


@pytest.mark.slow
@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_is_one_clear_line(case, error_runs):
  workdir, returncode, stderr = error_runs[case]
  assert returncode != 0
  assert "Traceback" not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr
  for words in ERRORS[case][2]:
    assert words in errors[0], errors[0]
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_flag_errors_show_the_usage(error_runs):
  for case in ("no_workdir", "unknown_key", "wrong_type", "variant", "no_config_file"):
    assert "usage: python -m train --config=" in error_runs[case][2], case
