"""Local files prepared as tfds array_record datasets, read back, reused, and bad data."""

import codecs
import csv
import json
import random
import re

import pytest
import tensorflow_datasets as tfds

from train.data import local
from train.data import sources


GOOD_JSON = '{"inputs": "a", "targets": "b"}\n'


def _write(path, lines, mode="w"):
  with open(path, mode) as f:
    f.write(lines)
  return str(path)


def _read_all(path, task, data_dir, split):
  source = sources.get_source(f"local:{path}", split, task=task, data_dir=data_dir)
  return [source[i] for i in range(len(source))]


@pytest.fixture
def pairs(tmp_path):
  rows = [(str(i), f"número {i} ação") for i in range(40)]
  return _write(tmp_path / "pairs.tsv", "".join(f"{a}\t{b}\n" for a, b in rows))


def test_one_file_is_split_by_seeded_fractions_and_reads_back(pairs, tmp_path):
  data_dir = str(tmp_path / "data")
  stats = local.prepare(pairs, task="seq2seq", data_dir=data_dir,
                        validation_fraction=0.1, test_fraction=0.2, seed=1)
  assert stats["splits"] == {"train": 28, "validation": 4, "test": 8}
  with open(pairs, newline="", encoding="utf-8") as f:
    reference = {tuple(row) for row in csv.reader(f, delimiter="\t")}
  read = {split: [(ex["inputs"], ex["targets"])
                  for ex in _read_all(pairs, "seq2seq", data_dir, split)]
          for split in local.SPLITS}
  assert set(read["train"]) | set(read["validation"]) | set(read["test"]) == reference
  assert sum(len(v) for v in read.values()) == len(reference)
  assert not set(read["train"]) & set(read["test"])
  assert not set(read["train"]) & set(read["validation"])
  assert isinstance(read["train"][0][1], str)
  # The stored order is the file's order; a read-only tfds builder sees the same data.
  assert [int(a) for a, _ in read["train"]] == sorted(int(a) for a, _ in read["train"])
  builder = tfds.builder_from_directory(local._version_dir(pairs, "seq2seq", data_dir))
  assert builder.info.splits["train"].num_examples == 28
  assert builder.info.metadata["stats"] == stats


def test_the_seed_decides_the_split(pairs, tmp_path):
  def held_out(seed):
    data_dir = str(tmp_path / f"data{seed}")
    local.prepare(pairs, task="seq2seq", data_dir=data_dir, seed=seed, test_fraction=0.25)
    return [ex["inputs"] for ex in _read_all(pairs, "seq2seq", data_dir, "test")]
  assert held_out(0) == held_out(0)
  assert held_out(0) != held_out(1)


def test_preparing_again_reuses_the_data(pairs, tmp_path, monkeypatch):
  data_dir = str(tmp_path / "data")
  stats = local.prepare(pairs, task="seq2seq", data_dir=data_dir)
  monkeypatch.setattr(local._LocalBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("prepared twice"))
  assert local.prepare(pairs, task="seq2seq", data_dir=data_dir) == stats
  with pytest.raises(ValueError, match="other files or options"):
    local.prepare(pairs, task="seq2seq", data_dir=data_dir, seed=7)


def test_a_changed_file_is_an_error_until_prepared_again(pairs, tmp_path):
  data_dir = str(tmp_path / "data")
  local.prepare(pairs, task="seq2seq", data_dir=data_dir, validation_fraction=0, test_fraction=0)
  _write(pairs, "1\tum\n2\tdois\n")
  with pytest.raises(ValueError, match="changed since it was prepared.*--overwrite"):
    sources.get_source(f"local:{pairs}", "train", task="seq2seq", data_dir=data_dir)
  with pytest.raises(ValueError, match="overwrite=True"):
    local.prepare(pairs, task="seq2seq", data_dir=data_dir, validation_fraction=0, test_fraction=0)
  local.prepare(pairs, task="seq2seq", data_dir=data_dir, validation_fraction=0, test_fraction=0,
                overwrite=True)
  assert _read_all(pairs, "seq2seq", data_dir, "train") == [
      {"inputs": "1", "targets": "um"}, {"inputs": "2", "targets": "dois"}]


def test_folder_of_jsonl_splits_with_named_labels_and_pairs(tmp_path):
  folder = tmp_path / "nli"
  folder.mkdir()
  rows = {
      "train": [("entail", "a", "b"), ("contradict", "ação", "c"), ("neutral", "d", "e")],
      "validation": [("neutral", "f", "g")],
  }
  for split, split_rows in rows.items():
    _write(folder / f"{split}.jsonl", "".join(
        json.dumps({"label": l, "text": t, "text_pair": p, "id": 3}) + "\n"
        for l, t, p in split_rows))
  data_dir = str(tmp_path / "data")
  stats = sources.prepare(f"local:{folder}", task="classification", data_dir=data_dir)
  assert stats["splits"] == {"train": 3, "validation": 1}
  assert stats["label_names"] == ["contradict", "entail", "neutral"]
  builder = tfds.builder_from_directory(local._version_dir(str(folder), "classification", data_dir))
  label = builder.info.features["label"]
  for split, split_rows in rows.items():
    read = _read_all(folder, "classification", data_dir, split)
    assert [(label.int2str(ex["label"]), ex["text"], ex["text_pair"]) for ex in read] == split_rows
    assert all(isinstance(ex["label"], int) for ex in read)
  with pytest.raises(ValueError, match="no split 'test'"):
    sources.get_source(f"local:{folder}", "test", task="classification", data_dir=data_dir)


def test_integer_labels_are_class_ids(tmp_path):
  path = _write(tmp_path / "sst.tsv", "0\tbad\n3\tgood\n1\tok\n")
  data_dir = str(tmp_path / "data")
  local.prepare(path, task="classification", data_dir=data_dir,
                validation_fraction=0, test_fraction=0)
  read = _read_all(path, "classification", data_dir, "train")
  assert [(ex["label"], ex["text"]) for ex in read] == [(0, "bad"), (3, "good"), (1, "ok")]
  builder = tfds.builder_from_directory(local._version_dir(path, "classification", data_dir))
  assert builder.info.features["label"].num_classes == 4


def test_lm_text_counts_blank_lines_and_replaces_invalid_utf8(tmp_path):
  raw = b"first doc\n\n   \nsecond \xff\xfe doc\r\nthird\n" + b"more text\n" * 30  # 2 of 335
  path = _write(tmp_path / "corpus.txt", raw, mode="wb")
  data_dir = str(tmp_path / "data")
  stats = local.prepare(path, task="lm", data_dir=data_dir, validation_fraction=0, test_fraction=0)
  assert stats["lines"] == 35 and stats["examples"] == 33
  assert stats["empty_lines"] == 2 and stats["invalid_utf8"] == 1
  expected = [line.decode("utf-8", errors="replace") for line in raw.splitlines() if line.strip()]
  assert [ex["text"] for ex in _read_all(path, "lm", data_dir, "train")] == expected
  with pytest.raises(ValueError, match=r"corpus.txt:4: invalid UTF-8"):
    local.prepare(path, task="lm", data_dir=str(tmp_path / "strict"), on_invalid_utf8="error")


def decode_counting(data: bytes) -> tuple[str, int]:
  """`data` decoded as UTF-8 with U+FFFD for each invalid sequence, and how many there were."""
  errors = []

  def replace(error):
    errors.append(error.start)
    return "\ufffd", error.end
  codecs.register_error("test_data_local.count", replace)
  return data.decode("utf-8", errors="test_data_local.count"), len(errors)


def test_a_file_of_random_bytes_is_not_text(tmp_path):
  data = random.Random(0).randbytes(4000)
  path = _write(tmp_path / "random.txt", data, mode="wb")
  text, invalid = decode_counting(data)
  with pytest.raises(UnicodeDecodeError) as first:
    data.decode("utf-8")
  percent = round(100 * invalid / len(text))
  assert percent > 1
  with pytest.raises(ValueError, match=rf"^{re.escape(path)} is not UTF-8 text: {percent}% of it "
                     rf"does not decode \(first at byte {first.value.start}\)\. Convert it"):
    local.prepare(path, task="lm", data_dir=str(tmp_path / "data"))
  assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("bad, refused", [(b"\xff", False), (b"\xff\xff", True)])
def test_more_than_one_percent_of_invalid_utf8_is_refused(bad, refused, tmp_path):
  raw = b"a" * (99 - len(bad)) + bad + b"\n"  # 100 characters: 1% or 2% of them U+FFFD.
  path = _write(tmp_path / "corpus.txt", raw, mode="wb")
  options = dict(task="lm", data_dir=str(tmp_path / "data"), validation_fraction=0,
                 test_fraction=0)
  if refused:
    with pytest.raises(ValueError, match=r"2% of it does not decode \(first at byte 97\)"):
      local.prepare(path, **options)
  else:
    assert local.prepare(path, **options)["invalid_utf8"] == 1


def test_one_bad_byte_in_a_text_is_replaced_and_counted(tmp_path):
  lines = [f"line {i}: ação número {i}".encode() for i in range(200)]
  lines[57] = lines[57][:8] + b"\xe9" + lines[57][8:]  # A Latin-1 é.
  raw = b"\n".join(lines) + b"\n"
  path = _write(tmp_path / "corpus.txt", raw, mode="wb")
  data_dir = str(tmp_path / "data")
  stats = local.prepare(path, task="lm", data_dir=data_dir, validation_fraction=0,
                        test_fraction=0)
  assert stats["invalid_utf8"] == 1 and stats["examples"] == 200
  texts = [ex["text"] for ex in _read_all(path, "lm", data_dir, "train")]
  assert texts == raw.decode("utf-8", errors="replace").splitlines()


@pytest.mark.parametrize("name, content, message", [
    ("bad.tsv", "a\tb\nonly one column\n", r"bad.tsv:2: expected 2 tab-separated columns"),
    ("bad.tsv", "a\tb\n\tempty inputs\n", r"bad.tsv:2: empty inputs"),
    ("bad.jsonl", GOOD_JSON + '{"inputs": "a"\n', r"bad.jsonl:2: invalid JSON"),
    ("bad.jsonl", GOOD_JSON + '{"inputs": "a"}\n', r"bad.jsonl:2: targets must"),
    ("bad.jsonl", GOOD_JSON + '[1, 2]\n', r"bad.jsonl:2: expected a JSON object"),
    ("bad.jsonl", GOOD_JSON + '{"inputs": "\\ud800", "targets": "b"}\n',
     r"bad.jsonl:2: inputs holds an unpaired surrogate"),
])
def test_malformed_lines_are_errors_or_counted_skips(tmp_path, name, content, message):
  path = _write(tmp_path / name, content * 3)
  options = dict(task="seq2seq", validation_fraction=0, test_fraction=0)
  with pytest.raises(ValueError, match=message + ".*on_malformed='skip'"):
    local.prepare(path, data_dir=str(tmp_path / "a"), **options)
  stats = local.prepare(path, data_dir=str(tmp_path / "b"), on_malformed="skip", **options)
  assert stats["malformed"] == 3 and stats["examples"] == 3
  assert len(_read_all(path, "seq2seq", str(tmp_path / "b"), "train")) == 3


def test_missing_files_empty_splits_and_unprepared_data_are_clear_errors(tmp_path):
  data_dir = str(tmp_path / "data")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    local.prepare(str(tmp_path / "nope.tsv"), task="seq2seq", data_dir=data_dir)
  (tmp_path / "folder").mkdir()
  with pytest.raises(FileNotFoundError, match="no train.tsv or train.jsonl"):
    local.prepare(str(tmp_path / "folder"), task="seq2seq", data_dir=data_dir)
  tiny = _write(tmp_path / "tiny.txt", "a\nb\nc\n")
  with pytest.raises(ValueError, match="leaves validation empty"):
    local.prepare(tiny, task="lm", data_dir=data_dir)
  blank = _write(tmp_path / "blank.txt", "\n \n")
  with pytest.raises(ValueError, match="has no examples"):
    local.prepare(blank, task="lm", data_dir=data_dir)
  with pytest.raises(ValueError, match=r"\.tsv or \.jsonl or \.csv or \.parquet file"):
    local.prepare(tiny, task="seq2seq", data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="python -m train.data.sources local:.*--task=lm"):
    sources.get_source(f"local:{tiny}", "train", task="lm", data_dir=data_dir)
  mixed = _write(tmp_path / "mixed.tsv", "1\ta\tb\n0\tc\n")
  with pytest.raises(ValueError, match="Some lines have a text_pair"):
    local.prepare(mixed, task="classification", data_dir=data_dir)


def test_the_prepare_command_prepares(pairs, tmp_path):
  data_dir = str(tmp_path / "data")
  sources.main([f"local:{pairs}", "--task=seq2seq", f"--data_dir={data_dir}", "--seed=2"])
  stats = local.prepare(pairs, task="seq2seq", data_dir=data_dir, seed=2)
  assert sum(stats["splits"].values()) == 40
