"""The web app (``memsam web``, issue #22) as a person uses it: a real ``memsam web`` process on 127.0.0.1 (Slicer's
core through trame-slicer, the shipped model), Debian's Chromium headless clicking its page through WebDriver,
and what the browser shows read back from the frames it decoded. Exports are downloaded by the browser and read
with SimpleITK. Screenshots and a JSON of what each check saw are kept in out/test-artifacts/web/.

The lesion is found on screen from its label: the lung sample's volume fills a known rectangle of the axial view
(black around it), and its label's axial slice through the volume's centre, scaled into that rectangle, is where
the lesion is drawn (patient right on screen left, anterior up: Slicer's radiological convention).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
import browser  # noqa: E402

pytest.importorskip("trame_slicer", reason="the web app needs the [web] extra")
pytest.importorskip("selenium", reason="the browser tests need selenium (the [test] extra)")
if browser.find_chromium() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser tests: no chromium/chromedriver (make chromium installs them)")
    pytest.skip("no Chromium with chromedriver here (make chromium)", allow_module_level=True)

from MemorizingSAMLib.resources import default_bank_path  # noqa: E402
from MemorizingSAMLib.server_process import ServerProcess  # noqa: E402

SAMPLES = ROOT / "Resources" / "SampleData"
LUNG = SAMPLES / "lung2_crop.nii.gz"
LUNG_LABEL = SAMPLES / "lung2_crop_label.nii.gz"
ART = ROOT / "out" / "test-artifacts" / "web"
ARTIFACTS: dict = {}


def web_process(*args: str) -> ServerProcess:
    return ServerProcess(list(args), command="web", probe="/", startup_s=120)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A server-side data folder holding the lung CT again, as NRRD (another reader path than the sample)."""
    d = tmp_path_factory.mktemp("webdata")
    sitk.WriteImage(sitk.ReadImage(str(LUNG)), str(d / "chest_ct.nrrd"))
    return d


@pytest.fixture(scope="module")
def app(data_dir):
    # One model thread here and in the remote test's server: their masks are compared, and GEMM
    # reductions split over other thread counts may round borderline voxels the other way.
    with web_process("--data-dir", str(data_dir), "--threads", "1") as p:
        yield p


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def chrome(downloads):
    d = browser.start_chromium(downloads)
    yield d
    d.quit()


@pytest.fixture(scope="module", autouse=True)
def keep_artifacts():
    ART.mkdir(parents=True, exist_ok=True)
    yield
    (ART / "checks.json").write_text(json.dumps(ARTIFACTS, indent=1, default=float))


# ------------------------------------------------------------------------------------------------- helpers
def open_page(d, url: str) -> None:
    d.get(url + "/")
    browser.wait_until(lambda: browser.state(d, "model_ready"), 120, "the model to load")


def results(d) -> int:
    return int(browser.state(d, "results") or 0)


def wait_results(d, n: int, timeout: float = 60.0) -> None:
    browser.wait_until(lambda: results(d) >= n, timeout, f"{n} results written")


def open_sample(d) -> None:
    before = results(d)
    browser.element(d, "open-sample-lung2_crop").click()
    browser.wait_until(lambda: browser.state(d, "volume_name") == "lung2_crop.nii.gz", 30, "the lung sample")
    browser.wait_until(lambda: browser.state(d, "segments"), 30, "the first segment")
    assert results(d) == before


def use_tool(d, kind: str) -> None:
    """Select a placing tool (its button toggles: pressed again, it stops placing)."""
    if browser.state(d, "tool") != kind:
        browser.element(d, f"tool-{kind}").click()
    browser.wait_until(lambda: browser.state(d, "tool") == kind, 10, f"the {kind} tool")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def choose(d, select_id: str, text: str) -> None:
    """Pick ``text`` in a Vuetify select, through its menu, as a user does."""
    from selenium.webdriver.common.by import By

    field = browser.element(d, select_id).find_element(By.XPATH, "./ancestor::div[contains(@class,'v-field')][1]")
    field.click()
    xpath = (
        "//div[contains(@class,'v-overlay__content')]"
        f"//div[contains(concat(' ', @class, ' '), ' v-list-item-title ')][normalize-space()='{text}']"
    )

    def click_item():
        from selenium.common.exceptions import (
            ElementClickInterceptedException,
            ElementNotInteractableException,
            StaleElementReferenceException,
        )

        items = d.find_elements(By.XPATH, xpath)
        if not items:
            return False
        try:
            items[0].click()  # refused while the menu still slides open
            return True
        # Refused while the menu slides open or re-renders under load (seen as "not interactable" on a busy run).
        except (ElementClickInterceptedException, ElementNotInteractableException, StaleElementReferenceException):
            return False

    browser.wait_until(click_item, 10, f"option {text!r}")
    browser.wait_until(lambda: not d.find_elements(By.XPATH, xpath), 10, "the menu to close")


def export(d, downloads: Path, fmt: str) -> Path:
    choose(d, "export-format", fmt)
    browser.wait_until(lambda: str(browser.state(d, "export_file")).endswith(fmt), 10, f"export name for {fmt}")
    name = browser.state(d, "export_file")
    target = downloads / name
    if target.exists():
        target.unlink()
    browser.element(d, "export").click()
    return browser.downloaded(downloads, name)


def read_mask(path: Path) -> sitk.Image:
    img = sitk.ReadImage(str(path))
    if img.GetDimension() == 4:  # a .seg.nrrd with several layers
        raise AssertionError(f"{path.name}: expected one layer")
    return img


# ------------------------------------------------------------------------------------------------- tests
def test_a_click_on_the_lesion_segments_it_undo_removes_it_and_the_export_reads_back(app, chrome, downloads):
    d = chrome
    open_page(d, app.url)
    open_sample(d)
    img = browser.view_image(d, "Red")
    f0 = browser.settled_frame(d, img)
    geo = browser.ViewGeometry(f0, LUNG_LABEL)
    assert geo.lesion.sum() > 500, "the lesion should cover a good part of the axial view"
    assert browser.overlay(f0)[geo.volume].mean() < 0.001, "nothing is drawn before the first click"

    use_tool(d, "include")
    x, y = geo.deepest(geo.lesion)
    browser.watch_overlay(d, img, click=(x, y), results=results(d) + 1)
    # The busy indicator while the first click (which encodes) runs, and not after.
    d.execute_script(
        "window.__busySeen = false; window.__busyTimer = setInterval(() => {"
        " if (window.trame.state.get('busy')) window.__busySeen = true; }, 5);"
    )
    browser.click_at(d, img, x, y)
    wait_results(d, 1)
    browser.wait_until(lambda: not browser.state(d, "busy"), 10, "the busy indicator to go")
    assert d.execute_script("clearInterval(window.__busyTimer); return window.__busySeen"), "busy was shown"
    latency = browser.overlay_latency_ms(d)
    f1 = browser.settled_frame(d, img)
    drawn = browser.overlay(f1) & geo.volume
    d.save_screenshot(str(ART / "click1.png"))
    near = np.zeros_like(drawn)
    near[max(0, y - 12) : y + 13, max(0, x - 12) : x + 13] = True
    away = geo.volume & ~ndimage.binary_dilation(geo.lesion, iterations=10)
    precision = float((drawn & geo.lesion).sum()) / max(1, int(drawn.sum()))
    ARTIFACTS["click1"] = {  # the remote test clicks the same pixel of a view of the same size
        "click_xy": [x, y],
        "view_shape": list(f0.shape[:2]),
        "drawn_px": int(drawn.sum()),
        "precision_on_screen": precision,
        "drawn_near_click": float(drawn[near].mean()),
        "drawn_away": float(drawn[away].mean()),
        "browser_latency_ms": latency,
        "server_latency_ms": browser.state(d, "latency_ms"),
        "decodes": browser.state(d, "decodes"),
    }
    assert drawn.sum() > 100, "the segment is drawn in the axial view"
    assert drawn[near].mean() > 0.5, "around the click the lesion is segmented"
    assert precision > 0.8, "what is drawn lies on the lesion"
    # Speckles in the chest wall (the model card says so): 0.19 % of this view for memsam_hq_clicks, 0.22 % for
    # memsam_hq_geo's own masks, 0.09 % once the session's edge refinement has put them on the image's edges
    # (session 16), 0.25 % for the session-18 weights (two specks on a rib's edge), none once the session drops
    # islands away from the clicks (SessionOptions.drop_islands); a mask leaking into the wall or lung covers
    # several percent.
    assert drawn[away].mean() < 0.001, "nothing is drawn away from the lesion"
    assert browser.state(d, "decodes") == 1
    first = export(d, downloads, ".nii.gz")
    shutil.copy(first, ART / "click1_segments.nii.gz")

    # Undo: the overlay goes, the frame is the one before the click (the point's glyph goes too).
    browser.element(d, "undo").click()
    wait_results(d, 2)
    browser.wait_until(lambda: browser.overlay(browser.frame(d, img))[geo.volume].sum() < 20, 20, "the undo drawn")
    f2 = browser.settled_frame(d, img)
    d.save_screenshot(str(ART / "undo.png"))
    diff = np.abs(f2.astype(int) - f0.astype(int))[geo.volume].mean()
    ARTIFACTS["undo"] = {"mean_abs_diff_to_before": float(diff)}
    assert diff < 3, "after undo the view shows what it showed before the click"
    assert browser.state(d, "segments")[0]["prompts"] == 0

    browser.element(d, "redo").click()
    wait_results(d, 3)
    browser.wait_until(lambda: browser.overlay(browser.frame(d, img))[geo.volume].sum() > 100, 20, "the redo drawn")

    # Two more clicks, where a user looking at the screen would put them: the deepest point of the larger error.
    made = results(d)
    seen = []
    for _ in range(2):
        shown = browser.overlay(browser.settled_frame(d, img)) & geo.volume
        kind, (cx, cy) = geo.next_click(shown)
        use_tool(d, kind)
        browser.click_at(d, img, cx, cy)
        made += 1
        wait_results(d, made)
        seen.append({"kind": kind, "xy": [cx, cy], "dice_on_screen_before": dice(shown, geo.lesion)})
    final = browser.overlay(browser.settled_frame(d, img)) & geo.volume
    seen.append({"dice_on_screen_after_3_clicks": dice(final, geo.lesion)})
    ARTIFACTS["clicks2_3"] = seen
    d.save_screenshot(str(ART / "lung_3_clicks.png"))
    assert browser.state(d, "segments")[0]["prompts"] == 3

    # Exports: downloaded by the browser, read with SimpleITK, on the CT's grid, and what the screen showed.
    ct = sitk.ReadImage(str(LUNG))
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(LUNG_LABEL))) > 0
    masks = {}
    for fmt in (".nii.gz", ".nrrd", ".seg.nrrd"):
        path = export(d, downloads, fmt)
        shutil.copy(path, ART / path.name)
        img_out = read_mask(path)
        if fmt == ".seg.nrrd":  # the segmentation's own extent: resampled onto the CT's grid to compare
            img_out = sitk.Resample(img_out, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        else:
            assert img_out.GetSize() == ct.GetSize()
            assert np.allclose(img_out.GetSpacing(), ct.GetSpacing())
            assert np.allclose(img_out.GetOrigin(), ct.GetOrigin(), atol=1e-4)
            assert np.allclose(img_out.GetDirection(), ct.GetDirection(), atol=1e-6)
        masks[fmt] = sitk.GetArrayFromImage(img_out) > 0
    assert (masks[".nii.gz"] == masks[".nrrd"]).all() and (masks[".nii.gz"] == masks[".seg.nrrd"]).all()
    mask = masks[".nii.gz"]
    # The exported centre slice, drawn into the view's rectangle, is what the browser showed.
    agreement = dice(geo.slice_on_screen(mask), final)
    precision3d = float((mask & lesion).sum()) / max(1, int(mask.sum()))
    ARTIFACTS["export"] = {
        "voxels": int(mask.sum()),
        "precision_3d": precision3d,
        "dice_3d": dice(mask, lesion),
        "screen_vs_export_dice": agreement,
    }
    assert agreement > 0.9, "the exported labelmap is what the axial view showed"
    assert precision3d > 0.7


def test_segments_are_added_renamed_recoloured_and_deleted_from_the_list(app, chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = chrome
    open_page(d, app.url)
    if browser.state(d, "volume_name") != "lung2_crop.nii.gz":
        open_sample(d)
    n0 = len(browser.state(d, "segments"))
    browser.element(d, "add-segment").click()
    browser.wait_until(lambda: len(browser.state(d, "segments")) == n0 + 1, 10, "a new segment")
    rows = lambda: d.find_elements(By.CSS_SELECTOR, ".memsam-segment")  # noqa: E731
    assert len(rows()) == n0 + 1
    name = browser.element(d, "segment-name")
    name.send_keys(Keys.CONTROL, "a")
    name.send_keys("vessel")
    browser.element(d, "rename").click()
    browser.wait_until(lambda: any(r.text.startswith("vessel") for r in rows()), 10, "the new name in the segment list")
    browser.element(d, "colour-1").click()
    palette = browser.state(d, "palette")
    browser.wait_until(
        lambda: [s for s in browser.state(d, "segments") if s["current"]][0]["hex"] == palette[1], 10, "colour"
    )
    swatch = d.find_elements(By.CSS_SELECTOR, ".memsam-segment .memsam-swatch")[-1]
    assert swatch.value_of_css_property("background-color") == "rgba(51, 153, 230, 1)"  # palette[1], 0.2 0.6 0.9

    # A box around the lesion, in two clicks, segments the new segment.
    img = browser.view_image(d, "Red")
    geo = browser.ViewGeometry(browser.settled_frame(d, img), LUNG_LABEL)
    ys, xs = np.nonzero(geo.lesion)
    made = results(d)
    use_tool(d, "box")
    browser.click_at(d, img, xs.min() - 4, ys.min() - 4)
    browser.click_at(d, img, xs.max() + 4, ys.max() + 4)
    wait_results(d, made + 1)
    current = [s for s in browser.state(d, "segments") if s["current"]][0]
    assert current["name"] == "vessel" and current["prompts"] == 1
    f = browser.settled_frame(d, img)
    r, g, b = (f[..., c].astype(int) for c in range(3))
    blue = (b - r >= 40) & (b - g >= 10)  # palette[1] (0.2, 0.6, 0.9) over grey
    inner = np.zeros_like(blue)
    inner[ys.min() + 6 : ys.max() - 6, xs.min() + 6 : xs.max() - 6] = True
    # The drawn box (4 px past the lesion's slice) widened by one voxel on screen plus a pixel: the corners snap
    # to voxels, and SessionOptions.clamp_to_box keeps every voxel of the segment inside the box.
    px = int(np.ceil((geo.right - geo.left) / geo.shape_kji[2])) + 1
    boxed = np.zeros_like(blue)
    boxed[ys.min() - 4 - px : ys.max() + 5 + px, xs.min() - 4 - px : xs.max() + 5 + px] = True
    ARTIFACTS["box"] = {
        "blue_inside": float(blue[inner].mean()),
        "blue_outside_box": float(blue[geo.volume & ~boxed].mean()),
        "lesion_covered": float(blue[geo.lesion].mean()),
    }
    d.save_screenshot(str(ART / "box.png"))
    assert blue[inner].sum() > 200, "the box's segment is drawn in its colour inside the box"
    # Not a model-quality bound: nothing of the segment may lie outside the box, whatever the model predicts.
    assert blue[geo.volume & ~boxed].sum() <= 3, "and nothing of it outside the box"

    # Segments in 3D: the 3D view draws their surfaces once asked to.
    three_d = browser.view_image(d, "ThreeD")
    before_3d = browser.overlay(browser.settled_frame(d, three_d)).sum()
    d.find_element(By.XPATH, "//label[normalize-space()='Show segments in 3D']").click()
    browser.wait_until(
        lambda: browser.overlay(browser.frame(d, three_d)).sum() > before_3d + 200, 30, "the segments in 3D"
    )
    d.save_screenshot(str(ART / "segments_3d.png"))

    browser.element(d, "delete-segment").click()
    browser.wait_until(lambda: len(browser.state(d, "segments")) == n0, 10, "the segment deleted")
    assert not any(r.text.startswith("vessel") for r in rows())


def test_volumes_open_from_an_upload_and_from_the_server_folder_and_bad_files_are_refused(
    app, chrome, data_dir, tmp_path
):
    from selenium.webdriver.common.by import By

    d = chrome
    open_page(d, app.url)
    open_sample(d)
    sample_segments = [(x["id"], x["name"], x["prompts"]) for x in browser.state(d, "segments")]
    upload = d.find_element(By.CSS_SELECTOR, "#upload, input#upload")
    upload.send_keys(str(LUNG))
    browser.wait_until(lambda: browser.state(d, "volume_name") == "lung2_crop.nii.gz", 30, "the uploaded volume")
    assert not browser.state(d, "error")

    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    upload = d.find_element(By.CSS_SELECTOR, "#upload, input#upload")
    upload.send_keys(str(bad))
    browser.wait_until(lambda: browser.state(d, "error"), 10, "the refusal")
    assert "not a volume file" in browser.element(d, "error").text

    choose(d, "volume-select", f"{data_dir.name}/chest_ct.nrrd")
    browser.element(d, "open-volume").click()
    browser.wait_until(lambda: browser.state(d, "volume_name") == "chest_ct.nrrd", 30, "the server file")
    assert browser.state(d, "segments"), "a segment is ready on the new volume"
    assert [x["id"] for x in browser.state(d, "segments")] != [x[0] for x in sample_segments]

    # Back to the sample: its own node again, with its segments and prompts, nothing lost or duplicated.
    browser.element(d, "open-sample-lung2_crop").click()
    browser.wait_until(lambda: browser.state(d, "volume_name") == "lung2_crop.nii.gz", 30, "the sample again")
    browser.wait_until(
        lambda: [(x["id"], x["name"], x["prompts"]) for x in browser.state(d, "segments")] == sample_segments,
        30,
        "the sample's segments back",
    )


def test_remote_mode_gives_the_local_mask_through_the_inference_server(tmp_path, downloads):
    local_click = ARTIFACTS.get("click1")
    if local_click is None:
        pytest.skip("needs the local click of test_a_click_on_the_lesion... (run the file whole)")
    token = tmp_path / "token"
    token.write_text("s3cret-web-token\n")
    with ServerProcess(["--token-file", str(token), "--memory", str(default_bank_path()), "--threads", "1"]) as server:
        with web_process("--server", server.url, "--token-file", str(token)) as remote_app:
            d = browser.start_chromium(downloads)
            try:
                open_page(d, remote_app.url)
                assert "remote" in browser.state(d, "status")
                open_sample(d)
                img = browser.view_image(d, "Red")
                f0 = browser.settled_frame(d, img)
                use_tool(d, "include")
                # The pixel the local test clicked, not one found again on this page: the view geometry is read
                # from the streamed (lossy) frame, so the deepest lesion pixel can move by one, and half a voxel
                # of click moves 8-12 % of this mask (measured), far more than any rounding does.
                assert list(f0.shape[:2]) == local_click["view_shape"], "the remote page lays the view out alike"
                x, y = local_click["click_xy"]
                browser.click_at(d, img, x, y)
                wait_results(d, 1)
                d.save_screenshot(str(ART / "remote_click1.png"))
                path = export(d, downloads, ".nii.gz")
                remote = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            finally:
                d.quit()
        assert "s3cret-web-token" not in server.errors()
    local = sitk.GetArrayFromImage(sitk.ReadImage(str(ART / "click1_segments.nii.gz")))
    assert remote.sum() > 0
    differ = remote != local
    # 0 to 4 voxels of 1,617 differed on the machines tried (float GEMM results are not guaranteed to be
    # reproducible across processes); image noise of 1e-4 relative changed none of this mask's voxels in-process,
    # while half a voxel of click moves 8-12 % of them (measured). Hence a 3 % bound. Rounding could flip only
    # voxels whose logit is near 0, i.e. on the mask's surface; a wrong prompt, grid or segment differs inside or
    # far from it.
    fg = local > 0
    surface = ndimage.binary_dilation(fg, iterations=2) & ~ndimage.binary_erosion(fg, iterations=2)
    ARTIFACTS["remote"] = {
        "click_xy": [x, y],
        "voxels_differing_from_local": int(differ.sum()),
        "of_them_off_the_surface": int((differ & ~surface).sum()),
        "local_voxels": int(fg.sum()),
    }
    assert set(np.unique(remote)) == set(np.unique(local)), "the same segments come back"
    report = ARTIFACTS["remote"]
    assert differ.sum() <= 0.03 * fg.sum(), f"the same click gives the same mask through the server: {report}"
    assert not (differ & ~surface).any(), f"differences only where rounding can make them: {report}"


def test_an_unreachable_server_is_said_on_the_page_and_the_model_loads_once_it_answers(tmp_path, downloads):
    from MemorizingSAMLib.server_process import free_port

    port = free_port()
    with web_process("--server", f"http://127.0.0.1:{port}") as remote_app:
        d = browser.start_chromium(downloads)
        try:
            d.get(remote_app.url + "/")
            browser.wait_until(lambda: browser.state(d, "model_error"), 60, "the load error")
            assert "cannot reach" in browser.element(d, "error").text
            assert not browser.state(d, "busy"), "nothing runs: no spinner"
            open_sample_button = browser.element(d, "open-sample-lung2_crop")
            open_sample_button.click()
            browser.wait_until(lambda: browser.state(d, "volume_loaded"), 30, "the volume shown anyway")
            assert "did not load" in browser.state(d, "error")
            with ServerProcess([], port=port):
                browser.element(d, "retry-model").click()
                browser.wait_until(lambda: browser.state(d, "model_ready"), 60, "the model through the server")
                browser.wait_until(lambda: browser.state(d, "segments"), 30, "segmenting the waiting volume")
                assert not browser.state(d, "error")
        finally:
            d.quit()
