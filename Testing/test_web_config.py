"""What the web app lets a browser name: uploaded file names reduced to plain names in its own folder, exports
named after the volume, and only volumes under the data folders listed (MemorizingSAMLib/web/config.py)."""

import json

import pytest

from MemorizingSAMLib.web.config import data_files, export_name, safe_upload_name, samples


@pytest.mark.parametrize(
    "name, plain",
    [
        ("../../etc/cron.d/evil.nii.gz", "evil.nii.gz"),
        ("C:\\Users\\x\\scan.nrrd", "scan.nrrd"),
        ("ct <1>.mha", "ct _1_.mha"),
        ("/abs/path/brain.nii", "brain.nii"),
    ],
)
def test_upload_names_lose_their_folders(name, plain):
    assert safe_upload_name(name) == plain


@pytest.mark.parametrize("name", ["notes.txt", "..", "", "seg.seg.nrrd", "data.raw"])
def test_upload_names_that_are_not_volumes_are_refused(name):
    with pytest.raises(ValueError, match="not a volume file"):
        safe_upload_name(name)


def test_a_headers_data_file_is_accepted_beside_it():
    assert safe_upload_name("../x/scan.raw.gz", companion=True) == "scan.raw.gz"
    with pytest.raises(ValueError):
        safe_upload_name("script.sh", companion=True)


def test_export_names_follow_the_volume_without_its_suffix():
    assert export_name("lung2_crop.nii.gz", ".seg.nrrd") == "lung2_crop_segments.seg.nrrd"
    assert export_name("a b/c.nrrd", ".nii.gz") == "a_b_c_segments.nii.gz"
    with pytest.raises(ValueError, match="export format"):
        export_name("x", ".png")


def test_only_volumes_under_the_data_folders_are_listed(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for f in ("a.nii.gz", "sub/b.nrrd", "sub/c.seg.nrrd", "notes.txt", "sub/d.mha"):
        (root / f).write_bytes(b"x")
    (tmp_path / "outside.nii.gz").write_bytes(b"x")
    listed = sorted(v.label for v in data_files((str(root),)))
    assert listed == ["data/a.nii.gz", "data/sub/b.nrrd", "data/sub/d.mha"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_files((str(tmp_path / "missing"),))


def test_samples_come_from_the_dataset_index(tmp_path):
    (tmp_path / "ct.nii.gz").write_bytes(b"x")
    index = {"cases": [{"id": "ct", "image": "ct.nii.gz", "labels": {"1": "lesion"}, "source": "s"},
                       {"id": "gone", "image": "gone.nii.gz"}],
             "sources": {"s": {"name": "a source"}}}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(index))
    found = samples(tmp_path)
    assert [(v.key, v.label) for v in found] == [("sample:ct", "ct (lesion; a source)")]
