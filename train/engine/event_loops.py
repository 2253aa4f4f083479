"""The asyncio event loops orbax reads and writes checkpoints in, made safe for checkpoint.py.

Loops that settle. Orbax runs each checkpoint read in a fresh event loop over an
`asyncio.gather` of tensorstore reads. When one read fails (a truncated or garbled checkpoint
file), the gather raises at once and orbax closes the loop while the other reads are still in
flight: each of them then completes into the closed loop, and prints a traceback ("Event loop
is closed", "Task exception was never retrieved") after the one clear error. Loops made inside
`settled_loops()` wait for their pending tasks (up to `SETTLE_SECONDS`) before they close.

Threadless exit: `asyncio.to_thread` at an exit that starts no thread runs in the loop's own
thread. Python 3.12 (3.12.1 here; not 3.11, nor 3.13.0) refuses to start a thread once the
interpreter is exiting, in exit hooks and in every other thread alike (CPython gh-113964). Orbax
writes a save in threads of its own, which call `asyncio.to_thread` in fresh event loops (for
its metadata files, the rename of the temporary folder), and each fresh loop starts a thread for
it: a save still in flight at exit then fails, and leaves a temporary folder. Once
`install_threadless_exit()` ran, event loops hand `to_thread`'s calls to their default executor
as before, but while the interpreter exits they run them in their own thread, one after the
other. (A call refused in the instant the exit begins is run here too; should its executor have
a busy thread already, that thread later runs it a second time: orbax's calls there write or
test files, idempotent.)
"""

import asyncio
import contextlib
import sys
import threading

SETTLE_SECONDS = 60.0

_run_in_executor = asyncio.BaseEventLoop.run_in_executor
_shutdown_default_executor = asyncio.BaseEventLoop.shutdown_default_executor


def _exiting() -> bool:
  return getattr(threading, "_SHUTTING_DOWN", False)  # set first thing by threading._shutdown


def _run_here(loop, func, *args) -> asyncio.Future:
  future = loop.create_future()
  try:
    future.set_result(func(*args))
  except Exception as e:  # pylint: disable=broad-except  (the awaiting coroutine's to take)
    future.set_exception(e)
  return future


def _run_in_executor_or_here(loop, executor, func, *args):
  if executor is not None:
    return _run_in_executor(loop, executor, func, *args)
  if _exiting():
    return _run_here(loop, func, *args)
  try:
    return _run_in_executor(loop, executor, func, *args)
  except RuntimeError as e:  # the exit began after the check: "... at interpreter shutdown"
    if "interpreter shutdown" not in str(e):
      raise
    return _run_here(loop, func, *args)


async def _shutdown_default_executor_unless_exiting(loop, *args, **kwargs):
  """asyncio.run's shutdown of the default executor starts a thread: at exit, leave it be."""
  if not _exiting():
    await _shutdown_default_executor(loop, *args, **kwargs)


def install_threadless_exit() -> None:
  """From now on, `to_thread` calls made while the interpreter exits run in their loop's thread
  (on the Pythons that refuse new threads then; elsewhere nothing changes)."""
  if sys.version_info[:2] == (3, 12):
    asyncio.BaseEventLoop.run_in_executor = _run_in_executor_or_here
    asyncio.BaseEventLoop.shutdown_default_executor = _shutdown_default_executor_unless_exiting


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
