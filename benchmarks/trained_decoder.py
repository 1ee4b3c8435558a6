"""FastSAM3D-architecture weights whose masks have a realistic extent, for timing the click path.

The fixture-recipe weights give noise logits: about half of the crop comes out positive, so every click re-samples
~3.5 M voxels of the lung CT, the paste's worst case; a real model marks one structure. This trains the prompt
encoder and mask decoder of the recipe model (encoder frozen) for a few hundred steps on the shipped sample data
(Resources/SampleData), which makes the masks compact around the clicks. They are not accurate (that is not what
they are for): compute per click is the same as with any FastSAM3D weights, only the mask's extent changes.

    python benchmarks/trained_decoder.py            # trains if needed (~5 min here), prints the checkpoint path

The checkpoint is cached in data/bench/ (not in git: ~110 MB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import recipe_model, setup_threads  # noqa: E402

from MemorizingSAMLib.checkpoints import load_model, save_checkpoint  # noqa: E402
from MemorizingSAMLib.modeling.sam3d import Sam3D  # noqa: E402
from MemorizingSAMLib.training.data import TrainingData  # noqa: E402
from MemorizingSAMLib.training.loop import segmentation_loss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / "data" / "bench" / "fastsam3d_recipe_trained_decoder.pt"


def train_decoder(model: Sam3D, steps: int, seed: int = 0, lr: float = 3e-4, max_clicks: int = 3) -> list[float]:
    """Train ``model``'s prompt encoder and mask decoder in place (encoder frozen); returns the Dice per step."""
    data = TrainingData(ROOT / "Resources" / "SampleData", split="heldout")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = [p for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    lr_size = model.low_res_size
    dices: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        x, y, c0 = data.sample(rng, model.cfg)
        model.eval()
        with torch.no_grad():
            emb = model.encode(torch.from_numpy(x)[None, None])
        model.train()
        yt = torch.from_numpy(y)
        prev = torch.zeros(1, 1, lr_size, lr_size, lr_size)
        clicks, labels = [c0], [1]
        loss_sum = 0.0
        n = int(rng.integers(1, max_clicks + 1))
        for _ in range(n):
            low, _ = model.decode(emb, torch.as_tensor(np.stack(clicks))[None], torch.as_tensor(labels)[None], prev)
            loss, d = segmentation_loss(low, yt)
            loss_sum = loss_sum + loss
            prev = low.detach()
            # next click: a random target voxel (include) or a random voxel outside (exclude)
            inside = rng.random() < 0.5
            idx = np.argwhere(y > 0 if inside else y == 0)
            clicks.append(idx[rng.integers(len(idx))].astype(np.float32))
            labels.append(1 if inside else 0)
        opt.zero_grad(set_to_none=True)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        dices.append(d)
        if (step + 1) % 25 == 0:
            el = time.perf_counter() - t0
            print(
                f"[trained_decoder] step {step + 1}/{steps} dice(last 25) {np.mean(dices[-25:]):.3f} "
                f"({el:.0f} s, eta {el / (step + 1) * (steps - step - 1):.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    return dices


def trained_decoder_model(path: Path = DEFAULT_PATH, steps: int = 300) -> Sam3D:
    """The cached model, trained first if absent; ready for inference (packed weights)."""
    if not path.is_file():
        model = recipe_model("fastsam3d")
        dices = train_decoder(model, steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            model,
            path,
            metadata={
                "what": "fixture-recipe FastSAM3D with prompt encoder + mask decoder trained on the sample data",
                "steps": steps,
                "dice_last_50": float(np.mean(dices[-50:])),
            },
            half=True,
        )
    return load_model(path).prepare_for_inference()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = ap.parse_args()
    setup_threads()
    trained_decoder_model(args.out, args.steps)
    print(args.out)


if __name__ == "__main__":
    main()
