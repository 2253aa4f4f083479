"""Chat conversations through a model's own chat template (a Jinja template, as transformers').

A conversation is {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}:
an optional system message first, then user and assistant turns (a user turn first), ending on
an assistant turn.
The template is rendered in a sandboxed Jinja2 environment set up as transformers'
`apply_chat_template` sets up its own (trim_blocks, lstrip_blocks, `raise_exception`, a `tojson`
that keeps non-ASCII text, `{% generation %}` blocks rendered as their body), with the folder's
special tokens (bos_token, eos_token, ...) as variables.

An assistant turn is the text the template adds for it after the generation prompt: what
`render(messages[:i], add_generation_prompt=True)` leaves of `render(messages[:i + 1])`, without
trailing whitespace (its content and end-of-turn token, e.g. "Paris.<|eot_id|>"). Its tokens
are learned (weight 1), the rest is context (weight 0).
"""

import datetime
import functools
import json
import os

import jinja2
from jinja2 import ext, nodes, sandbox
import numpy as np

from models.errors import InputError

ROLES = ("system", "user", "assistant")
TEMPLATE_OPTION = "data.source_options.chat_template"


def check_messages(messages, *, for_generation: bool = False) -> list[dict]:
  """`messages` as {"role", "content"} dicts; a ValueError saying what is wrong with them."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"messages must be a non-empty list, found {messages!r}")
  checked = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ValueError(f"messages[{i}] must be an object, found {message!r}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
      raise ValueError(f"messages[{i}] has role {role!r}; roles are {', '.join(ROLES)}")
    if role == "system" and i:
      raise ValueError(f"messages[{i}] is a system message; only the first may be one")
    if not isinstance(content, str) or not content.strip():
      raise ValueError(f"messages[{i}] ({role}) has empty content {content!r}")
    if role == "assistant" and all(m["role"] == "system" for m in checked):
      raise ValueError(f"messages[{i}] is an assistant turn before any user turn")
    checked.append({"role": role, "content": content})
  last = "user" if for_generation else "assistant"
  if checked[-1]["role"] != last:
    raise ValueError(f"the conversation ends on a {checked[-1]['role']} turn, not on the "
                     f"{last} turn it needs")
  return checked


def read_template(folder: str | None, path: str | None = None) -> str:
  """The chat template at `path`, else the folder's (chat_template.jinja, or the
  tokenizer_config.json's chat_template); an InputError naming the option where there is none."""
  if path:
    return _read(path)
  if folder and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
    return _read(os.path.join(folder, "chat_template.jinja"))
  config = os.path.join(folder or "", "tokenizer_config.json")
  template = _json(config).get("chat_template") if folder else None
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  if not isinstance(template, str) or not template:
    raise InputError(
        f"task='chat' renders conversations with the model's chat template, and "
        f"{folder or 'the run (no init_from=hf:FOLDER)'} has none (no chat_template.jinja, no "
        f"chat_template in tokenizer_config.json): pass one with {TEMPLATE_OPTION}=PATH "
        "(a Jinja file).")
  return template


def special_tokens(folder: str | None) -> dict[str, str]:
  """{"bos_token": "<s>", ...}: the special tokens a tokenizer_config.json names."""
  config = _json(os.path.join(folder, "tokenizer_config.json")) if folder else {}
  tokens = {}
  for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
    token = config.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str):
      tokens[key] = token
  return tokens


class Template:
  """A chat template and the special tokens it reads; pickles as its text (grain workers)."""

  def __init__(self, source: str, specials: dict[str, str] | None = None):
    self.source = source
    self.specials = dict(specials or {})

  def __getstate__(self):
    return {"source": self.source, "specials": self.specials}

  def __setstate__(self, state):
    self.__init__(state["source"], state["specials"])

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
      return _compile(self.source).render(
          messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)
    except jinja2.TemplateError as e:
      raise InputError(f"the chat template fails on a conversation: {e}") from None

  def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end)] character spans of its assistant turns)."""
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      upto = self.render(messages[:i + 1])
      if not upto.startswith(before):
        raise InputError(
            "the chat template does not render a conversation as its earlier turns plus "
            f"the next ({before[-40:]!r} is not a prefix of {upto[-80:]!r}); pass a template "
            f"that does with {TEMPLATE_OPTION}=PATH.")
      spans.append((len(before), len(upto.rstrip())))
    return self.render(messages), spans


def chat_tokens(tokenizer, template: Template, messages: list[dict]
                ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, assistant mask) of the rendered conversation, tokenized whole without added special
  tokens (the template writes them), as transformers' apply_chat_template: a token is in an
  assistant turn from the token holding its first character to that holding its last."""
  text, spans = template.assistant_spans(messages)
  encoding = tokenizer.encoding(text)
  mask = np.zeros(len(encoding.ids), np.int32)
  for start, end in spans:
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is not None and last is not None:
      mask[first:last + 1] = 1
  return np.asarray(encoding.ids, np.int32), mask


def end_of_turn_id(tokenizer, template: Template) -> int:
  """The token that ends an assistant turn: the last of one in a rendered conversation."""
  probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
  ids, mask = chat_tokens(tokenizer, template, probe)
  return int(ids[np.flatnonzero(mask)[-1]])


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
  environment = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, ext.loopcontrols])
  environment.filters["tojson"] = _tojson
  environment.globals["raise_exception"] = _raise_exception
  environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return environment.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise InputError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                     f"fix it or pass another with {TEMPLATE_OPTION}=PATH.") from None


class _Generation(ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant markers): the body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _read(path: str) -> str:
  try:
    with open(os.path.expanduser(path), encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise InputError(f"cannot read the chat template {path} ({e.strerror}); give a readable "
                     f"Jinja file with {TEMPLATE_OPTION}=PATH.") from None


def _json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  return value if isinstance(value, dict) else {}
