"""A local file's lines (or a table's rows) as checked examples of a task (for local.py).

Each bad line is an error naming file:line, or (on_malformed="skip") skipped and counted;
invalid UTF-8 is replaced by U+FFFD and counted (or, on_invalid_utf8="error", an error).
"""

import functools
import json
import pathlib
from typing import Any, Iterator

from absl import logging

from models.errors import InputError
from train.data import chat, tables

_MAX_LOGGED = 10
_MAX_INVALID_UTF8 = 0.01  # of a file's decoded characters; more: it is not UTF-8 text


def examples(file, task, options, counts) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, example) for each good line of `file`; counts what it skips or repairs."""
  if tables.is_table(file):
    yield from _table_examples(file, task, options, counts)
    return
  parse = _parse_jsonl if file.suffix == ".jsonl" else _parse_columns
  with open(file, "rb") as f:
    for line_number, raw in enumerate(f, 1):
      counts["lines"] += 1
      where = f"{file}:{line_number}"
      line = _decode(raw.rstrip(b"\r\n"), where, options["on_invalid_utf8"], counts)
      if not line.strip():
        counts["empty_lines"] += 1
        continue
      try:
        example = parse(line, task)
      except _Malformed as e:
        _skip_malformed(where, e, options, counts)
        continue
      counts["examples"] += 1
      yield line_number, example


def _table_examples(file, task, options, counts) -> Iterator[tuple[int, dict[str, Any]]]:
  """(row index, example) for each good row of the table `file`, checked as JSONL records."""
  optional = ("text_pair",) if task == "classification" else ()
  required = tuple(f for f in record_fields(task) if f not in optional)
  decode = functools.partial(_decode, on_invalid_utf8=options["on_invalid_utf8"], counts=counts)
  rows = tables.records(file, required, optional, options.get("columns", {}), counts, decode)
  for index, (where, record, problem) in enumerate(rows):
    try:
      if problem:
        raise _Malformed(problem)
      if isinstance(record.get("label"), int) and record["label"] < 0:
        raise _Malformed(f"label {record['label']} is not a class id (ids count from 0; "
                         "GLUE's test splits hold -1, no label)")
      example = _parse_record(record, task)
    except _Malformed as e:
      _skip_malformed(where, e, options, counts)
      continue
    counts["examples"] += 1
    yield index, example


def _skip_malformed(where: str, error: Exception, options, counts) -> None:
  """Raises the error of a malformed line or row, or counts and logs it as skipped."""
  if options["on_malformed"] == "error":
    raise InputError(
        f"{where}: {error}. Fix the line, or prepare with on_malformed='skip' "
        "(--on_malformed=skip) to skip and count such lines.") from None
  counts["malformed"] += 1
  if counts["malformed"] <= _MAX_LOGGED:
    logging.warning("Skipping malformed line %s: %s", where, error)


def _decode(raw: bytes, where: str, on_invalid_utf8: str, counts) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if on_invalid_utf8 == "error":
      raise InputError(
          f"{where}: invalid UTF-8 ({e}). Fix the file, or prepare with "
          "on_invalid_utf8='replace' to replace bad bytes by U+FFFD and count them.") from None
    counts["invalid_utf8"] += 1
    if counts["invalid_utf8"] <= _MAX_LOGGED:
      logging.warning("Replacing invalid UTF-8 by U+FFFD at %s.", where)
    return raw.decode("utf-8", errors="replace")


def check_utf8(file: pathlib.Path) -> None:
  """Refuses a file of which more than 1% of the decoded characters would be U+FFFD."""
  chars = replaced = offset = 0
  first_invalid = None
  with open(file, "rb") as f:
    for raw in f:  # No UTF-8 sequence holds a newline byte: lines decode as the whole file.
      try:
        chars += len(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        first_invalid = offset + e.start if first_invalid is None else first_invalid
        text = raw.decode("utf-8", errors="replace")
        chars += len(text)
        own = raw.count("\ufffd".encode("utf-8"))  # U+FFFD the file itself holds.
        replaced += text.count("\ufffd") - own
      offset += len(raw)
  if replaced > _MAX_INVALID_UTF8 * chars:
    raise InputError(
        f"{file} is not UTF-8 text: {100 * replaced / chars:.0f}% of it does not decode "
        f"(first at byte {first_invalid}). Convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) "
        "or give a text file.")


class _Malformed(Exception):
  """A line that does not hold an example of the task."""


def _parse_columns(line: str, task: str) -> dict[str, Any]:
  if task == "lm":
    return {"text": line}
  names = {"seq2seq": ("inputs", "targets"), "classification": ("label", "text")}[task]
  columns = line.split("\t")
  if task == "classification" and len(columns) == 3:
    names += ("text_pair",)
  if len(columns) != len(names):
    raise _Malformed(
        f"expected {len(names)} tab-separated columns ({', '.join(names)}), "
        f"found {len(columns)}")
  example = dict(zip(names, columns))
  for name, value in example.items():
    if not value:
      raise _Malformed(f"empty {name}")
  return example


def _parse_jsonl(line: str, task: str) -> dict[str, Any]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise _Malformed(f"invalid JSON ({e})") from None
  if not isinstance(record, dict):
    raise _Malformed(f"expected a JSON object, found {type(record).__name__}")
  if task == "chat":
    return {"messages": _chat_messages(record)}
  return _parse_record(record, task)


def _parse_record(record: dict[str, Any], task: str) -> dict[str, Any]:
  """The example of a JSON object or a table's row: its task's fields, checked."""
  names = text_fields(task, "text_pair" in record)
  if task == "classification":
    names += ("label",)
  example = {}
  for name in names:
    value = record.get(name)
    if name == "label":
      if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise _Malformed(f"label must be an integer or a name, found {value!r}")
      value = str(value)
    elif not isinstance(value, str) or not value:
      raise _Malformed(f"{name} must be a non-empty string, found {value!r}")
    elif not _encodable(value):
      raise _Malformed(f"{name} holds an unpaired surrogate escape")
    example[name] = value
  return example


def _chat_messages(record: dict) -> str:
  """The record's checked messages, as JSON."""
  try:
    messages = chat.check_messages(record.get("messages"))
  except ValueError as e:
    raise _Malformed(str(e)) from None
  text = json.dumps(messages, ensure_ascii=False)
  if not _encodable(text):
    raise _Malformed("messages hold an unpaired surrogate escape")
  return text


def _encodable(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def text_fields(task: str, has_pair: bool) -> tuple[str, ...]:
  return {
      "lm": ("text",),
      "seq2seq": ("inputs", "targets"),
      "classification": ("text", "text_pair") if has_pair else ("text",),
      "instruct": ("prompt", "response"),
      "chat": ("messages",),
  }[task]


def record_fields(task: str) -> tuple[str, ...]:
  return text_fields(task, True) + (("label",) if task == "classification" else ())
