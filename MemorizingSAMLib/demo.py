"""``memsam demo``: the shipped default model segments the shipped sample data from simulated clicks, click by
click, printing latency and Dice; writes a labelmap per case (.nii.gz), a PNG montage and a JSON report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checkpoints import load_model
from .datasets import load_dataset, targets
from .evaluation.clicks import first_click, next_click
from .evaluation.metrics import dice, summarise
from .fileio import atomic_text, write_image
from .session import InteractiveSession


def run_demo(model_path, data_dir, out_dir, clicks: int = 5, memory_path=None, echo=print) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()
    model = load_model(model_path).prepare_for_inference()
    bank = None
    if memory_path:
        from .memory_bank import MemoryBank

        bank = MemoryBank.load(memory_path, model)
    echo(
        f"model {model.cfg.name} from {model_path} ({model.count_parameters():,} parameters)"
        + (f", memory bank {Path(memory_path).name} ({len(bank)} entries)" if bank else "")
        + f", loaded in {time.perf_counter() - t_load:.2f} s"
    )
    meta = load_dataset(data_dir)
    report = {"model": str(model_path), "memory": str(memory_path) if memory_path else None, "cases": []}
    examples = []
    for case in meta["cases"]:
        img = sitk.ReadImage(str(Path(data_dir) / case["image"]))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(data_dir) / case["label"])))
        session = InteractiveSession(model, memory=bank)
        session.set_image(img)
        echo(
            f"\n{case['id']}: {img.GetSize()} voxels of {tuple(round(s, 2) for s in img.GetSpacing())} mm "
            f"({case['source']})"
        )
        case_rep = {"id": case["id"], "targets": []}
        for value, name in targets(case, None):
            gt = (lab == value).astype(np.uint8)
            seg = session.add_segment(name)
            click = first_click(gt, img.GetSpacing())
            dices, lat = [], []
            for n in range(1, clicks + 1):
                session.add_point(click.ijk, click.include, seg)
                d = dice(gt, session.mask(seg))
                t = session.last_timing
                dices.append(round(d, 4))
                lat.append(round(t["total_ms"], 1))
                kind = "include" if click.include else "exclude"
                enc = " (new crop: encoder ran)" if t["encoded"] else ""
                where = tuple(click.ijk)
                echo(f"  {name:14s} click {n} {kind:7s} at {where}: Dice {d:.3f} {t['total_ms']:7.1f} ms{enc}")
                nxt = next_click(gt, session.mask(seg), img.GetSpacing())
                if nxt is None:
                    break
                click = nxt
            case_rep["targets"].append(
                {"label": name, "value": value, "dice": dices, "latency_ms": lat, **summarise(dices)}
            )
            if len(examples) < 6:
                examples.append(
                    {
                        "case": case["id"],
                        "name": name,
                        "image": sitk.GetArrayFromImage(img),
                        "gt": gt,
                        "pred": session.mask(seg).copy(),
                        "click": list(first_click(gt, img.GetSpacing()).ijk),
                    }
                )
        # labelmap with the case's own label values, in the image's geometry
        lm = np.zeros(lab.shape, np.uint8)
        for s in session.segments.values():
            value = next(t["value"] for t in case_rep["targets"] if t["label"] == s.name)
            lm[(s.mask > 0) & (lm == 0)] = value
        lm_img = sitk.GetImageFromArray(lm)
        lm_img.CopyInformation(img)
        path = out / f"{case['id']}_labelmap.nii.gz"
        write_image(lm_img, path)
        case_rep["labelmap"] = str(path)
        report["cases"].append(case_rep)
    from .evaluation.plots import montage

    montage(examples, out / "montage.png")
    all_lat = [v for c in report["cases"] for t in c["targets"] for v in t["latency_ms"][1:]]
    report["refinement_click_ms_p50"] = round(float(np.median(all_lat)), 1) if all_lat else None
    report["final_dice"] = {f"{c['id']}:{t['label']}": t["dice"][-1] for c in report["cases"] for t in c["targets"]}
    atomic_text(out / "demo_report.json", json.dumps(report, indent=1))
    echo(
        f"\nrefinement clicks: median {report['refinement_click_ms_p50']} ms; wrote {out}/ (labelmaps, montage.png, "
        "demo_report.json)"
    )
    return report
