"""Bad input, as a hostile user gives it: one `error:` line, exit status 2, no traceback, and
every file of the workdir (or the input) byte for byte as it was.

Add a row to CASES whenever a new way to get it wrong is found.
"""

import hashlib
import json
import pathlib
import random
import re
import shutil

import pytest

import cli_runs
from conftest import QUICKSTART_TINY_CLI, one_device_env

pytestmark = pytest.mark.slow  # a CLI run for each case

TINY = QUICKSTART_TINY_CLI[2:]  # the session's trained quickstart (conftest.quickstart_tiny_cli)
GPT2_TINY = "--config=experiments/gpt2_small.py:tiny"


def hashes(folder: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder` (or of `folder` itself)."""
  files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
  return {str(p.relative_to(folder.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in files}


def random_text(folder: pathlib.Path) -> pathlib.Path:
  """A .txt file of 4,000 seeded random bytes in `folder`."""
  path = folder / "random.txt"
  path.write_bytes(random.Random(0).randbytes(4000))
  return path


def bad_pairs(folder: pathlib.Path) -> pathlib.Path:
  """A prompt -> response JSONL file whose third line's response is a number."""
  path = folder / "pairs.jsonl"
  path.write_text('{"prompt": "a?", "response": "b"}\n' * 2 + '{"prompt": "c?", "response": 7}\n')
  return path


def bad_csv(folder: pathlib.Path) -> pathlib.Path:
  """A text CSV file whose third line is a row of two fields under a header of one."""
  path = folder / "texts.csv"
  path.write_text("text\n" + "a line\n" * 40 + '"one, field",two\n')
  return path


def sentences_parquet(folder: pathlib.Path) -> pathlib.Path:
  """A Parquet file of GLUE's columns (sentence, label), none named text."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = folder / "sst2.parquet"
  pq.write_table(pa.table({"sentence": ["good", "bad"] * 20, "label": [1, 0] * 20}), path)
  return path


def bad_chats(folder: pathlib.Path) -> pathlib.Path:
  """A chat JSONL file whose second conversation ends on a user turn."""
  path = folder / "chats.jsonl"
  turns = [{"role": "user", "content": "Oi?"}, {"role": "assistant", "content": "Olá!"}]
  path.write_text(json.dumps({"messages": turns}) + "\n"
                  + json.dumps({"messages": turns + turns[:1]}) + "\n")
  return path


def bad_experiment(folder: pathlib.Path, source: str) -> pathlib.Path:
  """An experiment file `bad.py` in `folder` holding `source`."""
  path = folder / "bad.py"
  path.write_text(source)
  return path


def sweep_root(folder: pathlib.Path, manifest: str) -> pathlib.Path:
  """A sweep's root `folder/sweep` whose sweep.json holds `manifest`."""
  root = folder / "sweep"
  root.mkdir()
  (root / "sweep.json").write_text(manifest)
  return root


@pytest.fixture(scope="module")
def trained(quickstart_tiny_cli, tmp_path_factory) -> pathlib.Path:
  """A copy of the session's finished tiny quickstart run, the workdir the cases below try to
  damage."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  shutil.copytree(quickstart_tiny_cli[0], workdir)
  return workdir


@pytest.fixture(scope="module")
def damaged(trained) -> pathlib.Path:
  """A copy of the trained workdir holding only its last checkpoint, whose array files are cut
  to half, as a full disk leaves them (as tests/test_checkpoint.py damages a step)."""
  workdir = trained.parent / "damaged"
  shutil.copytree(trained, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  for step in steps[:-1]:
    shutil.rmtree(workdir / "checkpoints" / str(step))
  data_files = list(workdir.glob("checkpoints/*/state/**/d/*"))
  assert data_files
  for data_file in data_files:
    data_file.write_bytes(data_file.read_bytes()[:data_file.stat().st_size // 2])
  return workdir


@pytest.fixture(scope="module")
def cut_config(trained) -> pathlib.Path:
  """A copy of the trained workdir whose config.json is cut to half, as a full disk leaves it."""
  workdir = trained.parent / "cut_config"
  shutil.copytree(trained, workdir)
  config = workdir / "config.json"
  config.write_bytes(config.read_bytes()[:config.stat().st_size // 2])
  return workdir


BOOM = "def get_config():\n  raise RuntimeError('boom')\n"
UNKNOWN_OPTION = ("from experiments import gpt2_small\n\ndef get_config():\n"
           "  c = gpt2_small.get_config('tiny')\n  c.data.source = 'local:texts.txt'\n"
           "  c.data.source_options = {'delimiter': ';'}\n  return c\n")

# (name, args given a workdir W and a fresh tmp folder T, watched path, error match); watched
# "t" is T, the others are W and say which it is: the fixture WORKDIRS names.
WORKDIRS = {"w": "trained", "d": "damaged", "c": "cut_config", "t": "trained"}
CASES = [
    ("resume with another model shape",
     lambda w, t: ["train", *TINY, f"--workdir={w}", "--config.model.d_model=64"], "w",
     r"holds a run trained with other settings: model\.d_model=32 -> 64"),
    ("resume with another vocabulary",
     lambda w, t: ["train", *TINY, f"--workdir={w}", "--config.data.tokenizer=bytes",
                   "--config.data.target_tokenizer=bytes"], "w",
     r"data\.target_tokenizer='word' -> 'bytes'"),
    ("a workdir that is a file",
     lambda w, t: ["train", *TINY, f"--workdir={w / 'config.json'}"], "w", r"is a file"),
    ("seq_len over the learned position table",
     lambda w, t: ["train", GPT2_TINY, f"--workdir={t / 'run'}", "--config.data.seq_len=4096"],
     "t", r"config\.data\.seq_len=4096 exceeds the model's learned position table "
     r"\(model\.max_len=128\)"),
    ("init_from a run of another shape",
     lambda w, t: ["train", *TINY, f"--workdir={t / 'run'}", f"--config.init_from=ckpt:{w}",
                   "--config.model.d_model=64"], "w",
     r"init_from=ckpt:\S+: parameters of another shape: .+ Set the model config to the "
     r"source's\.$"),
    ("an unknown key in data.source_options",
     lambda w, t: ["train", f"--config={bad_experiment(t, UNKNOWN_OPTION)}",
                   f"--workdir={t / 'run'}"],
     "t", r"config\.data\.source_options has delimiter, which data\.source='local:texts\.txt' "
     r"does not take; it takes task, validation_fraction, test_fraction, seed, "),
    ("a NaN learning rate",
     lambda w, t: ["train", GPT2_TINY, f"--workdir={t / 'run'}",
                   "--config.optim.learning_rate=nan"],
     "t", r"learning_rate must be a number >= 0 and finite, got nan"),
    ("a local text file of random bytes",
     lambda w, t: ["train", GPT2_TINY, f"--workdir={t / 'run'}",
                   f"--config.data.source=local:{random_text(t)}"],
     "t", r"random\.txt is not UTF-8 text: \d+% of it does not decode \(first at byte \d+\)"),
    ("a prompt -> response line whose response is not a string",
     lambda w, t: ["train", "--config=experiments/finetune_llama.py:tiny,instruct",
                   f"--workdir={t / 'run'}", f"--config.data.source=local:{bad_pairs(t)}"],
     "t", r"pairs\.jsonl:3: response must be a non-empty string, found 7\. Fix the line"),
    ("a CSV row with more fields than its header",
     lambda w, t: ["train", GPT2_TINY, f"--workdir={t / 'run'}",
                   f"--config.data.source=local:{bad_csv(t)}"],
     "t", r"texts\.csv:42: expected 1 columns, as the header, found 2\. Fix the line"),
    ("a Parquet file without our column, and no columns= mapping",
     lambda w, t: ["train", GPT2_TINY, f"--workdir={t / 'run'}",
                   f"--config.data.source=local:{sentences_parquet(t)}"],
     "t", r"sst2\.parquet has no column for text='text'; its columns are \['sentence', 'label'\]\. "
     r"Map our field names to its columns with data\.source_options\.columns"),
    ("a chat conversation that ends on a user turn",
     lambda w, t: ["train", "--config=experiments/finetune_llama.py:tiny,chat",
                   f"--workdir={t / 'run'}", f"--config.data.source=local:{bad_chats(t)}"],
     "t", r"chats\.jsonl:2: the conversation ends on a user turn, not on the assistant turn it "
     r"needs\. Fix the line"),
    ("a chat run from a folder without a chat template",
     lambda w, t: ["train", "--config=experiments/finetune_llama.py:tiny,chat",
                   f"--workdir={t / 'run'}", "--config.data.source_options.chat_template="],
     "t", r"has none \(no chat_template\.jinja, no chat_template in tokenizer_config\.json\): "
     r"pass one with data\.source_options\.chat_template=PATH"),
    ("train.assets: an unknown asset name",
     lambda w, t: ["train.assets", "nope"], "t", r"Unknown asset 'nope': choose from"),
    ("launch.report: a folder that does not exist",
     lambda w, t: ["launch.report", str(t / "nope")], "t",
     r"nope does not exist: pass the --workdir_root of a sweep"),
    ("launch.sweep: a runner that does not exist",
     lambda w, t: ["launch.sweep", "--config=experiments/quickstart.py:tiny",
                   f"--workdir_root={t / 'sweep'}", "--runner=k8s"], "t",
     r"argument --runner: invalid choice: 'k8s'"),
    ("resume when every checkpoint is truncated",
     lambda w, t: ["train", *TINY, f"--workdir={w}"], "d",
     r"No checkpoint in \S+ can be read: The checkpoint \S+/4 cannot be read \(.+\)\. Use a new "
     r"workdir\.$"),
    ("generate from a truncated checkpoint",
     lambda w, t: ["train.generate", f"--workdir={w}", "--input=2026"], "d",
     r"The checkpoint \S+/4 cannot be read \(.+\)\. Use another checkpoint or a new workdir\.$"),
    ("generate from a workdir whose config.json is cut short",
     lambda w, t: ["train.generate", f"--workdir={w}", "--input=2026"], "c",
     r"cut_config/config\.json is not readable JSON \(.+\): it records how the run in \S+ was "
     r"trained, and the run cannot be loaded without it; restore it\."),
    ("resume a workdir whose config.json is cut short",
     lambda w, t: ["train", *TINY, f"--workdir={w}"], "c",
     r"cut_config/config\.json is not readable JSON \(.+\): it records the run in \S+; restore "
     r"it, or train in a new --workdir\."),
    ("launch.report: a sweep.json without runs",
     lambda w, t: ["launch.report", str(sweep_root(t, '{"config": "x.py"}'))], "t",
     r"sweep/sweep\.json is not a sweep's manifest \(it holds no \"runs\" list .*\)\. Move it "
     r"away"),
    ("launch.report: a sweep.json that is not JSON",
     lambda w, t: ["launch.report", str(sweep_root(t, '{"config": "x.py", "ru'))], "t",
     r"sweep/sweep\.json is not a sweep's manifest \(it is not JSON: .+\)\. Move it away"),
    ("launch.sweep: a sweep.json that is not JSON",
     lambda w, t: ["launch.sweep", "--config=experiments/quickstart.py:tiny", "--dry_run",
                   f"--workdir_root={sweep_root(t, '{')}"], "t",
     r"sweep/sweep\.json is not a sweep's manifest \(it is not JSON: .+\)\. Move it away"),
    ("generate with an unknown flag",
     lambda w, t: ["train.generate", f"--workdir={w}", "--input=2026", "--beam=4"], "w",
     r"Unknown command line flag 'beam'"),
    ("evaluate without --workdir",
     lambda w, t: ["train.evaluate"], "t", r"flag --workdir=None: Flag --workdir must have a value"),
    ("attention_maps without --out",
     lambda w, t: ["train.attention_maps", f"--workdir={w}", "--input=2026"], "w",
     r"flag --out=None: Flag --out must have a value other than None"),
    ("attention_maps --out an existing folder",
     lambda w, t: ["train.attention_maps", f"--workdir={w}", "--input=2026", f"--out={t}"], "t",
     r"--out=\S+ is a folder; give the PNG file to write, such as --out=\S+attention\.png"),
    ("export a model that no Hugging Face family computes",
     lambda w, t: ["train.export", f"--workdir={w}", f"--out={t / 'hf'}"], "t",
     r"This EncoderDecoder cannot be written as a t5 checkpoint: it differs from "
     r"T5ForConditionalGeneration in .*position='sinusoidal' \(T5ForConditionalGeneration has "
     r"'relative'\)"),
    ("export into a folder that holds other files",
     lambda w, t: ["train.export", f"--workdir={w}", f"--out={random_text(t).parent}"], "t",
     r"--out=\S+ is a folder that holds files and no readable export\.json of an earlier export"),
    ("an experiment file with a syntax error",
     lambda w, t: ["train", f"--config={bad_experiment(t, 'def get_config(:')}",
                   f"--workdir={t / 'run'}"],
     "t", r"--config=\S*bad\.py: line 1 is not valid Python \(.+\); fix that line\."),
    ("an experiment file without get_config",
     lambda w, t: ["train", f"--config={bad_experiment(t, 'X = 1')}", f"--workdir={t / 'run'}"],
     "t", r"--config=\S*bad\.py has no get_config\(\): define get_config\(\) returning"),
    ("an experiment file whose get_config raises",
     lambda w, t: ["train", f"--config={bad_experiment(t, BOOM)}", f"--workdir={t / 'run'}"],
     "t", r"--config=\S*bad\.py: get_config\(\) raised RuntimeError: boom \(\S*bad\.py, "
     r"line 2\); fix the experiment file\."),
    ("launch.sweep: an experiment file with a syntax error",
     lambda w, t: ["launch.sweep", f"--config={bad_experiment(t, 'def get_config(:')}",
                   f"--workdir_root={t / 'sweep'}"],
     "t", r"--config=\S*bad\.py: line 1 is not valid Python"),
    ("launch.sweep: an experiment file whose get_config raises",
     lambda w, t: ["launch.sweep", f"--config={bad_experiment(t, BOOM)}",
                   f"--workdir_root={t / 'sweep'}"],
     "t", r"--config=\S*bad\.py: get_config\(\) raised RuntimeError: boom"),
]


@pytest.fixture(scope="module")
def refusals(request, tmp_path_factory) -> dict:
  """{case name: (finished command, fresh folder T, watched path, its hashes before the runs)}:
  every case's command, run once (tests/cli_runs.py)."""
  prepared = {}
  for name, args, watched, _ in CASES:
    workdir = request.getfixturevalue(WORKDIRS[watched])
    fresh = tmp_path_factory.mktemp("case")
    command = args(workdir, fresh)
    path = fresh if watched == "t" else workdir
    prepared[name] = (command, fresh, path)
  before = {name: hashes(path) for name, (_, _, path) in prepared.items()}
  finished = cli_runs.run_all([(command[0], command[1:]) for command, _, _ in prepared.values()],
                              tmp_path_factory.mktemp("outputs"), one_device_env())
  return {name: (done, fresh, path, before[name])
          for (name, (_, fresh, path)), done in zip(prepared.items(), finished)}


@pytest.mark.parametrize("name, match", [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(name, match, refusals):
  process, fresh, watched, before = refusals[name]
  errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
  assert process.returncode == 2, (process.returncode, process.stderr[-3000:])
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  assert "Event loop is closed" not in process.stderr, process.stderr[-3000:]
  assert len(errors) == 1 and re.search(match, errors[0]), process.stderr[-3000:]
  assert hashes(watched) == before
  if watched == fresh:  # Refused before any data was prepared in the fresh workdir.
    assert not [p for p in fresh.rglob("data") if p.is_dir()]
