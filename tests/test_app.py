"""The web app (`python -m magicpose_jax.app`) on the tiny stage-2 run of test_export_run.py.

The HTTP API is driven with urllib (jobs on disk, the worker, errors), and the page end to end in a real headless
Chromium (Debian's `chromium` + `chromium-driver`, installed by `make` as root) with Selenium: upload a photo and
a short generated video, show the poses, animate, and check the video element and its file (decoded by imageio's
ffmpeg) hold the expected frames; a reload of the job's URL shows the result again.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from test_animate import read_mp4
from test_export_run import make_tiny_run

from magicpose_jax import inference
from magicpose_jax.app.__main__ import main as app_main
from magicpose_jax.app.jobs import JobStore
from magicpose_jax.app.server import AppServer
from magicpose_jax.app.studio import AppConfig, Studio

FRAMES = 3  # driving video frames at the app's 8 fps: all taken
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,1400")
SCREENSHOTS = os.environ.get("MAGICPOSE_APP_SCREENSHOTS")  # a folder: the browser test saves the page there


def _driving_video(path: str) -> None:
  """The astronaut photo moving left and growing: a person MediaPipe finds in every frame."""
  photo = skdata.astronaut()  # 512 x 512
  frames = []
  for i in range(FRAMES):
    crop = photo[20 * i:512 - 10 * i, 10 * i:512 - 20 * i]
    frames.append(np.asarray(Image.fromarray(crop).resize((256, 256))))
  inference.write_frames(path, np.stack(frames), fps=8)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
  root = tmp_path_factory.mktemp("app")
  Image.fromarray(skdata.astronaut()).save(root / "photo.png")
  _driving_video(str(root / "dance.mp4"))
  studio = Studio(AppConfig(checkpoint=make_tiny_run(), outputs=str(root / "outputs"), steps=2, max_frames=FRAMES,
                            batch_frames=2), log=lambda message: None)
  server = AppServer(studio, port=0)
  studio.start()
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server, root
  server.shutdown()
  server.server_close()


def _call(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
  request = urllib.request.Request(server.url.rstrip("/") + path, data=body, method=method)
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _wait(server, job_id: str, timeout: float = 240) -> dict:
  deadline = time.time() + timeout
  while time.time() < deadline:
    _, state = _call(server, "GET", f"/api/jobs/{job_id}")
    if state["status"] in ("done", "error"):
      return state
    time.sleep(0.2)
  raise TimeoutError(f"job {job_id}: {state}")


def test_api_jobs_run_in_the_background_and_stay_on_disk(app):
  server, root = app
  status, job = _call(server, "POST", "/api/jobs")
  assert status == 201
  jid = job["id"]
  assert _call(server, "PUT", f"/api/jobs/{jid}/inputs/reference?name=photo.png",
               (root / "photo.png").read_bytes())[0] == 200
  assert _call(server, "PUT", f"/api/jobs/{jid}/inputs/driving?name=dance.mp4", (root / "dance.mp4").read_bytes())[0] \
      == 200
  status, state = _call(server, "POST", f"/api/jobs/{jid}/run/animate", json.dumps({"align": True}).encode())
  assert status == 200 and state["status"] == "queued"
  # A second task on a busy job is refused; other requests are answered while the job runs.
  assert _call(server, "POST", f"/api/jobs/{jid}/run/poses", b"{}")[0] == 409
  start = time.time()
  assert _call(server, "GET", "/api/info")[0] == 200
  assert time.time() - start < 2
  state = _wait(server, jid)
  assert state["status"] == "done", state["error"]
  assert state["report"]["frames"] == FRAMES and state["report"]["no_person"] == []
  assert state["report"]["align"]["anchor_frame"] == 0
  size = studio_size = tuple(_call(server, "GET", "/api/info")[1]["image_size"])
  for name in ("poses", "aligned", "video"):
    assert read_mp4(os.path.join(server.studio.store.folder(jid), state["files"][name])).shape == (FRAMES, *size, 3)
  assert read_mp4(os.path.join(server.studio.store.folder(jid), "side_by_side.mp4")).shape[2] == 3 * studio_size[1]
  # The result is served (byte ranges too), and a fresh store on the same folder reads the same state.
  with urllib.request.urlopen(server.url + f"jobs/{jid}/animation.mp4") as response:
    whole = response.read()
  request = urllib.request.Request(server.url + f"jobs/{jid}/animation.mp4", headers={"Range": "bytes=10-19"})
  with urllib.request.urlopen(request) as response:
    assert response.status == 206 and response.read() == whole[10:20]
  assert JobStore(server.studio.store.root).read(jid)["files"]["video"] == "animation.mp4"


def test_api_errors_are_clear(app):
  server, root = app
  _, job = _call(server, "POST", "/api/jobs")
  jid = job["id"]
  status, payload = _call(server, "PUT", f"/api/jobs/{jid}/inputs/reference?name=x.png", b"not an image")
  assert status == 400 and "not a readable image" in payload["error"]
  status, payload = _call(server, "PUT", f"/api/jobs/{jid}/inputs/driving?name=x.gif", b"GIF89a")
  assert status == 400 and "expected a video" in payload["error"]
  status, payload = _call(server, "POST", f"/api/jobs/{jid}/run/animate", json.dumps({"steps": "many"}).encode())
  assert status == 400 and "option steps='many'" in payload["error"]
  # Missing inputs: the job ends in an error that says what is missing.
  _call(server, "POST", f"/api/jobs/{jid}/run/poses", b"{}")
  assert _wait(server, jid)["error"] == "no reference photo uploaded"
  # A blank photo has no person to align to.
  Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(root / "blank.png")
  _call(server, "PUT", f"/api/jobs/{jid}/inputs/reference?name=blank.png", (root / "blank.png").read_bytes())
  _call(server, "PUT", f"/api/jobs/{jid}/inputs/driving?name=dance.mp4", (root / "dance.mp4").read_bytes())
  _call(server, "POST", f"/api/jobs/{jid}/run/poses", b"{}")
  assert "no person found in the reference photo" in _wait(server, jid)["error"]
  for path in ("/api/jobs/000000000000", f"/jobs/{jid}/job.json", f"/jobs/{jid}/..%2F..%2Fjob.json", "/nothing"):
    assert _call(server, "GET", path)[0] == 404, path
  # A job left running by a stopped server is marked, not left spinning.
  store = JobStore(str(root / "other"))
  left = store.create()["id"]
  store.update(left, status="running")
  assert JobStore(str(root / "other")).mark_interrupted() == [left]
  assert store.read(left)["status"] == "error" and "interrupted" in store.read(left)["error"]
  assert app_main(["--checkpoint", str(root / "no_such_run")]) == 2


def _browser(profile: str):
  """Selenium on Debian's chromium; a clear failure (not a skip) where it is not installed."""
  from selenium import webdriver  # noqa: PLC0415  (test-only dependency, imported where used)
  from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

  chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not chromium or not driver:
    pytest.fail("the browser test needs Debian's chromium and chromium-driver: `make test` installs them when run as "
                "root; else: sudo apt-get install -y chromium chromium-driver")
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for flag in CHROMIUM_FLAGS:
    options.add_argument(flag)
  options.add_argument(f"--user-data-dir={profile}")  # a fresh profile
  return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _screenshot(browser, name: str) -> None:
  if SCREENSHOTS:  # the whole page (the window grown to it)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1100, height + 130)
    time.sleep(0.5)  # videos redraw after the resize
    browser.save_screenshot(os.path.join(SCREENSHOTS, name))


def test_browser_upload_poses_animate_and_reload(app, tmp_path):
  from selenium.webdriver.common.by import By  # noqa: PLC0415
  from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

  server, root = app
  browser = _browser(str(tmp_path / "chromium-profile"))
  try:
    browser.get(server.url)
    wait = WebDriverWait(browser, 240, poll_frequency=0.2)
    wait.until(lambda b: "px" in b.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "reference-input").send_keys(str(root / "photo.png"))
    browser.find_element(By.ID, "driving-input").send_keys(str(root / "dance.mp4"))
    browser.find_element(By.ID, "poses-button").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text == "done: poses")
    for element in ("poses-view", "aligned-view"):  # the pose videos play in the page
      wait.until(lambda b, e=element: b.execute_script(f"return document.getElementById('{e}').videoWidth") > 0)
    assert "3 frames" in browser.find_element(By.ID, "pose-report").text
    _screenshot(browser, "app-poses.png")

    browser.find_element(By.ID, "animate-button").click()
    seen = set()
    wait.until(lambda b: seen.add(b.find_element(By.ID, "status").text) or
               b.find_element(By.ID, "status").text == "done: animate")
    assert any(s.startswith(("animating", "queued", "loading", "starting")) for s in seen), seen
    video = browser.find_element(By.ID, "result-video")
    plays = lambda b: b.execute_script("return document.getElementById('result-video').videoWidth") > 0
    WebDriverWait(browser, 30).until(plays, message="the job is done but the page's result video does not play")
    src = video.get_attribute("src")
    assert "/animation.mp4" in src
    job_url = browser.current_url
    assert "?job=" in job_url
    _screenshot(browser, "app-result.png")
    with urllib.request.urlopen(src) as response:
      (root / "downloaded.mp4").write_bytes(response.read())
    size = tuple(server.studio.info()["image_size"])
    assert read_mp4(root / "downloaded.mp4").shape == (FRAMES, *size, 3)

    # A reload of the job's URL finds the result again.
    browser.get(job_url)
    WebDriverWait(browser, 30).until(plays, message="a reload of the job's page does not show its video")
    assert browser.find_element(By.ID, "status").text == "done: animate"
  finally:
    browser.quit()
