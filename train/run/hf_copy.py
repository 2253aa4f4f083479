"""What a run started from init_from=hf:FOLDER keeps of FOLDER, so that it no longer needs it.

Inference and resuming need of FOLDER its config.json, its tokenizer files and
generation_config.json, and one fact that its weights decide: whether the output layer is the
token table. A run copies those into WORKDIR/pretrained/ once its config has passed every check
and before it compiles (`keep`: process 0, atomically), with pretrained.json recording that fact
and the init_from they came from. From then on the run's resumes, train.generate,
train.evaluate and train.export read them there (`folder`), and FOLDER may be deleted. The
weights are read from FOLDER once, at the run's first start; only an adapter-only LoRA run,
whose checkpoints lack the frozen base, reads them again (on each resume and load).
"""

import json
import os
import shutil
import tempfile

import jax

NAME = "pretrained"
RECORD = "pretrained.json"
# What of a Hugging Face folder a run reads besides the weights: the model's config, the
# tokenizer (train.data.tokenizers.HFTokenizer, and the files train.export writes beside it).
FILES = ("config.json", "generation_config.json", "tokenizer.json", "vocab.txt",
         "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
         "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
         "merges.txt")


def folder(init_from: str, workdir: str | None) -> str:
  """The folder to read init_from=hf:FOLDER's config.json and tokenizer from: the workdir's
  copy once the run has made it, else FOLDER."""
  if _record(init_from, workdir):
    return os.path.join(workdir, NAME)
  return init_from[len("hf:"):]


def tie_output(init_from: str, workdir: str | None) -> bool | None:
  """Whether FOLDER's output layer is its token table, as the workdir's copy records it; None
  without a copy (FOLDER's weights decide)."""
  record = _record(init_from, workdir)
  return bool(record["tie_output"]) if record else None


def _record(init_from: str, workdir: str | None) -> dict:
  """The workdir's pretrained.json, if its copy is of `init_from`; else {}."""
  if not workdir:
    return {}
  try:
    with open(os.path.join(workdir, NAME, RECORD), encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):  # No copy yet.
    return {}
  return record if record.get("init_from") == init_from else {}


def keep(init_from: str, workdir: str, tie_output: bool) -> None:
  """Copies FOLDER's files (those of FILES it holds) into WORKDIR/pretrained/ with the record of
  `tie_output`; on process 0, once per init_from (a copy of another init_from is replaced)."""
  if (not init_from.startswith("hf:") or jax.process_index() != 0
      or _record(init_from, workdir)):
    return
  source = init_from[len("hf:"):]
  staging = tempfile.mkdtemp(dir=workdir, prefix=f".{NAME}-")
  try:
    for name in FILES:
      if os.path.isfile(os.path.join(source, name)):
        shutil.copyfile(os.path.join(source, name), os.path.join(staging, name))
    with open(os.path.join(staging, RECORD), "w", encoding="utf-8") as f:
      json.dump({"init_from": init_from, "tie_output": bool(tie_output)}, f, indent=2)
    target = os.path.join(workdir, NAME)
    if os.path.exists(target):
      shutil.rmtree(target)
    os.rename(staging, target)  # Atomic: a reader sees no copy or the whole of it.
  finally:
    shutil.rmtree(staging, ignore_errors=True)
