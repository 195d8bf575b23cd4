"""Grain worker processes that do not outlive the run that started them.

A run killed outright (`kill -9`, the kernel's OOM killer, a scheduler's hard kill after its grace
period) cannot stop its Grain workers, and Grain 0.2.18's workers keep running as orphans: after a
`kill -9` of a digits run they were still alive, each on a core and holding its shared memory,
38 minutes later. On a shared GPU node that is 15 cores gone until someone notices. Each worker
therefore watches its parent and exits when the parent is gone (its parent process id changes
when it is re-parented). Polling rather than Linux's `PR_SET_PDEATHSIG`: that signal follows the
*thread* that started the process, and Grain starts its workers from a pool of threads that may
end while the run goes on.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Callable

POLL_S = 0.5  # how soon an orphaned worker exits; one getppid() per poll


def exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """Grain's `worker_init_fn`: starts a daemon thread that ends this process once its parent
  (`parent_pid`) is gone. The worker's index and count are Grain's arguments, unused."""
  del worker_index, worker_count

  def watch() -> None:
    while os.getppid() == parent_pid:
      time.sleep(POLL_S)
    os._exit(1)  # no cleanup to run: the run is dead; its resource tracker frees shared memory

  threading.Thread(target=watch, name='exit-with-parent', daemon=True).start()


def worker_init_fn() -> Callable[[int, int], None]:
  """The `mp_prefetch(worker_init_fn=...)` of this process's Grain workers."""
  return functools.partial(exit_with_parent, os.getpid())
