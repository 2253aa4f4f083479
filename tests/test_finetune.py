"""Fine-tuning through the loop: init_from=hf:/ckpt:, freezing, LoRA, adapter-only checkpoints.

Checkpoints are tiny randomly initialised `transformers` models saved locally
(train/assets/tiny_hf.py); imported weights are compared with models.pretrained.from_hf's,
LoRA params with models.lora.merge of the saved adapters, losses with the loop's own on resume.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from experiments import finetune_classify, finetune_gpt2, finetune_t5
from models import lora, pretrained
from train import assets
from train.engine import checkpoint, loop, trainable
from train.run import config as config_lib, validation, workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
  """Tiny checkpoints and the datasets, built once for this module, away from ~/.cache."""
  folder = tmp_path_factory.mktemp("cache")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TAPETE_CACHE", str(folder))
    yield folder


@pytest.fixture(scope="module")
def genres(tmp_path_factory):
  """Every 40th speech of the Shakespeare genre dataset: real labels, a quick prepare."""
  folder = tmp_path_factory.mktemp("genres")
  for split in ("train", "validation"):
    lines = (pathlib.Path(assets.folder("shakespeare_genres")) / f"{split}.tsv").read_text(
        encoding="utf-8").splitlines()
    (folder / f"{split}.tsv").write_text("\n".join(lines[::40]) + "\n", encoding="utf-8")
  return folder


def flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def metrics(workdir, split="train") -> dict:
  lines = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
  return {line["step"]: line for line in lines if line["split"] == split}


def hf_params(config):
  """The checkpoint's params as from_hf lays them out for the task's model (fresh heads too)."""
  return _hf_params(config.init_from[len("hf:"):], trainable.HEADS.get(config.task),
                    config.model.num_classes or None, config.model.pooling)


@functools.cache
def _hf_params(folder, head, num_classes, pooling):
  return flat(pretrained.from_hf(folder, head=head, num_classes=num_classes, pooling=pooling)[1])


def eval_loss(config, params, workdir) -> float:
  """The eval loss of `params` over the whole eval split, summed as the loop sums it."""
  exp = loop.build(config, str(workdir))
  step = jax.jit(lambda p, b: exp.task.loss(p, b)[1])
  sums = [step(params, batch) for batch in exp.inputs.eval_pipeline(8)]
  return float(sum(s["loss"] for s in sums) / sum(s["weight"] for s in sums))


# ---------------------------------------------------------------------------------------------
# A partly frozen GPT-2 continued on text.


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("frozen")
  config = config_lib.resolve_assets(finetune_gpt2.get_config("tiny"))
  config.optim.freeze = ("^token_embed/", "layers_0/")
  config.optim.learning_rate = 1e-2
  config.train.num_steps = config.train.checkpoint_every = 6  # the tests read the last only
  config.train.eval_every = 0
  results = loop.train_and_evaluate(config, str(workdir))
  return config, workdir, results


@pytest.mark.slow
def test_frozen_parameters_stay_bitwise_unchanged(frozen_run):
  config, workdir, _ = frozen_run
  start, end = hf_params(config), flat(checkpoint.load_params(workdir))
  assert start.keys() == end.keys()
  frozen = [p for p in start if p.startswith("token_embed/") or "layers_0/" in p]
  assert len(frozen) == 1 + 16  # the table; q, k, v, out, wi, wo (kernel, bias); 2 norms
  for path in start:
    if path in frozen:
      np.testing.assert_array_equal(end[path], start[path], err_msg=path)
    elif path.endswith("kernel"):
      assert not np.array_equal(end[path], start[path]), path


@pytest.mark.slow
def test_fine_tune_from_imported_weights_improves_the_eval_loss(frozen_run, tmp_path):
  config, _, results = frozen_run
  before = eval_loss(config, jax.tree.map(np.asarray, traverse_util.unflatten_dict(
      hf_params(config), sep="/")), tmp_path)
  assert results["loss"] < before - 0.1, (results["loss"], before)


# ---------------------------------------------------------------------------------------------
# MiniLM-style classifier with LoRA and an adapter-only checkpoint.

RANK = 8  # the lora variant's


def lora_config(genres, steps=4):
  """finetune_classify:tiny,lora (adapters and the classifier train) on a few speeches."""
  config = config_lib.resolve_assets(finetune_classify.get_config("tiny,lora"))
  config.data.source = f"local:{genres}"
  config.train.num_steps = steps
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 5
  return config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, genres):
  workdir = tmp_path_factory.mktemp("lora")
  config = lora_config(genres)
  results = loop.train_and_evaluate(config, str(workdir))
  return config, workdir, results


@pytest.mark.slow
def test_lora_trains_the_expected_parameters(lora_run):
  config, workdir, _ = lora_run
  exp = loop.build(config, str(workdir))
  counts = {train: 0 for train in (True, False)}
  for leaf, train in zip(jax.tree.leaves(exp.trainable.abstract_params),
                         jax.tree.leaves(exp.trainable.mask)):
    counts[train] += np.prod(leaf.shape)
  d, layers, classes = 32, 2, 3  # the tiny BERT: 4 heads of 8
  adapters = layers * 2 * RANK * (d + d)  # query and value: [D, r] and [r, N, H]
  assert counts[True] == adapters + d * classes + classes
  assert counts[True] + counts[False] == adapters + sum(x.size for x in hf_params(config).values())
  assert "classifier/kernel" in hf_params(config)


@pytest.mark.slow
def test_adapter_only_checkpoint_holds_what_trains_and_loads_back(lora_run):
  config, workdir, results = lora_run
  saved = flat(checkpoint.load_params(workdir))
  assert {p.split("/")[0] for p in saved} == {"base", "lora"}
  assert {p for p in saved if p.startswith("base/")} == {"base/classifier/kernel",
                                                          "base/classifier/bias"}
  assert all(p.endswith(("/a", "/b")) for p in saved if p.startswith("lora/"))
  b = [x for p, x in saved.items() if p.endswith("/b")]
  assert len(b) == 4 and all(np.abs(x).max() > 0 for x in b)  # the adapters trained

  base = {**hf_params(config), "classifier/kernel": saved["base/classifier/kernel"],
          "classifier/bias": saved["base/classifier/bias"]}
  adapters = traverse_util.unflatten_dict(
      {p[len("lora/"):]: x for p, x in saved.items() if p.startswith("lora/")}, sep="/")
  lora_cfg = lora.LoraConfig(config.lora.targets, config.lora.rank, config.lora.alpha)
  expected = flat(lora.merge(traverse_util.unflatten_dict(base, sep="/"), adapters, lora_cfg))
  params = workdir_lib.load(str(workdir)).params  # as train.generate loads a run
  params = flat(params)
  assert params.keys() == expected.keys()
  for path in expected:
    np.testing.assert_array_equal(params[path], expected[path], err_msg=path)


@pytest.mark.slow
def test_adapter_only_run_resumes_as_if_uninterrupted(lora_run, tmp_path):
  config, workdir, _ = lora_run
  shutil.copytree(workdir, tmp_path / "run")
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "run" / "metrics.jsonl").write_text(
      "\n".join(line for line in lines if json.loads(line)["step"] <= 2) + "\n")
  loop.train_and_evaluate(config, str(tmp_path / "run"))
  resumed, uninterrupted = metrics(tmp_path / "run"), metrics(workdir)
  for step in (3, 4):
    for key in ("loss", "grad_norm", "accuracy"):
      assert resumed[step][key] == uninterrupted[step][key], (step, key)


def test_restore_logs_new_heads_and_skips_what_the_model_lacks(capsys):
  params = {"encoder": {"kernel": jax.numpy.zeros((2, 3))}, "classifier": {"bias": jax.numpy.ones(3)}}
  source = {"encoder": {"kernel": np.full((2, 3), 7.0)}, "transform": {"bias": np.ones(2)}}
  mask = jax.tree.map(lambda _: True, params)
  restored = trainable.restore(params, trainable.Source("ckpt:/there", flat(source)), mask)
  np.testing.assert_array_equal(restored["encoder"]["kernel"], np.full((2, 3), 7.0))
  np.testing.assert_array_equal(restored["classifier"]["bias"], np.ones(3))
  out = capsys.readouterr().out
  assert "Initialised, not in ckpt:/there: classifier/bias" in out
  assert "Skipped, in ckpt:/there but not in the model: transform/bias" in out
  with pytest.raises(ValueError, match=r"encoder/kernel \(3, 2\) \(the model's: \(2, 3\)\)"):
    trainable.restore(params, trainable.Source("ckpt:/there", {"encoder/kernel": np.zeros((3, 2))}),
                      mask)
  with pytest.raises(ValueError, match="shares no parameter"):
    trainable.restore(params, trainable.Source("ckpt:/there", {"decoder/kernel": np.zeros((2, 3))}),
                      mask)
  frozen = {"encoder": {"kernel": True}, "classifier": {"bias": False}}
  with pytest.raises(ValueError, match="classifier/bias would stay at their random"):
    trainable.restore(params, trainable.Source("ckpt:/there", flat(source)), frozen)


# ---------------------------------------------------------------------------------------------
# T5 on numbers, and the experiments' documented commands.


@pytest.mark.slow
def test_t5_tiny_variant_trains_from_the_imported_weights(tmp_path):
  config = config_lib.resolve_assets(finetune_t5.get_config("tiny"))
  config.train.num_steps = config.train.checkpoint_every = 2
  config.data.source_options.num_test = 8
  config.decode.max_new_tokens = 4
  results = loop.train_and_evaluate(config, str(tmp_path))
  assert {"exact_match", "bleu"} <= set(results) and results["decoded"] == 8
  start, end = hf_params(config), flat(checkpoint.load_params(tmp_path))
  assert start.keys() == end.keys()
  assert all(not np.array_equal(start[p], end[p]) for p in start if p.endswith("kernel"))


@pytest.mark.pretrained
@pytest.mark.parametrize("module", [finetune_classify, finetune_gpt2, finetune_t5])
def test_documented_commands_name_the_experiment_and_variants_validate(module):
  name = module.__name__.split(".")[-1]
  assert f"python -m train --config=experiments/{name}.py" in module.__doc__.replace("\\\n", "")
  assert f"--config=experiments/{name}.py:tiny" in module.__doc__
  validation.validate(config_lib.resolve_assets(module.get_config("tiny")))
  with pytest.raises(ValueError, match="variant 'huge'"):
    module.get_config("huge")


# ---------------------------------------------------------------------------------------------
# Errors.


def gpt2_tiny(**changes):
  config = config_lib.resolve_assets(finetune_gpt2.get_config("tiny"))
  for key, value in changes.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


@pytest.mark.pretrained
@pytest.mark.parametrize("changes, match", [
    (dict(lora__enabled=True, lora__targets="self_atention/query/kernel"), "matches no parameter path"),
    (dict(lora__enabled=True, lora__train=("^clasifier",)), "lora.train pattern '\\^clasifier' matches no"),
])
def test_bad_lora_patterns_are_clear_errors(changes, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    loop.build(gpt2_tiny(**changes), str(tmp_path))


@pytest.mark.pretrained
@pytest.mark.parametrize("changes, match", [
    (dict(lora__enabled=True, lora__rank=0), "rank must be a positive integer"),
    (dict(lora__enabled=True, optim__freeze=("embed",)), "leave config.optim.freeze empty"),
    (dict(lora__adapter_only_checkpoint=True), "needs config.lora.enabled"),
    (dict(model__d_model=64), r"sets \['d_model'\]"),
    (dict(model__preset="gpt2"), "preset='gpt2' does not apply"),
])
def test_bad_fine_tuning_configs_are_clear_errors(changes, match):
  with pytest.raises(ValueError, match=match):
    validation.validate(gpt2_tiny(**changes))


@pytest.mark.slow
def test_bad_checkpoint_folders_are_clear_errors(tmp_path, lora_run):
  config = gpt2_tiny()
  config.init_from = f"hf:{tmp_path / 'nope'}"
  with pytest.raises(ValueError, match="No checkpoint folder at"):
    validation.validate(config)
  config.init_from = f"hf:{assets.folder('tiny_bert')}"
  with pytest.raises(ValueError, match="is a bert checkpoint; task 'lm' fine-tunes gpt2"):
    validation.validate(config)
  (tmp_path / "mixtral").mkdir()
  (tmp_path / "mixtral" / "config.json").write_text('{"model_type": "mixtral"}')
  config.init_from = f"hf:{tmp_path / 'mixtral'}"
  with pytest.raises(ValueError, match="model_type 'mixtral'"):
    validation.validate(config)
  with pytest.raises(ValueError, match="holds only LoRA adapters"):
    trainable.run_params(str(lora_run[1]))


@pytest.mark.slow
def test_cli_reports_a_missing_checkpoint_folder_in_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  process = subprocess.run(
      [sys.executable, "-m", "train", "--config=experiments/finetune_gpt2.py",
       f"--workdir={tmp_path / 'run'}", f"--config.init_from=hf:{tmp_path / 'gpt2'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert process.returncode == 2
  errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and str(tmp_path / "gpt2") in errors[0], process.stderr
  assert "Traceback" not in process.stderr
