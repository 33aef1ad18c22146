"""Every data, archive, checkpoint and disk fault ends in one message naming the culprit (issue 12 items 4, 6)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import study.io
from study.data import DataError, build_dataset
from study.data.config import DataConfig
from study.data.synthetic import generate
from study.errors import UserError
from study.io import atomic_torch_save, atomic_write_json, atomic_write_text, read_torch_file
from study.models.weights import read_weights


@pytest.fixture
def coco(tmp_path) -> Path:
    return generate(tmp_path / "coco", 48, 3, 2, seed=0)


def _pan(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="coco_panoptic", root=str(root), **kw)


def _edit(path: Path, edit) -> None:
    js = json.loads(path.read_text())
    js = edit(js) or js
    path.write_text(json.dumps(js))


PAN_JSON = Path("annotations") / "panoptic_val2017.json"


# ------------------------------------------------------------------------------------------ archives


def test_non_zip_archive_names_the_file(coco):
    shutil.rmtree(coco / "val2017")
    (coco / "val2017.zip").write_bytes(b"this is not a zip archive" * 40)
    with pytest.raises(DataError, match=r"archive .*val2017.zip is not a zip file or is damaged"):
        build_dataset(_pan(coco), "val", "panoptic")


def test_damaged_zip_member_names_the_member(coco):
    names = sorted(p.name for p in (coco / "val2017").iterdir())
    with zipfile.ZipFile(coco / "val2017.zip", "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.write(coco / "val2017" / n, f"val2017/{n}")
    shutil.rmtree(coco / "val2017")
    with zipfile.ZipFile(coco / "val2017.zip") as z:
        info = z.getinfo(f"val2017/{names[0]}")
    data = bytearray((coco / "val2017.zip").read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 40: start + 60] = bytes(20)  # overwrite bytes inside the member: its CRC no longer fits
    (coco / "val2017.zip").write_bytes(bytes(data))
    ds = build_dataset(_pan(coco), "val", "panoptic")
    i = [im["file_name"] for im, _ in ds.entries].index(names[0])
    with pytest.raises(DataError, match=rf"zip member .*val2017.zip:val2017/{names[0]} is damaged"):
        ds[i]


# ------------------------------------------------------------------------------------- annotation JSON


def test_annotation_json_that_is_a_list(coco):
    _edit(coco / PAN_JSON, lambda js: js["annotations"])
    with pytest.raises(DataError, match=r"panoptic_val2017.json holds a JSON list; expected an object"):
        build_dataset(_pan(coco), "val", "panoptic")


def test_annotation_without_segments_info(coco):
    def edit(js):
        del js["annotations"][1]["segments_info"]
    _edit(coco / PAN_JSON, edit)
    with pytest.raises(DataError, match=r"annotation 1 in .*panoptic_val2017.json lacks 'segments_info'"):
        build_dataset(_pan(coco), "val", "panoptic")


def test_empty_category_list(coco):
    _edit(coco / PAN_JSON, lambda js: js.update(categories=[]))
    with pytest.raises(DataError, match=r"panoptic_val2017.json lists no categories"):
        build_dataset(_pan(coco), "val", "panoptic")
    _edit(coco / "annotations" / "instances_val2017.json", lambda js: js.update(categories=[]))
    with pytest.raises(DataError, match=r"instances_val2017.json lists no categories"):
        build_dataset(DataConfig(dataset="coco_instance", root=str(coco)), "val", "instance")


def test_duplicate_category_id(coco):
    # today: trains with a phantom class (num_classes one too many, one id mapped twice)
    _edit(coco / PAN_JSON, lambda js: js["categories"].append(dict(js["categories"][0], name="phantom")))
    with pytest.raises(DataError, match=r"lists category id \d+ twice .*'phantom'"):
        build_dataset(_pan(coco), "val", "panoptic")


def test_malformed_rle_in_instance_ground_truth(coco):
    def edit(js):
        a = js["annotations"][0]
        im = next(i for i in js["images"] if i["id"] == a["image_id"])
        a["segmentation"] = {"size": [im["height"], im["width"]], "counts": "0o"}  # cut mid-value
    _edit(coco / "annotations" / "instances_val2017.json", edit)
    with pytest.raises(DataError, match=r"annotation \d+ \(image id \d+.*'segmentation' is malformed"):
        build_dataset(DataConfig(dataset="coco_instance", root=str(coco)), "val", "instance")


def test_worker_error_is_the_workers_one_line_message(coco):
    ds = build_dataset(_pan(coco), "val", "panoptic")
    name = ds.entries[0][0]["file_name"]
    (coco / "val2017" / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=lambda b: b)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert f"cannot decode image {coco / 'val2017' / name}" in msg and "(in DataLoader worker 0)" in msg
    assert "Traceback" in e.value.worker_traceback


# ------------------------------------------------------------------------------------------ checkpoints


def _state(tmp_path) -> Path:
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.arange(5000.0)}, "step": 7}, path)
    return path


@pytest.mark.parametrize("fault", ["truncated", "random", "empty", "flipped"])
def test_damaged_torch_checkpoint(tmp_path, fault):
    path = _state(tmp_path)
    data = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "random":
        path.write_bytes(os.urandom(4096))
    elif fault == "empty":
        path.write_bytes(b"")
    else:  # same length, bytes inside the tensor data overwritten
        i = data.index(torch.arange(5000.0)[100:104].numpy().tobytes())
        path.write_bytes(data[:i] + bytes(64) + data[i + 64:])
    for read in (read_torch_file, read_weights):
        with pytest.raises(UserError) as e:
            read(path)
        msg = str(e.value)
        assert f"checkpoint {path} is damaged" in msg and "\n" not in msg
        assert "weights_only" not in msg


class _Obj:
    pass


def test_checkpoint_with_code_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(3), "obj": _Obj()}, path)
    with pytest.raises(UserError, match=r"holds Python objects besides tensors") as e:
        read_torch_file(path)
    assert "weights_only=False" not in str(e.value) and "False" not in str(e.value)
    assert read_torch_file(_state(tmp_path))["step"] == 7  # a sound file reads


def test_corrupt_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(100)}, str(path))
    assert read_weights(path)["w"].shape == (100,)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(UserError, match=rf"checkpoint {path} is damaged"):
        read_weights(path)


# ---------------------------------------------------------------------------------------- full disk


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``limit`` bytes were written (a disk filling up)."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, b):
        if len(b) > self.left:
            self.f.write(bytes(b)[: self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("kind", ["json", "torch"])
def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, kind):
    path = tmp_path / ("status.json" if kind == "json" else "last.pt")
    big = {"w": torch.zeros(100_000)}
    if kind == "json":
        atomic_write_json(path, {"state": "running"})
    else:
        atomic_torch_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_open = open
    monkeypatch.setattr(study.io, "open", lambda p, mode="r", *a, **k: _FullDisk(real_open(p, mode, *a, **k), 1000)
                        if "w" in mode else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(UserError) as e:
        if kind == "json":
            atomic_write_text(path, "x" * 5000)
        else:
            atomic_torch_save(big, path)
    msg = str(e.value)
    need = 5000 if kind == "json" else 400_000
    assert f"no space left to write {path}" in msg and f"({need} bytes)" in msg and "previous file is intact" in msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the temporary file is gone


# ---------------------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_text(tmp_path / "b.txt", "x")
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "c.pt")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    for name in ("a.json", "b.txt", "c.pt", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
