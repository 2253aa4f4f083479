"""SIGTERM and SIGINT as a flag the training loop polls: it saves a checkpoint and stops cleanly."""

import logging
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Turns SIGTERM and SIGINT into `should_stop()`, so the loop saves and exits cleanly.

  The handlers are installed on entering and the previous ones put back on exit. A second
  SIGINT raises KeyboardInterrupt, so a stuck run can still be interrupted.

  With several processes (`jax.process_count() > 1`) all of them must stop at the same
  step, which a per-host flag cannot promise. There the guard installs no handlers and
  leaves SIGTERM to JAX's preemption service (started by `jax.distributed.initialize`):
  `should_stop(step)`, called at every step on every process, is True on all of them at
  the same step once any was told to stop (`multihost_utils.reached_preemption_sync_point`).
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.received: int | None = None  # the first signal received, if any
    self._previous: dict[int, Any] = {}

  def should_stop(self, step: int | None = None) -> bool:
    """True once a stop was requested; pass the step to honour multi-host preemption."""
    if self.received is not None:
      return True
    if step is None:
      return False
    try:
      return multihost_utils.reached_preemption_sync_point(int(step))
    except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
      return False

  def _handle(self, signum, frame) -> None:
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum
    logging.warning("Received %s: saving a checkpoint and stopping after this step.",
                    signal.Signals(signum).name)

  def __enter__(self) -> "PreemptionGuard":
    if jax.process_count() > 1:
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard outside the main thread: signals are not handled.")
      return self
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()
