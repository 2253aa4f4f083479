"""asyncio event loops that let the work they started finish before they close.

Orbax runs each checkpoint read in a fresh event loop over an `asyncio.gather` of tensorstore
reads. When one read fails (a truncated or garbled checkpoint file), the gather raises at once
and orbax closes the loop while the other reads are still in flight: each of them then
completes into the closed loop, and prints a traceback ("Event loop is closed", "Task
exception was never retrieved") after the one clear error. Loops made inside `settled_loops()`
wait for their pending tasks (up to `SETTLE_SECONDS`) before they close.
"""

import asyncio
import contextlib

SETTLE_SECONDS = 60.0


class _SettlingLoop(asyncio.SelectorEventLoop):
  """An event loop whose close() first waits for its pending tasks, their errors taken."""

  def close(self):
    pending = asyncio.all_tasks(self)
    if pending and not self.is_running() and not self.is_closed():
      done, _ = self.run_until_complete(asyncio.wait(pending, timeout=SETTLE_SECONDS))
      for task in done:
        if not task.cancelled():
          task.exception()  # the read's error, already told by the one that failed first
    super().close()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self):
    return _SettlingLoop()


@contextlib.contextmanager
def settled_loops():
  """Within: every new event loop lets its pending tasks finish before it closes."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_SettlingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)
