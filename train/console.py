"""Lines for the person running the experiment: printed once, by process 0."""

import jax


def say(message: str):
  """Prints `message` on process 0 only, flushed at once."""
  if jax.process_index() == 0:
    print(message, flush=True)
