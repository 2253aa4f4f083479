"""What the CLIs over a trained workdir (train.generate, train.attention_maps) share: the
--workdir and --input flags, their parsing, and a main that loads the run and answers."""

from collections.abc import Callable

from absl import flags, logging

from train import cli, workdir as workdir_lib


def define_flags(input_required: bool = True):
  """--workdir (required) and --input (repeatable); a CLI calls this when it runs."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_multi_string("input", None, "Input text (repeat for several).")
  flags.mark_flags_as_required(["workdir", "input"] if input_required else ["workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for app.run(flags_parser=...): a bad or missing flag is one `error:`
  line and exit status 2 (train/cli.py), not absl's FATAL message and exit status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(e, "--helpshort lists the flags.")


def main(answer: Callable[[workdir_lib.Run, list[str]], None]):
  """Calls answer(the --workdir run, the --input texts); bad input ends as one `error:` line
  (train/cli.py)."""
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  cli.guarded(lambda: answer(workdir_lib.load(flags.FLAGS.workdir), flags.FLAGS.input))()
