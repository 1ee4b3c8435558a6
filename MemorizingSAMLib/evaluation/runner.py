"""Run an interactive segmenter over a prepared dataset with simulated clicks; collect metrics as JSON.

Protocols:
- ours (default): the crop follows the clicks exactly as in InteractiveSession (centred on click 1, never on the
  ground truth), all clicks in the crop + previous logits, Dice of the full-resolution mask after every click.
- legacy (``legacy=True``): the published one: the crop is centred on the ground truth's bounding-box centre,
  only the newest click goes to the model, and the reported figure is the best Dice over the clicks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..datasets import check_label_grid, load_dataset, targets
from ..edge_refine import DEFAULT_EDGE_REFINE, EdgeRefineConfig
from ..protocol import SegmentationSession
from ..session import InteractiveSession, SessionOptions
from .clicks import first_click, next_click
from .metrics import aggregate, dice, summarise


@dataclass(frozen=True)
class EvalConfig:
    clicks: int = 10
    split: str | None = "heldout"  # "train", "heldout", or None for all
    legacy: bool = False
    sources: tuple[str, ...] | None = None  # e.g. ("pyradiomics", "mricron"); None: all
    max_targets_per_case: int | None = None
    min_voxels: int = 20


def _refine_tag(edge_refine: EdgeRefineConfig | None, legacy: bool) -> str:
    """Names a non-default edge refinement in the method's name (and so in the report's file name)."""
    if legacy or edge_refine == DEFAULT_EDGE_REFINE:
        return ""
    return " no-edge-refine" if edge_refine is None else f" {edge_refine.label}"


class SessionSegmenter:
    """A session in the evaluation harness: an InteractiveSession of ``model``, or any SegmentationSession given
    as ``session`` (a RemoteSession evaluates a server; the legacy protocol needs an InteractiveSession)."""

    def __init__(
        self,
        model=None,
        memory=None,
        legacy: bool = False,
        name: str | None = None,
        product_dtype: str | None = None,
        session: SegmentationSession | None = None,
        edge_refine: EdgeRefineConfig | None = DEFAULT_EDGE_REFINE,
    ):
        if session is None:
            # The published protocol measures the model's own masks: no refinement there.
            edge_refine = None if legacy else edge_refine
            options = SessionOptions(newest_click_only=legacy, product_dtype=product_dtype, edge_refine=edge_refine)
            session = InteractiveSession(model, options, memory=memory)
            name = name or (
                model.cfg.name
                + (" +memory" if memory is not None else "")
                + (f" {product_dtype}" if product_dtype else "")
                + _refine_tag(edge_refine, legacy)
            )
        elif legacy and not isinstance(session, InteractiveSession):
            raise ValueError("the legacy protocol locks the crop: it needs an InteractiveSession")
        self.session: SegmentationSession = session
        self.legacy = legacy
        self.name = name or type(session).__name__
        self.seg = None
        self.last_latency_ms = 0.0

    def set_image(self, image: sitk.Image) -> None:
        self.session.set_image(image)
        self.seg = None

    def new_target(self, gt: np.ndarray | None = None) -> None:
        if self.seg is not None:
            self.session.remove_segment(self.seg)
        self.seg = self.session.add_segment()
        if self.legacy and gt is not None:
            nz = np.nonzero(gt)
            centre = [(int(a.min()) + int(a.max())) / 2 for a in (nz[2], nz[1], nz[0])]
            self.session.lock_crop(np.round(centre), self.seg)

    def click(self, ijk, include: bool) -> np.ndarray:
        self.session.add_point(ijk, include, self.seg)
        self.last_latency_ms = self.session.last_timing["total_ms"]
        return self.session.mask(self.seg)


def run_target(segmenter, gt: np.ndarray, spacing_ijk, n_clicks: int, legacy: bool = False) -> dict:
    """Simulated clicks on one target; per-click Dice, clicks, latency."""
    try:
        segmenter.new_target(gt)
    except TypeError:
        segmenter.new_target()
    click = first_click(gt, spacing_ijk)
    pred = np.zeros_like(gt)
    dices, clicks, latency, honoured = [], [], [], []
    for _ in range(n_clicks):
        pred = segmenter.click(click.ijk, click.include)
        latency.append(round(segmenter.last_latency_ms, 3))
        clicks.append([*click.ijk, int(click.include)])
        dices.append(round(dice(gt, pred), 6))
        i, j, k = (int(round(float(v))) for v in click.ijk)
        honoured.append(int(bool(pred[k, j, i]) == bool(click.include)))  # the clicked voxel on the clicked side
        nxt = next_click(gt, pred, spacing_ijk)
        if nxt is None:
            break
        click = nxt
    dices += [dices[-1]] * (n_clicks - len(dices))
    out = {"dice": dices, "clicks": clicks, "honoured": honoured, **summarise(dices), "latency_ms": latency}
    if legacy:
        out["reported_dice"] = out["best_dice"]  # the published protocol's figure
    else:
        out["reported_dice"] = dices[-1]
    return out


def evaluate(
    segmenter,
    data_root: str | Path,
    cfg: EvalConfig = EvalConfig(),
    progress: Callable[[int, int, str], None] | None = None,
    keep_masks: int = 0,
    ranks=None,
) -> dict | None:
    """Evaluate ``segmenter`` (SessionSegmenter, RegionGrowingSegmenter, ...) on the dataset at ``data_root``.

    ``ranks`` (distributed.Ranks, under torchrun): each rank runs every world-th target, rank 0 gathers the
    results in the one-process order and returns the same report (timings aside); the other ranks return None."""
    from ..distributed import Ranks, gather_to_main

    ranks = ranks or Ranks()
    root = Path(data_root)
    meta = load_dataset(root)
    cases = [c for c in meta["cases"] if cfg.sources is None or c["source"] in cfg.sources]
    jobs = [(c, v, n) for c in cases for v, n in targets(c, cfg.split)[: cfg.max_targets_per_case]]
    mine = ranks.shard(len(jobs))
    results, examples = [], []
    t0 = time.perf_counter()
    current = None
    for done, index in enumerate(mine, start=1):
        case, value, name = jobs[index]
        if current is None or current[0] != case["id"]:
            img = sitk.ReadImage(str(root / case["image"]))
            lab_img = sitk.ReadImage(str(root / case["label"]))
            check_label_grid(img, lab_img, case["id"])
            lab = sitk.GetArrayFromImage(lab_img)
            segmenter.set_image(img)
            current = (case["id"], img, lab)
        img, lab = current[1], current[2]
        gt = (lab == value).astype(np.uint8)
        if gt.sum() < cfg.min_voxels:
            continue
        r = run_target(segmenter, gt, img.GetSpacing(), cfg.clicks, cfg.legacy)
        r.update({"case": case["id"], "source": case["source"], "label": value, "name": name, "voxels": int(gt.sum())})
        results.append((index, r))
        if len(examples) < keep_masks:
            example = {
                "case": case["id"],
                "name": name,
                "image": sitk.GetArrayFromImage(img),
                "gt": gt,
                "pred": segmenter_mask_copy(segmenter),
                "click": r["clicks"][0],
            }
            examples.append((index, example))
        if progress and ranks.main:
            progress(done, len(mine), f"{case['id']}:{name}")
    gathered = gather_to_main((results, examples, time.perf_counter() - t0), ranks)
    if not ranks.main:
        return None
    results = [r for _, r in sorted((x for part in gathered for x in part[0]), key=lambda x: x[0])]
    examples = [e for _, e in sorted((x for part in gathered for x in part[1]), key=lambda x: x[0])][:keep_masks]
    wall = max(part[2] for part in gathered)
    by_label: dict[str, list] = {}
    by_source: dict[str, list] = {}
    for r in results:
        by_label.setdefault(r["name"], []).append(r)
        by_source.setdefault(r["source"], []).append(r)
    lat = [v for r in results for v in r["latency_ms"]]
    report = {
        "method": segmenter.name,
        "protocol": "legacy (crop on ground truth, newest click only, best Dice)" if cfg.legacy else "ours",
        "config": {**asdict(cfg), "sources": list(cfg.sources) if cfg.sources else None},
        "data": str(root),
        "overall": aggregate(results, cfg.clicks),
        "per_source": {k: aggregate(v, cfg.clicks) for k, v in sorted(by_source.items())},
        "per_label": {k: aggregate(v, cfg.clicks) for k, v in sorted(by_label.items())},
        "targets": results,
        "timing": {
            "wall_s": round(wall, 2),
            "processes": ranks.world,
            "click_latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if lat else None,
            "click_latency_ms_p90": round(float(np.percentile(lat, 90)), 2) if lat else None,
        },
    }
    if keep_masks:
        report["_examples"] = examples
    return report


def segmenter_mask_copy(segmenter) -> np.ndarray:
    if hasattr(segmenter, "session"):
        return segmenter.session.mask(segmenter.seg).copy()
    return segmenter.mask.copy()


def strip_timings(report: dict) -> dict:
    """The report without wall-clock figures (what must be identical across runs)."""
    out = {k: v for k, v in report.items() if k not in ("timing", "_examples")}
    out["targets"] = [{k: v for k, v in t.items() if k != "latency_ms"} for t in report["targets"]]
    return out
