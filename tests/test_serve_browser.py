"""`mimajax serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium
uploads a portrait and the demo driver, waits for the animation and checks the mp4 the page returns has the frames
asked for; a portrait with no face shows the message and the same server answers the next request.

The server runs as `mimajax serve` in its own process, on an MMFA micro checkpoint (tests/mmfa_micro.py, untrained:
this checks the page, not the model) written by the loop's own setup and checkpointer. MIMAJAX_SERVE_CHECKPOINT=DIR
serves a trained one instead; MIMAJAX_SCREENSHOT=PATH keeps the screenshot of the page with its result (the README's
picture is made so, from runs/mmfa_tiny). CI sets MIMAJAX_REQUIRE_BROWSER=1, so a missing browser fails there.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FRAMES, FRAMES_AGAIN = 6, 8  # the second result differs, so its URL (a hash of the file) does too
pytestmark = pytest.mark.xdist_group("serve_browser")


def _browser_or_skip():
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
  try:
    import gradio  # noqa: F401
    import selenium  # noqa: F401
  except ImportError as e:
    missing.append(str(e))
  if missing:
    if os.environ.get("MIMAJAX_REQUIRE_BROWSER"):
      pytest.fail(f"the browser test needs {missing} (apt-get install chromium chromium-driver; pip install -e .[dev])")
    pytest.skip(f"no browser: {missing}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """An MMFA micro workdir at step 0: the loop's setup (initialised parameters and BatchNorm statistics) saved by
  its checkpointer, with the config a training run records."""
  _browser_or_skip()
  given = os.environ.get("MIMAJAX_SERVE_CHECKPOINT")
  if given:
    return Path(given)
  sys.path.insert(0, str(ROOT / "tests"))
  import mmfa_micro

  from data_pipeline import demo_data
  from mimajax import checkpointing, train

  data = tmp_path_factory.mktemp("demo32")
  demo_data.build(data, resolution=32)
  workdir = tmp_path_factory.mktemp("mmfa_step0")
  config = mmfa_micro.get_config()
  config.data.path = str(data)
  config.model.family = "mmfa"
  run, ckpt = train.setup(config, workdir)
  checkpointing.write_config(workdir, config)
  ckpt.save(0, run.state, run.iterator.get_state(), force=True)
  ckpt.close()
  return workdir


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
  """`mimajax serve` on a free port, up once the page answers (its log in the failure message otherwise)."""
  port = _free_port()
  log = tmp_path_factory.mktemp("serve") / "serve.log"
  temp = tmp_path_factory.mktemp("requests")
  env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
  cmd = [sys.executable, "-m", "mimajax.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--max-frames", "40", "--temp-dir", str(temp)]  # fmt: skip
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  url = f"http://127.0.0.1:{port}/"
  deadline = time.time() + 300
  while True:
    try:
      urllib.request.urlopen(url, timeout=5).read()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        pytest.fail(f"mimajax serve did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
      time.sleep(1)
  yield url, proc, log, temp
  proc.terminate()
  try:
    proc.wait(30)
  except subprocess.TimeoutExpired:
    proc.kill()


@pytest.fixture(scope="module")
def browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1560"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


def _wait(driver, condition, what: str, timeout: float = 300):
  from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
  from selenium.webdriver.support.ui import WebDriverWait

  try:  # an element Gradio re-renders between finding and reading it is looked for again, not an error
    wait = WebDriverWait(driver, timeout, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda d: condition(d))
  except TimeoutException:
    body = driver.find_element("tag name", "body").text[-1500:]
    pytest.fail(f"waited {timeout:g} s for {what}; the page says:\n{body}")


def _upload(driver, elem_id: str, path):
  """Replaces what an upload component holds with `path` (its Remove button first, when it holds something)."""
  from selenium.webdriver.common.by import By

  for button in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} button[aria-label='Remove Image']"):
    button.click()
  _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"), f"{elem_id}'s upload", 30)
  driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))


def _result_src(driver) -> str | None:
  from selenium.webdriver.common.by import By

  videos = driver.find_elements(By.CSS_SELECTOR, "#result video")
  return videos[0].get_attribute("src") if videos else None


def _animate(driver, previous: str | None):
  """Presses Animate; returns the new result's URL, or the page's error message."""
  from selenium.webdriver.common.by import By

  driver.find_element(By.CSS_SELECTOR, "#animate").click()

  def done(d):
    src = _result_src(d)
    if src and src != previous:
      return ("result", src)
    toasts = [t.text for t in d.find_elements(By.CSS_SELECTOR, ".toast-body") if t.text.strip()]
    return ("error", " ".join(toasts)) if toasts else None

  return _wait(driver, done, "the animation or an error")


def _frames_of(url: str, folder: Path) -> int:
  from mimajax import video_io

  path = folder / "returned.mp4"
  urllib.request.urlretrieve(url, path)
  return video_io.mp4_frame_count(path)


def test_page_animates_a_portrait_then_reports_a_faceless_one_and_serves_on(server, browser, tmp_path):
  from selenium.webdriver.common.by import By

  from data_pipeline import demo_data

  url, proc, log, temp = server
  portrait, driver_clip = demo_data.portrait_path("astronaut"), demo_data.carphone_clip()
  browser.get(url)
  _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#animate"), "the page")
  _upload(browser, "source", portrait)
  browser.find_element(By.CSS_SELECTOR, "#driving_video input[type=file]").send_keys(str(driver_clip))
  frames = browser.find_element(By.CSS_SELECTOR, "#frames input")
  frames.clear()
  frames.send_keys(str(FRAMES))
  _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#driving_video video"), "the driver's preview", 60)
  kind, first = _animate(browser, None)
  assert kind == "result", f"the page showed an error: {first}\n{log.read_text()[-2000:]}"
  assert _frames_of(first, tmp_path) == FRAMES
  _wait(browser, lambda d: "frames at" in d.find_element(By.CSS_SELECTOR, "#summary").text, "the summary", 30)
  shot = Path(os.environ.get("MIMAJAX_SCREENSHOT") or tmp_path / "page.png")
  browser.execute_script("window.scrollTo(0, 0)")
  browser.save_screenshot(str(shot))
  assert shot.stat().st_size > 10_000
  # A request's own files are gone once the page has its copies.
  _wait(browser, lambda d: not list(temp.glob("request-*")), "the request's folder to be removed", 30)

  gray = tmp_path / "no_face.png"
  from mimajax import video_io

  video_io.write_image(gray, np.full((240, 320, 3), 128, np.uint8))
  _upload(browser, "source", gray)
  kind, message = _animate(browser, first)
  assert kind == "error" and "no face found" in message, message
  assert proc.poll() is None  # the server is still up
  assert not list(temp.glob("request-*"))  # the refused request left nothing behind

  for close in browser.find_elements(By.CSS_SELECTOR, ".toast-close"):
    close.click()
  _upload(browser, "source", portrait)
  frames.clear()
  frames.send_keys(str(FRAMES_AGAIN))
  kind, second = _animate(browser, first)
  assert kind == "result", second
  assert _frames_of(second, tmp_path) == FRAMES_AGAIN


@pytest.mark.parametrize("argv,message", [
  (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
  (["--checkpoint", ".", "--max-frames", "0"], "--max-frames must be >= 1"),
])  # fmt: skip
def test_serve_refuses_a_bad_checkpoint_or_option_before_serving(argv, message, capsys):
  from mimajax import cli  # no browser needed: the command fails before the page is built

  assert cli.main(["serve", *argv]) == 2
  assert message in capsys.readouterr().err
