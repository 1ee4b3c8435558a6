"""Training and distillation: the loss goes down on fixed data; the commands run end to end (tiny smoke runs)."""

import json

import pytest
import torch

from MemorizingSAMLib.datasets import prepare_dataset
from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.training.distill import active_layers, distillation_loss, layer_mapping


def test_layer_mapping_and_progressive_schedule():
    s, t = build_sam3d("memsam_tiny_student"), build_sam3d("memsam_small_teacher")
    assert layer_mapping(s, t) == [(0, 1), (1, 3), (2, 5)]
    assert [active_layers(step, 9, 3) for step in range(9)] == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_distillation_loss_decreases_and_student_moves_towards_teacher():
    torch.manual_seed(0)
    teacher = build_sam3d("memsam_small_teacher").eval().requires_grad_(False)
    student = build_sam3d("memsam_tiny_student").train()
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    pairs = layer_mapping(student, teacher)

    def gaps():
        with torch.no_grad():
            _, tb = teacher.image_encoder(x, return_block_outputs=True)
            _, sb = student.image_encoder(x, return_block_outputs=True)
        return [float((sb[i] - tb[j]).pow(2).mean()) for i, j in pairs]

    before = gaps()
    opt = torch.optim.Adam(student.image_encoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = distillation_loss(student, teacher, x, n_active=3, with_embedding=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = gaps()
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(a < b for a, b in zip(after, before)), (before, after)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("d"), sources=("phantom",), phantom_seeds=(0, 1))


def test_train_and_distill_commands_smoke(train_data, tmp_path, memsam):
    r = memsam(
        "train",
        "--config",
        "memsam_small_teacher",
        "--data",
        str(train_data),
        "--steps",
        "2",
        "--batch",
        "1",
        "--log-every",
        "1",
        "--checkpoint-every",
        "1",
        "--out",
        str(tmp_path / "t"),
    )
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (tmp_path / "t" / "train_log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [1, 2]
    # resume: asking for 3 steps continues from step 2
    r = memsam(
        "train",
        "--config",
        "memsam_small_teacher",
        "--data",
        str(train_data),
        "--steps",
        "3",
        "--batch",
        "1",
        "--log-every",
        "1",
        "--out",
        str(tmp_path / "t"),
    )
    assert r.returncode == 0 and "resuming train at step 2" in r.stderr
    r = memsam(
        "distill",
        "--teacher",
        str(tmp_path / "t" / "train_last.pt"),
        "--data",
        str(train_data),
        "--steps",
        "2",
        "--finetune-steps",
        "1",
        "--batch",
        "1",
        "--log-every",
        "1",
        "--half",
        "--out",
        str(tmp_path / "s"),
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(memsam("info", str(tmp_path / "s" / "student.pt")).stdout)
    assert info["architecture"].startswith("memsam_tiny_student") and info["dtypes"] == ["float16"]
