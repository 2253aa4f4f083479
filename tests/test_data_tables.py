"""Tables as local datasets: CSV, Parquet, save_to_disk folders and Parquet shards, written by
the libraries (csv, pyarrow, datasets where installed), read back through the prepared data."""

import csv
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.data import local
from train.data import sources

# A field with a comma, one with a quote, one with a newline: what csv.writer must quote.
SENTENCES = ["plain", "with, comma", 'a "quoted" word', "two\nlines", "ação, \"ok\"\r\nfim"]


def _read_all(path, task, data_dir, split):
  source = sources.get_source(f"local:{path}", split, task=task, data_dir=data_dir)
  return [source[i] for i in range(len(source))]


def _write_csv(path, header, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _save_to_disk(folder, table: pa.Table):
  """`table` as `datasets.Dataset.save_to_disk` writes it: with datasets where installed, else
  as its arrow_dataset.py does (an Arrow IPC stream data-00000-of-00001.arrow, and state.json
  listing it; datasets reads it back with pa.ipc.open_stream)."""
  try:
    import datasets
  except ImportError:
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
      with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))
    (folder / "dataset_info.json").write_text("{}")
    return
  datasets.Dataset(table).save_to_disk(str(folder))


def test_csv_quoting_and_columns_as_csv_reads_them(tmp_path):
  folder = tmp_path / "glue"
  folder.mkdir()
  rows = {"train": [(s, i % 2, i) for i, s in enumerate(SENTENCES * 2)],
          "validation": [(s, 1, 0) for s in SENTENCES[:2]]}
  for split, split_rows in rows.items():
    _write_csv(folder / f"{split}.csv", ["sentence", "label", "idx"], split_rows)
  data_dir = str(tmp_path / "data")
  stats = local.prepare(str(folder), task="classification", data_dir=data_dir,
                        columns={"text": "sentence"})
  assert stats["splits"] == {"train": 10, "validation": 2}
  assert stats["lines"] == 12 and stats["examples"] == 12 and stats["malformed"] == 0
  for split in rows:
    with open(folder / f"{split}.csv", newline="", encoding="utf-8") as f:
      reference = [(row["sentence"], int(row["label"])) for row in csv.DictReader(f)]
    read = _read_all(folder, "classification", data_dir, split)
    assert [(ex["text"], ex["label"]) for ex in read] == reference
  assert reference[1][0] == "with, comma"


def test_one_parquet_file_is_split_by_fractions(tmp_path):
  texts = [f"documento {i}: ação" for i in range(40)]
  path = str(tmp_path / "corpus.parquet")
  pq.write_table(pa.table({"content": texts, "n": list(range(40))}), path, row_group_size=7)
  data_dir = str(tmp_path / "data")
  stats = local.prepare(path, task="lm", data_dir=data_dir, columns={"text": "content"},
                        validation_fraction=0.1, test_fraction=0.1)
  assert stats["splits"] == {"train": 32, "validation": 4, "test": 4}
  read = {split: [ex["text"] for ex in _read_all(path, "lm", data_dir, split)]
          for split in local.SPLITS}
  assert sorted(sum(read.values(), [])) == sorted(pq.read_table(path)["content"].to_pylist())
  assert read["train"] == [t for t in texts if t in read["train"]]  # the file's order


@pytest.mark.parametrize("layout", ["subfolders", "hub"])
def test_a_folder_of_parquet_shards_gives_its_splits(tmp_path, layout):
  folder = tmp_path / "shards"
  pairs = {"train": [(f"in {i}", f"out {i}") for i in range(6)],
           "test": [("in t", "out t")]}
  for split, split_pairs in pairs.items():
    shards = [split_pairs[:4], split_pairs[4:]] if split == "train" else [split_pairs]
    for i, shard in enumerate(shards):
      name = (f"{split}/part-{i}.parquet" if layout == "subfolders"
              else f"{split}-{i:05d}-of-{len(shards):05d}.parquet")
      (folder / name).parent.mkdir(parents=True, exist_ok=True)
      inputs, targets = zip(*shard)
      pq.write_table(pa.table({"inputs": inputs, "targets": targets}), folder / name)
  data_dir = str(tmp_path / "data")
  stats = local.prepare(str(folder), task="seq2seq", data_dir=data_dir)
  assert stats["splits"] == {"train": 6, "test": 1}
  for split, split_pairs in pairs.items():
    read = _read_all(folder, "seq2seq", data_dir, split)
    assert [(ex["inputs"], ex["targets"]) for ex in read] == split_pairs


def test_save_to_disk_folders_dataset_and_dataset_dict(tmp_path):
  table = pa.table({"prompt": [f"p{i}?" for i in range(20)],
                    "answer": [f"r{i}" for i in range(20)]})
  _save_to_disk(tmp_path / "one", table)
  data_dir = str(tmp_path / "data")
  stats = local.prepare(str(tmp_path / "one"), task="instruct", data_dir=data_dir,
                        columns={"response": "answer"}, test_fraction=0)
  assert stats["splits"] == {"train": 19, "validation": 1}
  read = _read_all(tmp_path / "one", "instruct", data_dir, "train")
  assert all(ex["response"] == "r" + ex["prompt"][1:-1] for ex in read)

  root = tmp_path / "dict"
  _save_to_disk(root / "train", table.slice(0, 15))
  _save_to_disk(root / "validation", table.slice(15))
  (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
  stats = local.prepare(str(root), task="instruct", data_dir=data_dir,
                        columns={"response": "answer"})
  assert stats["splits"] == {"train": 15, "validation": 5}
  read = _read_all(root, "instruct", data_dir, "validation")
  assert [ex["prompt"] for ex in read] == table["prompt"].to_pylist()[15:]


def _bad_parquet(path, texts, labels):
  pq.write_table(pa.table({"text": texts, "label": labels}), path)
  return str(path)


@pytest.mark.parametrize("name, write, message", [
    ("bad.csv", lambda p: _write_csv(p, ["text", "label"], [("a", 0), ("b,", 1, "extra")]),
     r"bad\.csv:3: expected 2 columns, as the header, found 3"),
    ("bad.csv", lambda p: _write_csv(p, ["text", "label"], [("a\nb", 0), ("", 1)]),
     r"bad\.csv:4: text must be a non-empty string, found ''"),
    ("bad.csv", lambda p: _write_csv(p, ["text", "label"], [("a", 0), ("b", "")]),
     r"bad\.csv:3: label must be an integer or a name, found ''"),
    ("bad.parquet", lambda p: _bad_parquet(p, ["a", None], [0, 1]),
     r"bad\.parquet\[row 1\]: text must be a non-empty string, found None"),
    ("bad.parquet", lambda p: _bad_parquet(p, ["", "b"], [0, 1]),
     r"bad\.parquet\[row 0\]: text must be a non-empty string, found ''"),
    ("bad.parquet", lambda p: _bad_parquet(p, ["a", "b"], [1, -1]),
     r"bad\.parquet\[row 1\]: label -1 is not a class id \(ids count from 0; GLUE's test "
     r"splits hold -1, no label\)"),
    ("bad.parquet", lambda p: _bad_parquet(p, ["a", "b"], [0, None]),
     r"bad\.parquet\[row 1\]: label must be an integer or a name, found None"),
])
def test_bad_rows_are_errors_naming_the_row_or_counted_skips(tmp_path, name, write, message):
  path = write(tmp_path / name)
  options = dict(task="classification", validation_fraction=0, test_fraction=0)
  with pytest.raises(ValueError, match=message + r"\. Fix the line, or .*on_malformed='skip'"):
    local.prepare(path, data_dir=str(tmp_path / "a"), **options)
  stats = local.prepare(path, data_dir=str(tmp_path / "b"), on_malformed="skip", **options)
  assert stats["malformed"] == 1 and stats["examples"] == 1 and stats["lines"] == 2


def test_columns_a_table_lacks_and_bad_columns_options_are_errors(tmp_path):
  path = _write_csv(tmp_path / "sst.csv", ["sentence", "label"], [("a", 0)] * 20)
  data_dir = str(tmp_path / "data")
  with pytest.raises(ValueError, match=r"sst\.csv has no column for text='text'; its columns "
                     r"are \['sentence', 'label'\]\. Map .* data\.source_options\.columns"):
    local.prepare(path, task="classification", data_dir=data_dir)
  with pytest.raises(ValueError, match=r"no column for text='sentece'"):
    local.prepare(path, task="classification", data_dir=data_dir, columns={"text": "sentece"})
  with pytest.raises(ValueError, match=r"columns maps sentence, which a classification dataset "
                     r"does not have; its fields are text, text_pair, label"):
    local.prepare(path, task="classification", data_dir=data_dir, columns={"sentence": "text"})
  text = tmp_path / "a.txt"
  text.write_text("a\n" * 20)
  with pytest.raises(ValueError, match=r"a\.txt is not one: drop columns or give a table"):
    local.prepare(str(text), task="lm", data_dir=data_dir, columns={"text": "t"})
  assert not (tmp_path / "data").exists()
  floats = _bad_parquet(tmp_path / "floats.parquet", ["a", "b"], [1.0, 0.0])
  with pytest.raises(ValueError, match=r"floats\.parquet\[row 0\]: label must be an integer or "
                     r"a name, found 1\.0"):
    local.prepare(floats, task="classification", data_dir=data_dir)
  assert "columns" in sources.option_names(f"local:{path}")


def test_a_csv_with_a_byte_order_mark_reads_as_utf_8_sig_does(tmp_path):
  path = tmp_path / "excel.csv"
  path.write_bytes("sentence,label\r\n\"um, dois\",1\r\ntrês,0\r\n".encode("utf-8-sig"))
  data_dir = str(tmp_path / "data")
  local.prepare(str(path), task="classification", data_dir=data_dir, columns={"text": "sentence"},
                validation_fraction=0, test_fraction=0)
  with open(path, newline="", encoding="utf-8-sig") as f:
    reference = [(row["sentence"], int(row["label"])) for row in csv.DictReader(f)]
  read = _read_all(path, "classification", data_dir, "train")
  assert [(ex["text"], ex["label"]) for ex in read] == reference


def test_a_row_csv_cannot_read_is_an_error_naming_its_line(tmp_path):
  too_long = "x" * (csv.field_size_limit() + 1)
  path = _write_csv(tmp_path / "long.csv", ["text"], [("short",), (too_long,)])
  with open(path, newline="", encoding="utf-8") as f, pytest.raises(csv.Error) as reference:
    list(csv.reader(f))
  with pytest.raises(ValueError, match=rf"long\.csv:3: Python's csv module cannot read this row "
                     rf"\({re.escape(str(reference.value))}\)\. Fix it, or give the data as"):
    local.prepare(path, task="lm", data_dir=str(tmp_path / "data"))


def test_files_pyarrow_cannot_read_are_errors_naming_them(tmp_path):
  (tmp_path / "text.parquet").write_text("text\nnot parquet\n")
  with pytest.raises(pa.ArrowException) as reference:
    pq.ParquetFile(tmp_path / "text.parquet")
  with pytest.raises(ValueError, match=rf"text\.parquet is not a Parquet file pyarrow can read "
                     rf"\({re.escape(str(reference.value))}\)"):
    local.prepare(str(tmp_path / "text.parquet"), task="lm", data_dir=str(tmp_path / "data"))
  _save_to_disk(tmp_path / "cut", pa.table({"text": ["a", "b"] * 100}))
  data = next((tmp_path / "cut").glob("*.arrow"))
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  with pytest.raises(ValueError, match=r"data-00000-of-00001\.arrow is not an Arrow IPC stream "
                     r"pyarrow can read, as save_to_disk writes \(.+\)"):
    local.prepare(str(tmp_path / "cut"), task="lm", data_dir=str(tmp_path / "data"))


def test_csv_invalid_utf8_is_replaced_and_counted(tmp_path):
  raw = "text,label\n".encode() + b"caf\xe9,0\n" + "ação,1\n".encode() * 200
  path = tmp_path / "latin.csv"
  path.write_bytes(raw)
  data_dir = str(tmp_path / "data")
  stats = local.prepare(str(path), task="classification", data_dir=data_dir,
                        validation_fraction=0, test_fraction=0)
  assert stats["invalid_utf8"] == 1 and stats["examples"] == 201
  assert _read_all(path, "classification", data_dir, "train")[0]["text"] == "caf\ufffd"


def test_the_prepare_command_takes_columns_as_json(tmp_path):
  path = _write_csv(tmp_path / "sst.csv", ["sentence", "label"], [("a", 0), ("b", 1)] * 10)
  data_dir = str(tmp_path / "data")
  sources.main([f"local:{path}", "--task=classification", f"--data_dir={data_dir}",
                '--columns={"text": "sentence"}'])
  assert len(_read_all(path, "classification", data_dir, "train")) == 18


@pytest.mark.slow
def test_a_glue_style_csv_trains_a_classifier(tmp_path):
  """sentence,label CSVs (train and validation) through a tiny from-scratch classify run."""
  from experiments import finetune_classify
  from train.engine import loop
  folder = tmp_path / "sst2"
  folder.mkdir()
  words = ["good", "bad", "fine, \"really\"", "awful\nday"]
  for split, count in (("train", 64), ("validation", 16)):
    _write_csv(folder / f"{split}.csv", ["idx", "sentence", "label"],
               [(i, words[i % 4], i % 2) for i in range(count)])
  config = finetune_classify.get_config("scratch,tiny")
  config.data.source = f"local:{folder}"
  config.data.source_options = {"columns": {"text": "sentence"}}
  config.data.tokenizer, config.data.tokenizer_path, config.data.vocab_size = "bytes", "", 0
  config.model.num_classes = 2
  results = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["data_examples"] == 16 and 0 <= results["accuracy"] <= 1  # validation.csv
