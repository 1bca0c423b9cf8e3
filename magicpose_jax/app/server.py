"""The app's HTTP server: Python's `http.server` (a thread per request), one static page, a small JSON API.

    GET  /                                  the page (static/index.html; ?job=ID reopens a job)
    GET  /static/NAME                       its script and style
    GET  /api/info                          the model (checkpoint, image size, loading/ready/error) and defaults
    POST /api/jobs                          a new job -> its state (see `jobs`)
    GET  /api/jobs/ID                       the job's state, with `queue_position` while it waits or runs
    PUT  /api/jobs/ID/inputs/ROLE?name=N    an upload as the raw request body: ROLE reference | driving | pose
    POST /api/jobs/ID/run/TASK              queue "poses" or "animate" with JSON options -> the state
    GET  /jobs/ID/FILE                      a result the job lists (byte ranges served, for video seeking)

Errors are JSON `{"error": message}` with status 400 (bad input), 404 (unknown job or file) or 409 (busy).
No request waits on the model: tasks run on the worker thread and the page polls the job's state.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from magicpose_jax.app.studio import Studio, parse_options

MAX_UPLOAD = 2**30  # bytes per file
STATIC = ("index.html", "app.js", "app.css")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Handler(BaseHTTPRequestHandler):
  """Routes of the module docstring; `self.server.studio` does the work."""

  server: AppServer
  protocol_version = "HTTP/1.1"

  def log_message(self, format: str, *args: Any) -> None:
    if self.server.verbose:
      super().log_message(format, *args)

  # -- responses --------------------------------------------------------------------------------------------------

  def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, payload: Any) -> None:
    self._send(status, json.dumps(payload).encode(), "application/json")

  def _error(self, status: int, message: str) -> None:
    self._json(status, {"error": message})

  def _file(self, path: str) -> None:
    size = os.path.getsize(path)
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    match = _RANGE.match(self.headers.get("Range", ""))
    start, end, status = 0, size - 1, HTTPStatus.OK
    headers = {"Accept-Ranges": "bytes"}
    if match and (match.group(1) or match.group(2)):
      if match.group(1):
        start, end = int(match.group(1)), int(match.group(2)) if match.group(2) else size - 1
      else:  # the last N bytes
        start = max(0, size - int(match.group(2)))
      end = min(end, size - 1)
      if start > end:
        self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain", {"Content-Range": f"bytes */{size}"})
        return
      status = HTTPStatus.PARTIAL_CONTENT
      headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    with open(path, "rb") as f:
      f.seek(start)
      self._send(status, f.read(end - start + 1), content_type, headers)

  # -- routes -----------------------------------------------------------------------------------------------------

  def do_HEAD(self) -> None:
    self.do_GET()

  def do_GET(self) -> None:
    url = urllib.parse.urlsplit(self.path)
    parts = [p for p in url.path.split("/") if p]
    studio = self.server.studio
    try:
      if not parts:
        self._send(HTTPStatus.OK, _static("index.html"), "text/html; charset=utf-8")
      elif parts[0] == "static" and len(parts) == 2 and parts[1] in STATIC:
        self._send(HTTPStatus.OK, _static(parts[1]), mimetypes.guess_type(parts[1])[0] + "; charset=utf-8")
      elif parts == ["api", "info"]:
        self._json(HTTPStatus.OK, studio.info())
      elif parts[:2] == ["api", "jobs"] and len(parts) == 3:
        state = studio.store.read(parts[2])
        self._json(HTTPStatus.OK, {**state, "queue_position": studio.worker.position(parts[2])})
      elif parts[0] == "jobs" and len(parts) == 3:
        state = studio.store.read(parts[1])
        if parts[2] not in [f for f in state["files"].values() if f]:
          raise KeyError(f"job {parts[1]} has no result {parts[2]!r}")
        self._file(os.path.join(studio.store.folder(parts[1]), parts[2]))
      else:
        self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")
    except KeyError as e:
      self._error(HTTPStatus.NOT_FOUND, str(e.args[0]))

  def do_POST(self) -> None:
    parts = [p for p in urllib.parse.urlsplit(self.path).path.split("/") if p]
    studio = self.server.studio
    try:
      body = self._body()
      if parts == ["api", "jobs"]:
        self._json(HTTPStatus.CREATED, studio.store.create())
      elif parts[:2] == ["api", "jobs"] and len(parts) == 5 and parts[3] == "run":
        studio.store.folder(parts[2])
        try:
          raw = json.loads(body or b"{}")
        except json.JSONDecodeError as e:
          raise ValueError(f"options: not JSON ({e})") from None
        if not isinstance(raw, dict):
          raise ValueError("options: expected a JSON object")
        options = parse_options(raw, studio.config.defaults())
        try:
          self._json(HTTPStatus.OK, studio.worker.submit(parts[2], parts[4], options))
        except ValueError as e:
          self._error(HTTPStatus.CONFLICT if "already" in str(e) else HTTPStatus.BAD_REQUEST, str(e))
      else:
        self._error(HTTPStatus.NOT_FOUND, f"no action {self.path}")
    except KeyError as e:
      self._error(HTTPStatus.NOT_FOUND, str(e.args[0]))
    except ValueError as e:
      self._error(HTTPStatus.BAD_REQUEST, str(e))

  def do_PUT(self) -> None:
    url = urllib.parse.urlsplit(self.path)
    parts = [p for p in url.path.split("/") if p]
    name = urllib.parse.parse_qs(url.query).get("name", [""])[0]
    try:
      if not (parts[:2] == ["api", "jobs"] and len(parts) == 5 and parts[3] == "inputs"):
        self._error(HTTPStatus.NOT_FOUND, f"no upload {url.path}")
        return
      self.server.studio.store.folder(parts[2])
      if self.server.studio.worker.position(parts[2]) is not None:
        self._error(HTTPStatus.CONFLICT, f"job {parts[2]} is running; start a new job for new inputs")
        return
      stored = self.server.studio.save_input(parts[2], parts[4], name or "upload", self._body())
      self._json(HTTPStatus.OK, {"stored": stored})
    except KeyError as e:
      self._error(HTTPStatus.NOT_FOUND, str(e.args[0]))
    except ValueError as e:
      self._error(HTTPStatus.BAD_REQUEST, str(e))

  def _body(self) -> bytes:
    length = int(self.headers.get("Content-Length") or 0)
    if length > MAX_UPLOAD:
      raise ValueError(f"upload of {length} bytes: over the {MAX_UPLOAD} byte limit")
    return self.rfile.read(length) if length else b""


def _static(name: str) -> bytes:
  return resources.files("magicpose_jax.app").joinpath("static", name).read_bytes()


class AppServer(ThreadingHTTPServer):
  """A threading HTTP server holding the `Studio` its handlers use."""

  daemon_threads = True

  def __init__(self, studio: Studio, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False):
    self.studio, self.verbose = studio, verbose
    super().__init__((host, port), Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/"
