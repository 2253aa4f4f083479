"""train.evaluate: a saved run evaluated without training reproduces the loop's own evals.

The reference is what the training loop recorded in metrics.jsonl at the same steps, over the
same split and batches (the loop evaluates at steps 3 and 6; checkpoints are kept at both).
"""

import os
import pathlib
import subprocess
import sys

import pytest

from experiments import quickstart
from train import evaluate
from train.engine import loop, records

pytestmark = pytest.mark.slow  # the quickstart trained, then evaluated

ROOT = pathlib.Path(__file__).resolve().parents[1]
METRICS = ("loss", "accuracy", "perplexity", "exact_match", "bleu", "decoded")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The quickstart's tiny variant, evaluated by the loop at steps 3 and 6 on the test split."""
  workdir = tmp_path_factory.mktemp("quickstart") / "run"
  config = quickstart.get_config("tiny")
  config.train.eval_every = 3
  config.train.print_examples = 0
  loop.train_and_evaluate(config, str(workdir))
  return workdir


def loop_eval(workdir, step: int) -> dict:
  recorded = records.recorded(workdir, step, "eval")
  assert recorded is not None and set(METRICS) <= set(recorded)
  return recorded


def test_evaluating_the_latest_checkpoint_reproduces_the_loops_final_eval(trained):
  results = evaluate.evaluate(str(trained))
  assert results == loop_eval(trained, 6)
  assert records.recorded(trained, 6, "test") == results  # Under the split's own name.
  assert loop_eval(trained, 6) != loop_eval(trained, 3)  # The steps are told apart.


def test_the_cli_evaluates_an_older_checkpoint_and_refuses_a_missing_one(trained):
  env = {**os.environ, "TAPETE_CACHE": str(trained.parent / "cache")}
  command = [sys.executable, "-m", "train.evaluate", f"--workdir={trained}"]
  older = subprocess.Popen(command + ["--checkpoint_step=3"], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  missing = subprocess.run(command + ["--checkpoint_step=4"], cwd=ROOT, env=env, text=True,
                           capture_output=True, timeout=300)
  _, stderr = older.communicate(timeout=300)
  assert older.returncode == 0, stderr
  assert records.recorded(trained, 3, "test") == loop_eval(trained, 3)
  assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
  assert missing.stderr.splitlines()[-1] == (
      f"error: --checkpoint_step=4: {trained} holds checkpoints of steps 3, 6; pick one of them.")


def test_another_split_is_recorded_under_its_name(trained):
  results = evaluate.evaluate(str(trained), split="validation")
  assert records.recorded(trained, 6, "validation") == results
  assert results["data_examples"] == quickstart.get_config("tiny").data.source_options[
      "num_validation"]
  assert results["loss"] != loop_eval(trained, 6)["loss"]
