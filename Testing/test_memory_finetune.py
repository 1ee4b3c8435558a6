"""Mask-aware memory values and fine-tuning with memory active: the bank carries the structures' masks per token,
the model reads them only through its learned value vectors, training never retrieves the sample's own structure,
and the weights that make the bank's keys/values stay frozen so a bank stays valid."""

import numpy as np
import pytest
import torch
from test_memory_bank import labelled_case, x_crop

from MemorizingSAMLib.checkpoints import load_model, save_checkpoint
from MemorizingSAMLib.datasets import prepare_dataset
from MemorizingSAMLib.memory_bank import (
    BankEntry,
    MemoryBank,
    MemoryBankError,
    build_bank,
    model_fingerprint,
    token_foreground,
    write_bank,
)
from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.session import InteractiveSession
from MemorizingSAMLib.training.data import TrainingData
from MemorizingSAMLib.training.memory_finetune import TrainingMemory, convert_for_memory, frozen_for_memory


def perturbed(name, seed=0):
    torch.manual_seed(seed)
    m = build_sam3d(name).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def memory_model():
    return perturbed("memsam_tiny_memory")


@pytest.fixture(scope="module")
def memory_bank_path(memory_model, tmp_path_factory):
    cases = [(f"case{s}", *labelled_case(s)) for s in range(2)]
    return build_bank(memory_model, cases, None, tmp_path_factory.mktemp("b") / "bank.msam", progress=None)


def test_token_foreground_fractions_in_token_order():
    s, p = 16, 4
    mask = np.zeros((s, s, s), np.float32)  # [x, y, z]
    mask[:6] = 1  # x < 6: token column 0 fully, column 1 half (x = 4, 5 of 4..7)
    mask[8:12, 0:4, 12:16] = 1  # exactly the token (2, 0, 3)
    fg = token_foreground(mask, p).reshape(4, 4, 4)
    expected = np.zeros((4, 4, 4))
    expected[0], expected[1], expected[2, 0, 3] = 1.0, 0.5, 1.0
    np.testing.assert_allclose(fg, expected)


def test_bank_stores_masks_and_the_model_reads_them_only_through_its_mask_weights(memory_model, memory_bank_path):
    bank = MemoryBank.load(memory_bank_path, memory_model)
    assert bank.foreground.shape == (len(bank), 512)
    assert 0 < float(np.asarray(bank.foreground).max()) <= 1.0  # crops centred on the structures
    x = x_crop()
    with torch.inference_mode():
        ref = memory_model.encode(x, memory=bank.provider())
        bank.foreground = np.zeros_like(np.asarray(bank.foreground))
        no_mask = memory_model.encode(x, memory=bank.provider())
        enc = memory_model.image_encoder
        readers = [enc.blocks[memory_model.cfg.memory_layer].attn.memory_fg, enc.memory_prior_vec]
        saved = [r.clone() for r in readers]
        for r in readers:
            r.zero_()
        try:
            zero_e = memory_model.encode(x, memory=MemoryBank.load(memory_bank_path, memory_model).provider())
        finally:
            for r, v in zip(readers, saved):
                r.copy_(v)
    assert (ref - no_mask).abs().max() > 1e-3  # the masks matter
    torch.testing.assert_close(zero_e, no_mask, rtol=0, atol=1e-6)  # ... only through e_h and u


def test_mask_aware_model_refuses_a_bank_without_masks(memory_model, memory_bank_path, tmp_path):
    b = MemoryBank.load(memory_bank_path)
    entries = [
        BankEntry(e["label"], e["label_value"], e["source"], tuple(e["crop_origin_ras"]), e["voxels"])
        for e in b.entries
    ]
    keys, values = np.asarray(b.keys), np.asarray(b.values)
    path = write_bank(tmp_path / "old.msam", memory_model, b.layer, b.descriptors.numpy(), keys, values, entries)
    assert MemoryBank.load(path).foreground is None
    with pytest.raises(MemoryBankError, match="masks"):
        MemoryBank.load(path, memory_model)


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("d"), sources=("phantom",), phantom_seeds=(0, 1))


def test_training_memory_never_retrieves_the_samples_own_structure(memory_model, phantom_data):
    data = TrainingData(phantom_data)
    mem = TrainingMemory(memory_model, data, k=2)
    assert len(mem) == len(data)
    for n, t in enumerate(t for s in sorted(data.targets) for t in data.targets[s]):
        assert mem.ids[n] == (t.case, t.value)
        own = mem.descriptors[n]
        idx, dist = mem.nearest(own, np.ones(len(mem), bool))
        assert int(idx[0]) == n and float(dist[0]) < 1e-5  # without the exclusion it is its own nearest
        prov = mem.provider_for(t)
        idx, _ = mem.nearest(own, prov.allowed)
        assert n not in idx.tolist() and len(idx) == 2


def test_convert_and_frozen_part():
    student = perturbed("memsam_tiny_student")
    m = convert_for_memory(student, build_sam3d("memsam_tiny_memory").cfg, gate_init=1.5)
    layer = m.cfg.memory_layer
    assert m.image_encoder.blocks[layer].attn.memory_gate.tolist() == [1.5] * 6
    assert model_fingerprint(m, layer) == model_fingerprint(student, layer)
    x = x_crop()
    with torch.inference_mode():  # without memory the converted model is the student
        torch.testing.assert_close(m.encode(x), student.encode(x))
    frozen = {n for n, _ in m.named_parameters() if frozen_for_memory(n, layer)}
    assert f"image_encoder.blocks.{layer}.attn.qkv.weight" in frozen
    assert "image_encoder.pos_embed" in frozen and "image_encoder.blocks.0.mlp.lin1.weight" in frozen
    assert f"image_encoder.blocks.{layer}.attn.proj.weight" not in frozen
    assert f"image_encoder.blocks.{layer}.attn.memory_fg" not in frozen
    assert "mask_decoder.iou_token.weight" not in frozen


def test_finetune_memory_command_keeps_the_bank_valid_and_the_session_uses_it(phantom_data, tmp_path, memsam):
    student = perturbed("memsam_tiny_student")
    init = save_checkpoint(student, tmp_path / "student.pt")
    args = ["--data", str(phantom_data), "--sources", "phantom", "--steps", "2", "--batch", "1", "--log-every", "1"]
    r = memsam("finetune-memory", "--model", init, *args, "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    tuned = load_model(tmp_path / "m" / "model.pt")
    layer = tuned.cfg.memory_layer
    assert tuned.cfg.name == "memsam_tiny_memory"
    assert model_fingerprint(tuned, layer) == model_fingerprint(student, layer)
    moved = (tuned.mask_decoder.iou_token.weight - student.mask_decoder.iou_token.weight).abs().max()
    assert moved > 0
    r = memsam(
        "build-memory", "--model", tmp_path / "m" / "model.pt", "--data", phantom_data, "--out", tmp_path / "bank.msam"
    )
    assert r.returncode == 0, r.stderr
    bank = MemoryBank.load(tmp_path / "bank.msam", tuned)
    img, _ = labelled_case(3)
    session = InteractiveSession(tuned, memory=bank)
    session.set_image(img)
    session.add_segment("s")
    session.add_point(np.array([20.0, 20.0, 17.0]))
    assert session._provider.last["labels"]  # retrieval ran on the fine-tuned model's bank


def test_memory_prior_route_places_the_mirrored_mask_at_the_tokens():
    from MemorizingSAMLib.modeling.memory_attention import RetrievedMemory

    enc = perturbed("memsam_tiny_memory").image_encoder
    g, c = enc.cfg.grid, enc.cfg.out_chans
    fg = torch.zeros(2, g, g, g)
    fg[0, 1, 2, 3] = 1.0  # entry 0: one token, x = 1
    fg[1, 5, 5, 5] = 1.0
    mem = RetrievedMemory(
        torch.zeros(2, 6, g**3, 32), torch.zeros(2, 6, g**3, 32), torch.tensor([0.75, 0.25]), 0.3, fg.view(2, -1)
    )
    with torch.no_grad():
        prior = enc.memory_prior(mem, g)
    u = enc.memory_prior_vec
    assert prior.shape == (1, c, g, g, g)
    expected = torch.zeros(g, g, g)
    expected[1, 2, 3] += 0.375
    expected[g - 2, 2, 3] += 0.375  # mirrored along tensor axis x (R <-> L)
    expected[5, 5, 5] += 0.125
    expected[g - 6, 5, 5] += 0.125
    torch.testing.assert_close(prior[0], expected[None] * u.view(-1, 1, 1, 1))
