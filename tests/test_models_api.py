"""models/__init__.py: every public name resolves, is described, and `import models` stays light."""

import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_its_module():
  for name in models.__all__:
    value = getattr(models, name)
    holder = inspect.getmodule(value)
    assert holder.__name__ == f"models.{models._PUBLIC[name]}", name  # pylint: disable=protected-access


def test_every_public_name_has_a_line_saying_what_it_is():
  source = (ROOT / "models" / "__init__.py").read_text()
  described = re.findall(r'^    "(\w+)": "\w+",\s+# \S.*$', source, re.MULTILINE)
  assert described == models.__all__


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_block"):
    models.no_such_block  # pylint: disable=pointless-statement


def test_import_models_loads_no_jax_and_its_names_no_torch():
  code = ("import sys, models; light = {'jax', 'flax'} & set(sys.modules); "
          "[getattr(models, name) for name in models.__all__]; "
          "print(sorted(light), sorted({'torch', 'transformers'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[] []"
