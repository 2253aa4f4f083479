"""Tables as local datasets: the rows of CSV files (Python's csv module), Parquet files and
Hugging Face `datasets` folders (pyarrow, imported only when such a file is read).

Forms of PATH, beside train/data/local.py's text files:
  FILE.csv                 a header row, then one row an example; quoting as csv.reader reads
                           it (a quoted field may hold commas, quotes ("") and newlines)
  FILE.parquet             one row an example
  a save_to_disk folder    state.json + data-*.arrow (a Dataset, split by fractions), or
                           dataset_dict.json + a subfolder a split (a DatasetDict)
  a folder of shards       train/ (validation/, test/) subfolders of *.parquet files, or
                           train-*.parquet (validation-*, test-*) files, as the Hub stores them
Columns are ours by name (text, label, ...) or mapped: columns={"text": "sentence"}.
Rows are named FILE:LINE in a CSV file (the line the row starts on) and FILE[row I] in
Parquet and Arrow files (I counts from 0, as table[I]).
"""

import csv
import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterator

from models.errors import InputError

EXTENSIONS = (".csv", ".parquet")
_SPLITS = ("train", "validation", "test")
_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class Shards:
  """The Parquet or Arrow files of one split, read in order as one table."""
  folder: pathlib.Path
  files: tuple[pathlib.Path, ...]

  def __str__(self) -> str:
    return str(self.folder)


def is_table(file) -> bool:
  return isinstance(file, Shards) or file.suffix in EXTENSIONS


def split_files(root: pathlib.Path) -> dict[str, Shards]:
  """{"all": shards} for a save_to_disk Dataset, {split: shards} for a DatasetDict or a folder
  of shards; {} for a folder that is none of these."""
  if (root / "state.json").is_file():
    return {"all": _arrow_shards(root)}
  if (root / "dataset_dict.json").is_file():
    splits = _read_json(root / "dataset_dict.json").get("splits", [])
    return {split: _arrow_shards(root / split) for split in _SPLITS if split in splits}
  found = {}
  for split in _SPLITS:
    files = sorted((root / split).glob("*.parquet")) or sorted(root.glob(f"{split}-*.parquet"))
    if files:
      found[split] = Shards(root / split if (root / split).is_dir() else root, tuple(files))
  return found


def fingerprint(file) -> Any:
  """Path, size and mtime of each file the table reads."""
  files = file.files if isinstance(file, Shards) else (file,)
  stamps = [{"path": str(f.resolve()), "size": f.stat().st_size,
             "mtime_ns": f.stat().st_mtime_ns} for f in files]
  return stamps if isinstance(file, Shards) else stamps[0]


def check_columns(columns, fields: tuple[str, ...], task: str) -> dict[str, str]:
  """`columns` as a dict of our field -> their column, each field one of the task's."""
  if not hasattr(columns, "items") or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
    raise InputError(
        f"columns={columns!r} must map our field names to column names, such as "
        '{"text": "sentence", "label": "label"}.')
  unknown = sorted(set(columns) - set(fields))
  if unknown:
    raise InputError(
        f"columns maps {', '.join(unknown)}, which a {task} dataset does not have; its fields "
        f"are {', '.join(fields)}.")
  return dict(columns)


def records(file, required: tuple[str, ...], optional: tuple[str, ...],
            columns: dict[str, str], counts, decode: Callable[[bytes, str], str]
            ) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
  """(where, {field: value}, None) for each row of `file`, or (where, None, what is wrong) for
  a CSV row of another length than the header: `required` fields and those of `optional` the
  table has, None where a row lacks a value; counts its rows and blank CSV lines."""
  if isinstance(file, pathlib.Path) and file.suffix == ".csv":
    yield from _csv_records(file, required, optional, columns, counts, decode)
    return
  shards = file.files if isinstance(file, Shards) else (file,)
  for shard in shards:
    batches = _parquet_batches(shard) if shard.suffix == ".parquet" else _arrow_batches(shard)
    names = _field_columns(shard, next(batches), required, optional, columns)
    index = 0
    for batch in batches:
      for row in batch.select(list(dict.fromkeys(names.values()))).to_pylist():
        counts["lines"] += 1
        yield (f"{shard}[row {index}]", {ours: row[theirs] for ours, theirs in names.items()},
               None)
        index += 1


def _csv_records(file, required, optional, columns, counts, decode):
  with open(file, "rb") as f:
    lines = (decode(raw, f"{file}:{number}") for number, raw in enumerate(f, 1))
    reader = csv.reader(lines)
    rows = _csv_rows(reader, file)
    header = next(rows, [])
    if header:  # Excel writes UTF-8 with a byte order mark, which Python's "utf-8-sig" drops.
      header[0] = header[0].removeprefix("\ufeff")
    names = _field_columns(file, header, required, optional, columns)
    positions = {ours: header.index(theirs) for ours, theirs in names.items()}
    start = reader.line_num + 1
    for row in rows:
      where, start = f"{file}:{start}", reader.line_num + 1
      if not row:
        counts["empty_lines"] += 1
        continue
      counts["lines"] += 1
      if len(row) != len(header):
        yield where, None, f"expected {len(header)} columns, as the header, found {len(row)}"
        continue
      yield where, {ours: row[position] for ours, position in positions.items()}, None


def _csv_rows(reader, file) -> Iterator[list[str]]:
  """The rows of csv.reader, whose errors (a field over csv.field_size_limit(), ...) name the
  line."""
  while True:
    try:
      yield next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise InputError(
          f"{file}:{reader.line_num}: Python's csv module cannot read this row ({e}). Fix it, "
          "or give the data as .jsonl or .parquet.") from None


def _field_columns(file, schema, required, optional, columns) -> dict[str, str]:
  """Our field -> its column in `file`, whose column names `schema` gives (a header row, or an
  Arrow schema)."""
  names = list(schema) if isinstance(schema, list) else schema.names
  wanted = {ours: columns.get(ours, ours) for ours in required + optional}
  missing = [f for f in required if wanted[f] not in names]
  if missing:
    mapped = ", ".join(f"{f}={wanted[f]!r}" for f in missing)
    raise InputError(
        f"{file} has no column for {mapped}; its columns are {names}. Map our field names to "
        'its columns with data.source_options.columns, such as {"text": "sentence"}.')
  return {ours: theirs for ours, theirs in wanted.items() if theirs in names}


def _parquet_batches(file):
  """The schema, then the record batches of a Parquet file."""
  import pyarrow as pa  # only where a Parquet file is read
  import pyarrow.parquet as pq
  try:
    parquet = pq.ParquetFile(file)
    yield parquet.schema_arrow
    yield from parquet.iter_batches(batch_size=_BATCH_ROWS)
  except (pa.ArrowException, OSError) as e:  # pyarrow's IOError status is an OSError
    raise InputError(f"{file} is not a Parquet file pyarrow can read ({e}).") from None


def _arrow_batches(file):
  """The schema, then the record batches of an Arrow IPC stream (datasets' data-*.arrow)."""
  import pyarrow as pa  # only where an Arrow file is read
  try:
    with pa.memory_map(str(file)) as source:
      reader = pa.ipc.open_stream(source)
      yield reader.schema
      yield from reader
  except (pa.ArrowException, OSError) as e:
    raise InputError(f"{file} is not an Arrow IPC stream pyarrow can read, as save_to_disk "
                     f"writes ({e}).") from None


def _arrow_shards(folder: pathlib.Path) -> Shards:
  """The data files a save_to_disk Dataset folder's state.json lists."""
  state = folder / "state.json"
  if not state.is_file():
    raise InputError(f"{folder} holds no state.json: it is not a folder save_to_disk wrote.")
  files = [folder / entry["filename"] for entry in _read_json(state).get("_data_files", [])]
  if not files or not all(f.is_file() for f in files):
    raise InputError(f"{state} lists data files {[str(f) for f in files]} that are not there.")
  return Shards(folder, tuple(files))


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise InputError(f"{path} is not readable JSON ({e}).") from None
