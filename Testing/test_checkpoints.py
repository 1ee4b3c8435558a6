"""Safe, strict checkpoint loading with readable errors; our own format round-trips."""

import argparse
import pickle
import zipfile
from dataclasses import replace

import pytest
import torch

from MemorizingSAMLib.checkpoints import (
    CheckpointError,
    detect_architecture,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from MemorizingSAMLib.modeling import build_sam3d, get_config


def _model(name="memsam_tiny_student", seed=0):
    torch.manual_seed(seed)
    m = build_sam3d(name)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def _outputs(m, seed=5):
    g = torch.Generator().manual_seed(seed)
    s = m.cfg.encoder.img_size
    x = torch.randn(1, 1, s, s, s, generator=g)
    with torch.no_grad():
        emb = m.encode(x)
        low, iou = m.decode(emb, torch.tensor([[[30, 32, 35]]]), torch.tensor([[1]]))
    return emb, low, iou


@pytest.fixture(scope="module")
def tiny():
    return _model()


def test_upstream_container_with_namespace_loads(tiny, tmp_path):
    path = tmp_path / "up.pth"
    torch.save({"model_state_dict": tiny.state_dict(), "args": argparse.Namespace(lr=1e-3), "epoch": 3}, path)
    # Plain weights_only loading refuses this file (this is why the allow-list exists) ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    m = load_model(path, config="memsam_tiny_student")
    for a, b in zip(_outputs(tiny), _outputs(m)):
        assert torch.equal(a, b)


def test_bare_state_dict_and_module_prefix(tiny, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({"module." + k: v for k, v in tiny.state_dict().items()}, path)
    m = load_model(path, config="memsam_tiny_student")
    assert torch.equal(_outputs(tiny)[1], _outputs(m)[1])


def test_own_format_roundtrip_records_config(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "ours.pt", metadata={"note": "x"})
    f = read_checkpoint(path)
    assert f.config == tiny.cfg and f.metadata == {"note": "x"}
    m = load_model(path)
    assert m.cfg == tiny.cfg
    assert torch.equal(_outputs(tiny)[1], _outputs(m)[1])
    half = load_model(save_checkpoint(tiny, tmp_path / "half.pt", half=True))
    assert half.mask_decoder.iou_token.weight.dtype == torch.float32
    assert (_outputs(tiny)[1] - _outputs(half)[1]).abs().max() < 0.05


def test_device_and_dtype_are_honoured(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "ours.pt")
    m = load_model(path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_truncated_file(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "ours.pt")
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(cut)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(tmp_path / "empty.pth")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_foreign_object_is_refused_without_running_it(tiny, tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": tiny.state_dict(), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle .*print"):
        load_model(path)
    assert "this must never run" not in capsys.readouterr().out


def test_wrong_shape_tensor_names_key_and_shapes(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    key = "mask_decoder.iou_prediction_head.layers.1.weight"
    sd[key] = torch.zeros(7, 7)
    path = tmp_path / "bad.pth"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, config="memsam_tiny_student")
    msg = str(e.value)
    assert key in msg and "(7, 7)" in msg and "(96, 96)" in msg
    assert len(msg.splitlines()) == 1


def test_other_architecture_is_named(tmp_path):
    teacher = _model("memsam_small_teacher")
    path = tmp_path / "teacher.pth"
    torch.save({"model_state_dict": teacher.state_dict()}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, config="memsam_tiny_student")
    assert "memsam_tiny_student" in str(e.value) and "memsam_small_teacher" in str(e.value)


def test_not_a_sam3d_file_and_2d_sam(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    with pytest.raises(CheckpointError, match="not a SAM-Med3D-family checkpoint"):
        load_model(path)
    path2 = tmp_path / "sam2d.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, path2)
    with pytest.raises(CheckpointError, match="2D model"):
        load_model(path2)


def test_missing_keys_are_summarised(tiny, tmp_path):
    sd = {k: v for k, v in tiny.state_dict().items() if ".mlp." not in k}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, config="memsam_tiny_student")
    msg = str(e.value)
    assert "missing" in msg and "blocks.#.mlp.lin1.weight (x3)" in msg
    assert len(msg) < 1000


def test_encoder_only_file_needs_and_takes_a_decoder_file(tiny, tmp_path):
    enc = {k[len("image_encoder.") :]: v for k, v in tiny.state_dict().items() if k.startswith("image_encoder.")}
    enc_path = tmp_path / "student_encoder.pth"
    torch.save({"model_state_dict": enc, "args": argparse.Namespace(a=1)}, enc_path)
    with pytest.raises(CheckpointError, match="only an image encoder"):
        load_model(enc_path)
    full_path = tmp_path / "full.pth"
    torch.save({"model_state_dict": tiny.state_dict()}, full_path)
    m = load_model(enc_path, decoder_checkpoint=full_path)
    assert torch.equal(_outputs(tiny)[1], _outputs(m)[1])


def test_detect_architecture_of_published_shapes():
    for name in ("sam_med3d_vit_b", "fastsam3d"):
        with torch.device("meta"):
            sd = build_sam3d(name).state_dict()
        arch = detect_architecture(sd)
        assert arch.known_name == name and arch.config == get_config(name)
    cfg = replace(get_config("fastsam3d"), name="x")
    assert detect_architecture(build_sam3d(cfg).to("meta").state_dict()).known_name == "fastsam3d"


def test_not_a_zip(tmp_path):
    path = tmp_path / "text.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not zipfile.is_zipfile(path)


def test_a_stored_config_that_does_not_fit_its_weights_is_refused_before_building(tmp_path):
    """A file whose stored config says depth 10^6 used to be built (for minutes) before its keys were checked."""
    import time

    path = save_checkpoint(build_sam3d("memsam_tiny_student"), tmp_path / "m.pt")
    obj = torch.load(path, weights_only=False)
    obj["config"]["encoder"]["depth"] = 10**6
    torch.save(obj, tmp_path / "deep.pt")
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="encoder depth 1000000, the weights have"):
        load_model(tmp_path / "deep.pt")
    assert time.perf_counter() - t < 10
