"""Write a trained run as a Hugging Face folder that transformers loads.

  python -m train.export --workdir=DIR --out=FOLDER

FOLDER gets config.json and model.safetensors (models/pretrained_export.py: the run's model
with its latest checkpoint's params, LoRA adapters merged), the files of the run's tokenizer
(train/run/export_tokenizer.py says which kinds can be written; the others are a warning) and
export.json, which lists what the export wrote. A run fine-tuned from hf:FOLDER is written as
that folder's model_type, others as the family their switches name. --out must be new, empty,
or an earlier export, whose files are replaced.
"""

import json
import os
import shutil
import sys
import tempfile

from absl import flags, logging

from models import pretrained, pretrained_export
from models.errors import InputError, named_path
from train.run import cli, export_tokenizer, hf_copy, workdir as workdir_lib

FLAGS = flags.FLAGS
MANIFEST = "export.json"
AUTO_CLASSES = {"lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
                "classify": "AutoModelForSequenceClassification", "mlm": "AutoModelForMaskedLM"}


def export(workdir: str, out: str) -> str:
  """Writes the run in `workdir` as the Hugging Face folder `out`; returns what it wrote."""
  earlier = _earlier_files(out)
  run = workdir_lib.load(workdir)
  config = run.config
  warnings = []
  try:
    files = export_tokenizer.tokenizer_files(config.data, config.init_from, workdir,
                                             run.input_tokenizer)
  except export_tokenizer.NotWritten as e:
    files = {}
    warnings.append(str(e))
  if config.task == "seq2seq" and config.data.target_tokenizer:
    warnings.append(f"the run's target tokenizer ({config.data.target_tokenizer}) is not "
                    "written: a Hugging Face folder holds one tokenizer, the inputs'.")
  source = (hf_copy.folder(config.init_from, workdir) if config.init_from.startswith("hf:")
            else None)
  parent = os.path.dirname(os.path.abspath(out))
  with named_path(f"--out={out}"):
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".export-")
  try:
    hf = pretrained_export.to_hf(
        run.model, run.params, staging, extra_config=_token_ids(run),
        model_type=pretrained.config_json(source)["model_type"] if source else None)
    for name, data in files.items():
      with open(os.path.join(staging, name), "wb") as f:
        f.write(data)
    written = sorted(os.listdir(staging))
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
      json.dump({"workdir": os.path.abspath(workdir), "files": written}, f, indent=2)
    os.makedirs(out, exist_ok=True)
    for name in earlier:
      os.remove(os.path.join(out, name))
    for name in [*written, MANIFEST]:
      os.replace(os.path.join(staging, name), os.path.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  for warning in warnings:
    print(f"warning: {warning}", file=sys.stderr, flush=True)
  tokenizer = f"the run's {config.data.tokenizer} tokenizer" if files else "no tokenizer"
  return (f"Wrote {out}: a {hf['model_type']} checkpoint ({hf['architectures'][0]}) and "
          f"{tokenizer}; load it with transformers.{AUTO_CLASSES[config.task]}"
          f".from_pretrained({out!r}).")


def _earlier_files(out: str) -> list[str]:
  """The files an earlier export wrote into `out` (none for a new or empty folder)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise InputError(f"--out={out} is a file: give a folder to write the export into.")
  if not os.path.isdir(out) or not os.listdir(out):
    return []
  manifest = os.path.join(out, MANIFEST)
  try:
    with open(manifest, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError):
    raise InputError(f"--out={out} is a folder that holds files and no readable {MANIFEST} of "
                     "an earlier export: give a new or empty folder.") from None
  return [name for name in {*files, MANIFEST}
          if os.path.basename(name) == name and os.path.isfile(os.path.join(out, name))]


def _token_ids(run: workdir_lib.Run) -> dict:
  """config.json's special ids: the (target) tokenizer's, and a seq2seq decoder's start."""
  tokenizer = run.target_tokenizer
  stops = list(tokenizer.stop_ids)
  ids = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id,
         "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
  if run.decoder_start_id is not None:
    ids["decoder_start_token_id"] = run.decoder_start_id
  return ids


def define_flags():
  """The flags of `python -m train.export`, defined when it runs (not on import)."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_string("out", None, "Folder to write: new, empty, or an earlier export.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  print(cli.guarded(export)(FLAGS.workdir, FLAGS.out))


if __name__ == "__main__":
  define_flags()
  cli.run(main, cli.parse_flags)
