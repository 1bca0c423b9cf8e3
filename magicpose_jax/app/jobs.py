"""Jobs on disk and the one worker thread that runs them.

A job is a folder `ROOT/jobs/<id>/` holding its uploads (`inputs/`), its results and `job.json`, its state:

    {"id", "created", "status": "new" | "queued" | "running" | "done" | "error", "task": "poses" | "animate" | null,
     "stage": what runs now, "done", "total": progress of the stage, "error": message or null,
     "files": {"reference", "poses", "aligned", "video", "side_by_side": file names in the folder},
     "report": the pose extraction/alignment report, "options": the last options}

State is written atomically (temp file + rename) on every change, so a page reload, another browser, or a restarted
server sees the same job; a job that was queued or running when the server stopped is marked as an error
("interrupted") at the next start, never left spinning. One worker thread runs the tasks in order: the model
uses every core, and the HTTP threads only read and write files, so requests are never blocked by a job.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

JOB_ID = re.compile(r"^[0-9a-f]{12}$")
STATE = "job.json"
TASKS = ("poses", "animate")


class JobStore:
  """Job folders under `root/jobs/`, their state read and written under one lock."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    os.makedirs(os.path.join(self.root, "jobs"), exist_ok=True)
    self._lock = threading.Lock()

  def folder(self, job_id: str) -> str:
    """The job's folder; KeyError for an id that is not one of ours (never a path outside `root`)."""
    if not JOB_ID.match(job_id or "") or not os.path.isfile(os.path.join(self.root, "jobs", job_id, STATE)):
      raise KeyError(f"no job {job_id!r}")
    return os.path.join(self.root, "jobs", job_id)

  def create(self) -> dict[str, Any]:
    job_id = secrets.token_hex(6)
    os.makedirs(os.path.join(self.root, "jobs", job_id, "inputs"))
    state = {"id": job_id, "created": time.time(), "status": "new", "task": None, "stage": "", "done": 0,
             "total": 0, "error": None, "files": {}, "report": None, "options": {}}
    with self._lock:
      self._write(job_id, state)
    return state

  def read(self, job_id: str) -> dict[str, Any]:
    with open(os.path.join(self.folder(job_id), STATE)) as f:
      return json.load(f)

  def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
    """Merges `fields` into the state (`files` and `report` dicts merged one level) and writes it."""
    with self._lock:
      state = self.read(job_id)
      for key, value in fields.items():
        state[key] = {**(state.get(key) or {}), **value} if key == "files" else value
      self._write(job_id, state)
    return state

  def _write(self, job_id: str, state: dict[str, Any]) -> None:
    path = os.path.join(self.root, "jobs", job_id, STATE)
    with open(path + ".tmp", "w") as f:
      json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)

  def mark_interrupted(self) -> list[str]:
    """Jobs left queued or running by a stopped server -> status "error" (their inputs and results are kept)."""
    marked = []
    for job_id in sorted(os.listdir(os.path.join(self.root, "jobs"))):
      try:
        state = self.read(job_id)
      except (KeyError, OSError, ValueError):
        continue
      if state["status"] in ("queued", "running"):
        self.update(job_id, status="error", error="interrupted: the server stopped while this ran; press again")
        marked.append(job_id)
    return marked


Task = Callable[[str, str, dict[str, Any], Callable[..., None]], None]


class Worker:
  """One thread running `task(job_id, task_name, options, report)` for each submitted job, in order.

  `report(stage=..., done=..., total=...)` updates the job's progress; an exception becomes the job's `error` (its
  message; the traceback goes to the server's log), the job's status "done" otherwise.
  """

  def __init__(self, store: JobStore, task: Task, log: Callable[[str], None] = print):
    self.store, self._task, self._log = store, task, log
    self._queue: queue.Queue = queue.Queue()
    self._pending: list[str] = []
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._run, name="magicpose-worker", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def submit(self, job_id: str, task: str, options: dict[str, Any]) -> dict[str, Any]:
    """Queues the task; ValueError if the job already has one queued or running."""
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    with self._lock:
      if job_id in self._pending:
        raise ValueError(f"job {job_id} already has a task queued or running")
      self._pending.append(job_id)
      state = self.store.update(job_id, status="queued", task=task, stage="queued", done=0, total=0, error=None,
                                options=options)
    self._queue.put((job_id, task, options))
    return state

  def position(self, job_id: str) -> int | None:
    """How many jobs run or wait before this one (None: not queued)."""
    with self._lock:
      return self._pending.index(job_id) if job_id in self._pending else None

  def _run(self) -> None:
    while True:
      job_id, task, options = self._queue.get()
      report = lambda **fields: self.store.update(job_id, **fields)  # noqa: B023  (used within this iteration)
      try:
        self.store.update(job_id, status="running", stage="starting")
        self._task(job_id, task, options, report)
        self.store.update(job_id, status="done", stage="done")
      except Exception as e:  # any failure is the job's, shown on its page; the worker goes on)
        self._log(f"job {job_id} ({task}) failed:\n{traceback.format_exc()}")
        self.store.update(job_id, status="error", error=str(e) or type(e).__name__)
      finally:
        with self._lock:
          self._pending.remove(job_id)
