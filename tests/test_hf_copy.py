"""A run started from init_from=hf:FOLDER no longer needs FOLDER (train/run/hf_copy.py).

The run copies FOLDER's config, tokenizer and the tied-head fact into its workdir; with FOLDER
renamed away, the resume, train.evaluate, train.generate and train.export work, and none reads
a weight (FOLDER's reader is replaced by one that fails). References: transformers loading the
export (logits compared with ours), the folder's own tensors (safetensors).
"""

import gc
import json
import os
import pathlib
import shutil
import weakref

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from experiments import finetune_classify, finetune_gpt2
from models import pretrained
from train import evaluate, export, generate
from train.engine import checkpoint, loop
from train.run import config as config_lib, hf_copy, workdir as workdir_lib

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
  """The tiny checkpoints, built once for this module, away from ~/.cache."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TAPETE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


def _untied_gpt2(root: pathlib.Path) -> str:
  """The tiny GPT-2 folder with an lm_head of its own: its config.json says tied, and only its
  tensors tell that the head is not (as transformers >= 5 decides)."""
  folder = root / "gpt2"
  source = config_lib.resolve_assets(finetune_gpt2.get_config("tiny")).init_from[len("hf:"):]
  shutil.copytree(source, folder)
  tensors = load_file(folder / "model.safetensors")
  wte = tensors["transformer.wte.weight"]
  tensors["lm_head.weight"] = wte + np.random.RandomState(0).standard_normal(wte.shape).astype(
      wte.dtype)
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  assert json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", True)
  return str(folder)


def _config(folder: str, num_steps: int):
  config = finetune_gpt2.get_config("tiny")
  config.init_from = f"hf:{folder}"
  config.train.num_steps = num_steps
  config.train.checkpoint_every = 2
  return config


def _fail(*args):
  raise AssertionError(f"called with {args}")


@pytest.mark.pretrained
@pytest.mark.slow
def test_resume_evaluate_generate_and_export_after_the_folder_is_gone(tmp_path, monkeypatch):
  folder, workdir = _untied_gpt2(tmp_path), tmp_path / "run"
  loop.train_and_evaluate(_config(folder, 2), str(workdir))
  kept = workdir / hf_copy.NAME
  assert json.loads((kept / hf_copy.RECORD).read_text()) == {"init_from": f"hf:{folder}",
                                                              "tie_output": False}
  assert {"config.json", "tokenizer.json"} <= set(os.listdir(kept))
  assert not [n for n in os.listdir(kept) if n.endswith((".safetensors", ".bin"))]

  os.rename(folder, folder + ".gone")
  monkeypatch.setattr(pretrained, "_read_tensors", _fail)
  loop.train_and_evaluate(_config(folder, 4), str(workdir))
  lines = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  steps = [line["step"] for line in lines if line["split"] == "train"]
  assert steps == [2, 4]

  results = evaluate.evaluate(str(workdir))
  assert np.isfinite(results["loss"])
  run = workdir_lib.load(str(workdir))
  assert not run.model.cfg.tie_output  # The fact kept from the weights, not config.json's default.
  search = workdir_lib.decoding_search(run.config.decode, run.config.task,
                                       run.config.data.targets_len, run.input_tokenizer)
  answer = generate.answer_batch(run, ["To be or not"], search, jax.random.key(0))[0]
  assert answer.new_tokens > 0

  out = tmp_path / "export"
  export.export(str(workdir), str(out))
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out),
                                                                  output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens = np.array([transformers.AutoTokenizer.from_pretrained(str(out))("To be")["input_ids"]])
  with torch.no_grad():
    reference = model.eval()(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(jax.jit(run.model.apply)({"params": run.params}, tokens))
  assert np.abs(ours - reference).max() <= TOL


@pytest.mark.pretrained
def test_the_host_copy_of_the_source_is_dropped_once_on_the_devices(tmp_path):
  config = config_lib.resolve_assets(finetune_gpt2.get_config("tiny"))
  exp = loop.build(config, str(tmp_path))
  held = weakref.ref(exp.trainable.source.params["token_embed/embedding"])
  state, shardings = loop.init_state(exp, jax.random.key(0))
  with checkpoint.Checkpointer(str(tmp_path / "checkpoints")) as checkpointer:
    state, _ = exp.trainable.start(checkpointer, state, shardings)
  gc.collect()
  assert exp.trainable.source is None and held() is None
  assert np.abs(np.asarray(state.params["token_embed"]["embedding"])).max() > 0


@pytest.mark.pretrained
def test_a_refused_run_keeps_no_copy_and_is_refused_before_compiling(tmp_path, monkeypatch):
  """A frozen classifier that the checkpoint lacks would stay random: refused before the state
  is initialised (the first compile), and the workdir gets no copy of the folder."""
  config = config_lib.resolve_assets(finetune_classify.get_config("tiny"))
  config.optim.freeze = ["classifier"]
  monkeypatch.setattr(loop, "init_state", _fail)
  with pytest.raises(ValueError, match="would stay at their random initialisation"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / hf_copy.NAME).exists()


def test_a_copy_of_another_folder_is_not_read(tmp_path):
  """The workdir's copy stands for the init_from it was made from, and for no other."""
  first, second = tmp_path / "first", tmp_path / "second"
  for folder in (first, second):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "from": folder.name}))
  config = config_lib.base_config()
  config.init_from = f"hf:{first}"
  hf_copy.keep(config.init_from, str(tmp_path), tie_output=True)
  assert hf_copy.folder(config.init_from, str(tmp_path)) == str(tmp_path / hf_copy.NAME)
  assert hf_copy.tie_output(config.init_from, str(tmp_path)) is True
  config.init_from = f"hf:{second}"
  assert hf_copy.folder(config.init_from, str(tmp_path)) == str(second)
  assert hf_copy.tie_output(config.init_from, str(tmp_path)) is None
  hf_copy.keep(config.init_from, str(tmp_path), tie_output=False)
  copied = json.loads((tmp_path / hf_copy.NAME / "config.json").read_text())
  assert (copied["from"] == "second"
          and hf_copy.tie_output(config.init_from, str(tmp_path)) is False)
  assert set(os.listdir(tmp_path)) == {"first", "second", hf_copy.NAME}  # No staging left.
