"""The training system from the outside: the CLIs, every experiment, config errors.

- `python -m train` runs the quickstart's tiny variant end to end (a subprocess, as a user
  types it); `train.generate` and `train.attention_maps` answer from its workdir.
- The other experiments' tiny variants train in-process (8 forced CPU devices) and answer.
- The real-data configs (WMT14, lm1b) run on `tfds.testing.mock_data`, shrunk by overrides.
- Bad flags and configs end with one `error:` line naming the problem, no traceback, and
  nothing trained.

Workdir files are checked against readers we did not write: `json`, TensorBoard's `Event`
protobuf (via tensorboardX's copy of the schema) and matplotlib's PNG decoder.
"""

import importlib.util
import json
import math
import os
import pathlib
import re
import struct
import subprocess
import sys

import jax
import matplotlib.image
import pytest
import tensorflow_datasets as tfds
from tensorboardX.proto import event_pb2

from train import config as config_lib, generate, loop, workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ("quickstart", "transformer_base", "gpt2_small", "bert_base")
QUICKSTART_TINY = "experiments/quickstart.py:tiny"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli_env() -> dict:
  """The subprocesses' environment: CPU, one device (as on a laptop), quiet TF-free tfds."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  return env


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=cli_env(),
                        capture_output=True, text=True, timeout=300)


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
  assert [line["step"] for line in train] == sorted({
      s for s in range(1, t.num_steps + 1)
      if s % t.log_every == 0 or s % t.checkpoint_every == 0 or s == t.num_steps})
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


# ---------------------------------------------------------------------------------------
# The quickstart through the CLIs.


def test_quickstart_tiny_through_the_clis(tmp_path):
  workdir = tmp_path / "quickstart"
  trained = run_cli("train", f"--config={QUICKSTART_TINY}", f"--workdir={workdir}",
                    "--config.train.num_steps=4")
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert f"tensorboard --logdir {workdir / 'tensorboard'}" in trained.stdout
  config = load_experiment("quickstart").get_config("tiny")
  with config.unlocked():
    config.train.num_steps = 4
  check_workdir(workdir, config, eval_keys=("exact_match", "bleu", "accuracy"))

  # The eval printed some held-out translations: generate must answer them the same way.
  printed = [line.strip().split(" -> ", 1) for line in trained.stdout.splitlines()
             if line.startswith("  ") and " -> " in line]
  assert printed, trained.stdout
  number, eval_answer = printed[0][0], printed[0][1].split("   (expected: ")[0]

  asked = run_cli("train.generate", f"--workdir={workdir}", "--input=2026", "--input=15",
                  f"--input={number}")
  assert asked.returncode == 0, asked.stderr[-3000:]
  answers = asked.stdout.splitlines()
  assert [line.split(" -> ")[0] for line in answers] == ["2026", "15", number], asked.stdout
  assert answers[2] == f"{number} -> {eval_answer}"

  png = tmp_path / "attention.png"
  drawn = run_cli("train.attention_maps", f"--workdir={workdir}", "--input=2026",
                  f"--out={png}")
  assert drawn.returncode == 0, drawn.stderr[-3000:]
  assert png.read_bytes()[:8] == PNG_SIGNATURE
  height, width, _ = matplotlib.image.imread(png).shape
  assert height > 100 and width > 100


# ---------------------------------------------------------------------------------------
# Every experiment file.


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_configs_validate_and_document_their_command(name):
  module = load_experiment(name)
  assert f"python -m train --config=experiments/{name}.py" in module.__doc__
  assert f"--config=experiments/{name}.py:tiny" in module.__doc__
  for variant in ("", "tiny") + (("billions",) if name == "quickstart" else ()):
    config = module.get_config(variant)
    config_lib.validate(config)
    assert config.train.batch_size % jax.device_count() == 0, (name, variant)
  with pytest.raises(ValueError, match="variant 'huge'"):
    module.get_config("huge")


@pytest.mark.parametrize("name, prompt", [
    ("transformer_base", "The house is small."),
    ("gpt2_small", "The cat"),
    ("bert_base", "The <mask> sat on the mat."),
])
def test_tiny_variant_trains_and_answers(name, prompt, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)  # The tiny variants read experiments/data/ relative to the root.
  config = load_experiment(name).get_config("tiny")
  seq2seq = config.task == "seq2seq"
  results = loop.train_and_evaluate(config, str(tmp_path))
  lines = check_workdir(tmp_path, config, eval_keys=("exact_match", "bleu") if seq2seq else ())
  last_eval = [line for line in lines if line["split"] == "eval"][-1]
  assert results == pytest.approx({k: v for k, v in last_eval.items()
                                   if k not in ("step", "split")})

  exp, params = workdir_lib.load(str(tmp_path))
  search = loop.decoding_search(exp.config, exp.inputs.target_tokenizer)
  answer = generate.answer(exp, params, prompt, search, jax.random.key(0))
  assert isinstance(answer, str)
  if config.task == "lm":
    assert answer.startswith(prompt) and len(answer) > len(prompt)
  if config.task == "mlm":
    before, after = prompt.split(generate.MASK)
    assert generate.MASK not in answer
    assert answer.startswith(before) and answer.endswith(after) and answer != prompt


@pytest.mark.parametrize("name, source", [
    ("transformer_base", "wmt14_translate/de-en"),
    ("gpt2_small", "lm1b"),
])
def test_real_data_config_runs_on_mock_tfds(name, source, tmp_path):
  config = load_experiment(name).get_config()
  assert config.data.source == source
  c = config
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

ERRORS = {
    "unknown_key": ([f"--config={QUICKSTART_TINY}", "--config.train.nope=1"],
                    ["unknown config key 'nope'", "--config.train.nope"]),
    "misspelt_key": ([f"--config={QUICKSTART_TINY}", "--config.train.num_step=1"],
                     ["'num_step'", "num_steps"]),
    "wrong_type": ([f"--config={QUICKSTART_TINY}", "--config.train.num_steps=abc"],
                   ["config.train.num_steps", "abc"]),
    "accumulation": ([f"--config={QUICKSTART_TINY}", "--config.optim.grad_accum_steps=3"],
                     ["grad_accum_steps=3", "16"]),
    "classify": ([f"--config={QUICKSTART_TINY}", "--config.task=classify"],
                 ["classify", "num_classes"]),
    "heads": ([f"--config={QUICKSTART_TINY}", "--config.model.num_heads=5"],
              ["num_heads=5", "d_model=32"]),
    "variant": (["--config=experiments/gpt2_small.py:huge"], ["gpt2_small", "variant 'huge'"]),
    "no_file": (["--config=experiments/nope.py"], ["experiments/nope.py", "No such file"]),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory) -> dict:
  """{case: (workdir, returncode, stderr)} of every error case, run at once (mostly start-up)."""
  root = tmp_path_factory.mktemp("errors")
  commands = {case: (root / case, [*args, f"--workdir={root / case}"])
              for case, (args, _) in ERRORS.items()}
  commands["missing_workdir"] = (root / "missing_workdir", [f"--config={QUICKSTART_TINY}"])
  processes = {case: (workdir, subprocess.Popen(
      [sys.executable, "-m", "train", *args], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)) for case, (workdir, args) in commands.items()}
  results = {}
  for case, (workdir, process) in processes.items():
    _, stderr = process.communicate(timeout=300)
    results[case] = (workdir, process.returncode, stderr)
  return results


@pytest.mark.parametrize("case", ERRORS)
def test_bad_config_is_one_clear_line(case, error_runs):
  workdir, returncode, stderr = error_runs[case]
  assert returncode != 0
  assert "Traceback" not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr
  for words in ERRORS[case][1]:
    assert words in errors[0], errors[0]
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "metrics.jsonl").exists()


def test_missing_workdir_is_a_usage_error(error_runs):
  _, returncode, stderr = error_runs["missing_workdir"]
  assert returncode != 0
  assert "Traceback" not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "--workdir" in errors[0], stderr
  assert "usage: python -m train --config=" in stderr
