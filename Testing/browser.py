"""Debian's Chromium, headless, driven through its WebDriver (chromedriver) with Selenium: what the web app's
tests and benchmarks/bench_web.py use to click the page the way a person does.

No browser is downloaded: Chromium and ChromeDriver are the system's (``make chromium`` installs Debian's), and
Selenium is given their paths, so that its own driver manager stays out of the way.

Pixels are read in the page: a view's streamed frame (an <img>) is drawn into a canvas and sampled, at CSS pixel
positions inside that image, so that a check sees what the user sees, as the browser decoded it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when the machine has no Chromium with its driver."""
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(download_dir: Path, width: int = 1400, height: int = 900):
    """A headless Chromium whose downloads land in ``download_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("no Chromium with chromedriver on this machine: make chromium (Debian's packages)")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir)})
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    d.set_script_timeout(120)
    return d


def wait_until(fn: Callable[[], object], timeout: float, what: str, every: float = 0.05):
    """fn()'s first truthy value within ``timeout`` seconds, or a TimeoutError naming ``what``."""
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)


def state(d, key: str):
    """A value of the app's trame state, as the browser holds it."""
    return d.execute_script(
        "return window.trame && window.trame.state ? window.trame.state.get(arguments[0]) : null", key
    )


def view_image(d, view_id: str):
    """The <img> that shows a view's frames (the view's marker sits beside it, see MemorizingSAMLib/web/app.py)."""
    return d.execute_script(
        "const m = document.getElementById('view-' + arguments[0]);"
        "let n = m; while (n && !n.querySelector('img')) n = n.parentElement;"
        "return n ? n.querySelector('img') : null;",
        view_id,
    )


# Reads RGB at CSS pixel positions of an <img> (scaled to its natural size) from the frame on screen now.
_SAMPLE_JS = """
const img = arguments[0], pts = arguments[1];
const c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext('2d'); g.drawImage(img, 0, 0);
const sx = img.naturalWidth / img.clientWidth, sy = img.naturalHeight / img.clientHeight;
return pts.map(([x, y]) => Array.from(g.getImageData(Math.round(x * sx), Math.round(y * sy), 1, 1).data.slice(0, 3)));
"""


def sample(d, img, points: list[tuple[float, float]]) -> list[list[int]]:
    """RGB of the frame now shown, at ``points`` (x, y in CSS pixels from the image's top left)."""
    return d.execute_script(_SAMPLE_JS, img, [list(map(float, p)) for p in points])


# The page's overlay test: a pixel shows the first segment's orange (0.9, 0.4, 0.1, filled at half opacity over
# grey, or its outline) when red > green > blue by these margins. Grey has none; the include glyph is
# yellow-green when shaded (green above red), the exclude glyph red (green no higher than blue).
MARGINS = (20, 10)  # red - green, green - blue

# Installs a watcher: it counts the overlay-coloured pixels of every new frame of the image; the clock starts at
# the next pointerdown anywhere on the page (the click in the view, or a button) and stops at the first frame whose
# count differs from the count before the click by at least min_change pixels, among the frames that arrive after
# the app's state says the result was written (``results`` reached target: the state message precedes the
# frames rendered after the write on the same websocket; frames still settling from the click before do not
# count).
_WATCH_JS = """
const img = arguments[0], minChange = arguments[1], rg = arguments[2], gb = arguments[3], skip = arguments[4];
const target = arguments[5];
const count = () => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  const sx = c.width / img.clientWidth, sy = c.height / img.clientHeight;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (!(d[i] - d[i + 1] >= rg && d[i + 1] - d[i + 2] >= gb)) continue;
    if (skip) {
      const p = i / 4, x = (p % c.width) / sx - skip[0], y = Math.floor(p / c.width) / sy - skip[1];
      if (x * x + y * y <= skip[2] * skip[2]) continue;
    }
    n += 1;
  }
  return n;
};
const w = {t0: null, t1: null, base: count(), last: null, frames: 0};
window.__memsamWatch = w;
const check = () => {
  if (w.t0 === null || w.t1 !== null || !img.naturalWidth) return;
  if (target !== null && !(window.trame.state.get('results') >= target)) return;
  w.frames += 1;
  w.last = count();
  if (Math.abs(w.last - w.base) >= minChange) w.t1 = performance.now();
};
document.addEventListener('pointerdown', () => { if (w.t0 === null) w.t0 = performance.now(); },
                          {capture: true, once: true});
img.addEventListener('load', check);
new MutationObserver(() => { if (img.complete) check(); }).observe(img, {attributes: true, attributeFilter: ['src']});
"""


def watch_overlay(
    d,
    img,
    min_change: int = 20,
    click: tuple[float, float] | None = None,
    glyph_px: float = 14,
    results: int | None = None,
) -> None:
    """Arm the click-to-overlay clock on ``img`` (see _WATCH_JS): it starts at the next pointerdown on the page
    and stops at the first frame whose overlay-coloured pixel count changed by ``min_change`` (the segment drawn,
    grown, shrunk or gone). ``click``: the click's (x, y); pixels within ``glyph_px`` of it are not counted,
    because the prompt's glyph, drawn there at once, covers overlay pixels before any segment changes.
    ``results``: only frames after the app's ``results`` state reached this count are looked at."""
    skip = None if click is None else [float(click[0]), float(click[1]), float(glyph_px)]
    d.execute_script(_WATCH_JS, img, int(min_change), *MARGINS, skip, results)


def overlay_latency_ms(d, timeout: float = 60.0) -> float:
    """Milliseconds from the click to the first frame with the overlay changed (see :func:`watch_overlay`)."""
    w = wait_until(
        lambda: (lambda w: w if w and w["t1"] is not None else None)(d.execute_script("return window.__memsamWatch")),
        timeout,
        "the overlay to change in the browser",
    )
    return float(w["t1"] - w["t0"])


_FRAME_JS = """
const img = arguments[0];
if (!img.complete || !img.naturalWidth || !img.clientWidth) return null;
const c = document.createElement('canvas'); c.width = img.clientWidth; c.height = img.clientHeight;
c.getContext('2d').drawImage(img, 0, 0, c.width, c.height);
return c.toDataURL('image/png');
"""


def frame(d, img, timeout: float = 30.0):
    """The frame the image shows now, as an [y, x, rgb] uint8 array at its CSS pixel size."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    # None until the view has shown its first frame (a new volume's views start empty).
    url = wait_until(lambda: d.execute_script(_FRAME_JS, img), timeout, "a frame in the view")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def overlay(rgb):
    """Which pixels of a frame show the first segment's colour (see MARGINS)."""
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    return (r - g >= MARGINS[0]) & (g - b >= MARGINS[1])


def click_at(d, img, x: float, y: float, aim_s: float = 0.3) -> None:
    """A real mouse click (pointer events through Chromium's input pipeline) at (x, y) CSS pixels in ``img``: the
    pointer moves there, rests ``aim_s`` seconds as a hand does before it clicks (in place mode the view draws the
    point's preview under the pointer meanwhile), then presses and releases."""
    from selenium.webdriver.common.action_chains import ActionChains

    rect = img.rect
    # ActionChains offsets are from the element's centre.
    ActionChains(d).move_to_element_with_offset(img, x - rect["width"] / 2, y - rect["height"] / 2).perform()
    time.sleep(aim_s)
    ActionChains(d).click().perform()


def ring(cx: float, cy: float, radius: float, n: int = 16) -> list[tuple[float, float]]:
    import math

    return [
        (cx + radius * math.cos(2 * math.pi * t / n), cy + radius * math.sin(2 * math.pi * t / n)) for t in range(n)
    ]


def downloaded(folder: Path, name: str, timeout: float = 30.0) -> Path:
    """The file once Chromium has finished writing it into ``folder``."""
    path = folder / name

    def done():
        partial = any(p.suffix == ".crdownload" for p in folder.iterdir())
        return path if path.is_file() and not partial and os.path.getsize(path) > 0 else None

    return wait_until(done, timeout, f"the download of {name}")


def element(d, element_id: str, timeout: float = 30.0):
    """The page's element with that id once the page has rendered it."""
    from selenium.common.exceptions import NoSuchElementException
    from selenium.webdriver.common.by import By

    def find():
        try:
            return d.find_element(By.ID, element_id)
        except NoSuchElementException:
            return None

    return wait_until(find, timeout, f"element #{element_id}")


def settled_frame(d, img, timeout: float = 10.0):
    """The frame once two reads 0.3 s apart agree (the views stream a few frames after a change)."""
    import numpy as np

    prev = frame(d, img)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.3)
        cur = frame(d, img)
        if cur.shape == prev.shape and np.abs(cur.astype(int) - prev.astype(int)).max() <= 3:
            return cur
        prev = cur
    return prev


class ViewGeometry:
    """Where a volume and its labelled target are drawn in the axial view's image (CSS pixels), from what the
    view shows: the volume fills the view's non-black rectangle after the views are reset, and the label's axial
    slice through the volume's centre, scaled into that rectangle, is the target as drawn (patient right on
    screen left, anterior up: Slicer's convention, which an axis-aligned LPS volume meets with i to the right
    and j downwards)."""

    def __init__(self, rgb, label_path: Path) -> None:
        import numpy as np
        import SimpleITK as sitk

        bright = rgb.max(axis=2) > 12
        ys, xs = np.nonzero(bright)
        self.left, self.right, self.top, self.bottom = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))  # [k, j, i]
        nk, nj, ni = label.shape
        self.shape_kji = label.shape
        self.k = nk // 2  # the slice through the volume's centre (odd counts: the middle one)
        yy, xx = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
        i = np.floor((xx - self.left) / (self.right - self.left) * ni).astype(int)
        j = np.floor((yy - self.top) / (self.bottom - self.top) * nj).astype(int)
        inside = (i >= 0) & (i < ni) & (j >= 0) & (j < nj)
        self.volume = inside
        self.lesion = np.zeros(rgb.shape[:2], bool)
        self.lesion[inside] = label[self.k, j[inside], i[inside]] > 0

    def slice_on_screen(self, volume_kji):
        """The centre axial slice of a [k, j, i] array on the view's pixels (False outside the volume)."""
        import numpy as np

        yy, xx = np.nonzero(self.volume)
        nk, nj, ni = volume_kji.shape
        i = np.floor((xx - self.left) / (self.right - self.left) * ni).astype(int)
        j = np.floor((yy - self.top) / (self.bottom - self.top) * nj).astype(int)
        out = np.zeros(self.volume.shape, bool)
        out[yy, xx] = volume_kji[nk // 2, j, i] > 0
        return out

    @staticmethod
    def deepest(region) -> tuple[int, int]:
        """The (x, y) pixel of ``region`` farthest from its border."""
        import numpy as np
        from scipy import ndimage

        dist = ndimage.distance_transform_edt(region)
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        return int(x), int(y)

    def next_click(self, shown) -> tuple[str, tuple[int, int]]:
        """Where a user looking at the screen clicks next: the deepest point of the larger error, missed target
        (include) or overlay beside it (exclude); errors thinner than 2 pixels are not seen."""
        from scipy import ndimage

        missed = ndimage.binary_opening(self.lesion & ~shown, iterations=2)
        extra = ndimage.binary_opening(shown & ~self.lesion, iterations=2)
        kind = "include" if missed.sum() >= extra.sum() else "exclude"
        return kind, self.deepest(missed if kind == "include" else extra)
