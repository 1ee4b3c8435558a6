"""Memory banks: memory attention semantics, exact retrieval, file integrity, building from labelled volumes."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MemorizingSAMLib.memory_bank import BankEntry, MemoryBank, MemoryBankError, build_bank, write_bank
from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.modeling.memory_attention import RetrievedMemory, inverse_distance_weights
from MemorizingSAMLib.session import InteractiveSession


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_sam3d("memsam_tiny_student").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def labelled_case(seed):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, (40, 60, 60)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[10:25, 10:30, 10:30] = 1
    lab[20:35, 35:55, 30:50] = 2
    img[lab == 1] += 200
    img[lab == 2] += 400
    i, l_ = sitk.GetImageFromArray(img), sitk.GetImageFromArray(lab)
    for x in (i, l_):
        x.SetSpacing((1.2, 1.2, 2.0))
    return i, l_


@pytest.fixture(scope="module")
def bank_path(model, tmp_path_factory):
    cases = [(f"case{s}", *labelled_case(s)) for s in range(3)]
    out = tmp_path_factory.mktemp("bank") / "bank.msam"
    return build_bank(model, cases, {1: "liver", 2: "kidney"}, out, progress=None)


def x_crop(seed=5):
    return torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_bank_contents_and_metadata(bank_path, model):
    bank = MemoryBank.load(bank_path, model)
    assert len(bank) == 6 and bank.layer == model.cfg.memory_layer
    assert sorted({e["label"] for e in bank.entries}) == ["kidney", "liver"]
    assert bank.keys.shape == (6, 6, 512, 32) and bank.keys.dtype == np.float16
    assert bank.descriptors.shape == (6, 256)  # 2 x 192 channels projected to 256
    assert bank_path.stat().st_size < 6 * 2 * 6 * 512 * 32 * 2 + 64 * 1024  # fp16 KV + small header


def test_empty_bank_or_zero_memory_weight_is_plain_model(bank_path, model):
    x = x_crop()
    with torch.inference_mode():
        plain = model.encode(x)
        bank = MemoryBank.load(bank_path, model, k=3, local_ratio=1.0)
        assert torch.equal(model.encode(x, memory=bank.provider()), plain)
        bank0 = MemoryBank.load(bank_path, model, k=0)
        assert torch.equal(model.encode(x, memory=bank0.provider()), plain)
        with_mem = model.encode(x, memory=MemoryBank.load(bank_path, model, k=3).provider())
    assert not torch.allclose(with_mem, plain)


def test_memory_changes_outputs_only_from_the_memory_layer(bank_path, model):
    x = x_crop()
    bank = MemoryBank.load(bank_path, model, k=2)
    with torch.inference_mode():
        _, plain = model.image_encoder(x, return_block_outputs=True)
        _, mem = model.image_encoder(x, return_block_outputs=True, memory=bank.provider())
    layer = bank.layer
    for i in range(layer):
        assert torch.equal(plain[i], mem[i]), i
    for i in range(layer, len(plain)):
        assert not torch.allclose(plain[i], mem[i]), i


def test_retrieval_returns_true_nearest(tmp_path, model):
    rng = np.random.default_rng(0)
    n, d = 500, 256
    desc = rng.normal(size=(n, d)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    kv = np.zeros((n, 1, 1, 1), np.float16)
    entries = [BankEntry(f"l{i}", i, "syn", (0.0, 0.0, 0.0), 1) for i in range(n)]
    path = write_bank(tmp_path / "syn.msam", model, 3, desc, kv, kv, entries)
    bank = MemoryBank.load(path)
    q = rng.normal(size=d).astype(np.float32)
    idx, dist = bank.nearest(torch.from_numpy(q), k=5)
    stored = desc.astype(np.float16).astype(np.float32)
    true = np.argsort(np.linalg.norm(stored - q, axis=1))[:5]
    assert idx.tolist() == true.tolist()
    np.testing.assert_allclose(dist.numpy(), np.linalg.norm(stored[true] - q, axis=1), rtol=1e-4)
    w = inverse_distance_weights(dist)
    assert abs(w.sum().item() - 1) < 1e-6 and (w[:-1] >= w[1:]).all()


def test_memory_weights_use_the_memory_keys():
    # Two memory entries with identical values but different keys must give different outputs from a query
    # that matches one entry's keys: the keys' attention weights are not discarded.
    from MemorizingSAMLib.modeling.memory_attention import attend_memory

    torch.manual_seed(1)
    q = torch.randn(1, 1, 4, 8)
    v = torch.randn(1, 1, 6, 8)
    k1, k2 = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    out1 = attend_memory(q, RetrievedMemory(k1, v, torch.ones(1)), 0.35)
    out2 = attend_memory(q, RetrievedMemory(k2, v, torch.ones(1)), 0.35)
    assert not torch.allclose(out1, out2)


def test_corrupt_truncated_and_wrong_model_banks(bank_path, tmp_path, model):
    data = bank_path.read_bytes()
    (tmp_path / "trunc.msam").write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryBankError, match="truncated"):
        MemoryBank.load(tmp_path / "trunc.msam")
    bad = bytearray(data)
    bad[40] ^= 0xFF  # inside the JSON header
    (tmp_path / "hdr.msam").write_bytes(bytes(bad))
    with pytest.raises(MemoryBankError, match="corrupt header"):
        MemoryBank.load(tmp_path / "hdr.msam")
    hlen = int.from_bytes(data[8:16], "little")
    desc_start = (16 + hlen + 63) // 64 * 64  # the descriptors are the first array after the header
    bad = bytearray(data)
    bad[desc_start + 10] ^= 0xFF
    (tmp_path / "desc.msam").write_bytes(bytes(bad))
    with pytest.raises(MemoryBankError, match="corrupt data in 'descriptors'"):
        MemoryBank.load(tmp_path / "desc.msam")
    (tmp_path / "junk.msam").write_bytes(b"not a bank at all")
    with pytest.raises(MemoryBankError, match="bad magic"):
        MemoryBank.load(tmp_path / "junk.msam")
    other = build_sam3d("memsam_tiny_student").eval()  # same architecture, other weights
    with pytest.raises(MemoryBankError, match="other weights"):
        MemoryBank.load(bank_path, other)
    with torch.device("meta"):
        teacher = build_sam3d("memsam_small_teacher")
    with pytest.raises(MemoryBankError, match="memsam_tiny_student encoder"):
        MemoryBank.load(bank_path).check_model(teacher)


def test_failed_write_leaves_previous_bank(bank_path, model, tmp_path, monkeypatch):
    import shutil

    target = tmp_path / "b.msam"
    shutil.copy(bank_path, target)
    before = target.read_bytes()
    kv = np.zeros((2, 1, 1, 1), np.float32)
    entries = [BankEntry("a", 1, "s", (0.0, 0.0, 0.0), 1)] * 2

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_bank(target, model, 3, np.zeros((2, 4), np.float32), kv, kv, entries)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b.msam"]


def test_session_with_bank_retrieves_once_per_embedding(bank_path, model):
    bank = MemoryBank.load(bank_path, model)
    s = InteractiveSession(model, memory=bank)
    img, _ = labelled_case(7)
    s.set_image(img)
    s.add_segment()
    calls = []
    orig = s._provider.retrieve
    s._provider.retrieve = lambda t: calls.append(1) or orig(t)
    s.add_point((20, 20, 15))
    s.add_point((22, 18, 16), include=False)
    s.add_point((25, 20, 17))
    assert len(calls) == 1
    assert s._provider.last["labels"]


def test_build_restricted_to_given_label_values(model, tmp_path):
    img, lab = labelled_case(0)
    out = build_bank(model, [("c0", img, lab, [2])], {1: "liver", 2: "kidney"}, tmp_path / "b.msam", progress=None)
    bank = MemoryBank.load(out, model)
    assert [e["label"] for e in bank.entries] == ["kidney"]


def test_damaged_keys_and_values_are_found_when_read(bank_path, model, tmp_path):
    """4 KB flipped inside the keys, or NaN written into an entry's values, used to change masks silently: the
    bank still opens (its arrays stay memory-mapped), and reading that entry raises."""
    import json
    import struct

    data = bytearray(bank_path.read_bytes())
    (hlen,) = struct.unpack("<Q", bytes(data[8:16]))
    header = json.loads(bytes(data[16 : 16 + hlen]))["header"]
    start = (16 + hlen + 63) // 64 * 64
    spec = {a["name"]: a for a in header["arrays"]}
    row = int(np.prod(spec["keys"]["shape"][1:])) * 2  # bytes per entry (float16)
    damaged = bytearray(data)
    at = start + spec["keys"]["offset"] + 2 * row + 100  # inside entry 2's keys
    damaged[at : at + 4096] = bytes(b ^ 0x5A for b in damaged[at : at + 4096])
    (tmp_path / "flipped.msam").write_bytes(bytes(damaged))
    nan = bytearray(data)
    at = start + spec["values"]["offset"] + 3 * row
    nan[at : at + 64] = np.full(32, np.nan, np.float16).tobytes()
    (tmp_path / "nan.msam").write_bytes(bytes(nan))
    for name, entry in (("flipped.msam", 2), ("nan.msam", 3)):
        bank = MemoryBank.load(tmp_path / name, model)
        bank.retrieve_entries(torch.tensor([0]))  # an intact entry reads
        with pytest.raises(MemoryBankError, match=f"entry {entry}"):
            bank.retrieve_entries(torch.tensor([entry]))


def test_one_changed_weight_invalidates_the_bank(bank_path, model):
    """The fingerprint covers every weight that makes the memory layer's keys and values (it sampled every 27th)."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        w = other.image_encoder.blocks[0].mlp.lin1.weight
        w.view(-1)[13] += 1e-3  # not a sampled position of the old fingerprint
    with pytest.raises(MemoryBankError, match="other weights"):
        MemoryBank.load(bank_path, other)
    MemoryBank.load(bank_path, model)
