"""apctl.data: CIFAR-10 (tarball and folder), EDM dataset_tool zips/folders, plain folders, digits.

Every fixture is written in the real on-disk format inside tmp_path: CIFAR batches are protocol-2
pickles of dicts with bytes keys, uint8 numpy data and list labels, packed under
cifar-10-batches-py/ in a .tar.gz; EDM datasets are PNGs at 00000/img00000000.png plus
dataset.json, in a ZIP_STORED zip or a folder.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from apctl.data import ImageData, load_image_data
from apctl.errors import ApctlError


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# =============================================================================== CIFAR-10

N_PER_BATCH = 20
BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def make_batch(seed: int, n: int = N_PER_BATCH) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    # Image 0 gets known planes: R = 10, G = 20, B = 30 everywhere, except R at (row 1, col 2) = 200.
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30
    data[0, 1 * 32 + 2] = 200
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {
        b"batch_label": f"training batch {seed} of 5".encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def write_cifar_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in [("batches.meta", pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)),
                              ("readme.html", b"<html></html>"), *members.items()]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture()
def cifar(tmp_path):
    batches = {name: make_batch(seed) for seed, name in enumerate(BATCH_NAMES, start=1)}
    members = {name: pickle.dumps(b, protocol=2) for name, b in batches.items()}
    tarball = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", members)
    return tarball, batches, members


def expected(batches, names):
    images = np.concatenate([batches[n][b"data"].reshape(-1, 3, 32, 32) for n in names])
    labels = np.concatenate([np.asarray(batches[n][b"labels"]) for n in names])
    return images, labels


def test_cifar_tarball_pixels_and_labels(cifar):
    tarball, batches, _ = cifar
    data = load_image_data("cifar10", str(tarball))
    images, labels = expected(batches, BATCH_NAMES[:5])
    assert data.images.shape == (5 * N_PER_BATCH, 3, 32, 32) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == np.int64 and data.label_dim == 10 and data.name == "cifar10"
    # R, G, B planes in that order; each plane row-major.
    first = data.images[0]
    assert first[0, 1, 2] == 200 and first[0, 0, 0] == 10 and first[0, 1, 3] == 10
    assert (first[1] == 20).all() and (first[2] == 30).all()
    # batch order: image 20 is the first image of data_batch_2
    assert data.images[N_PER_BATCH, 0, 1, 2] == 200


def test_cifar_splits(cifar):
    tarball, batches, _ = cifar
    test = load_image_data("cifar10", str(tarball), split="test")
    np.testing.assert_array_equal(test.images, expected(batches, ["test_batch"])[0])
    every = load_image_data("cifar10", str(tarball), split="all", use_labels=False)
    assert len(every) == 6 * N_PER_BATCH and every.labels is None and every.label_dim == 0


def test_cifar_train_split_does_not_need_test_batch(tmp_path, cifar):
    _, batches, members = cifar
    members = {k: v for k, v in members.items() if k != "test_batch"}
    tarball = write_cifar_tar(tmp_path / "other.tar.gz", members)
    assert len(load_image_data("cifar10", str(tarball))) == 5 * N_PER_BATCH
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("cifar10", str(tarball), split="test")
    assert "test_batch" in one_line_error(excinfo)


def test_cifar_extracted_folder(tmp_path, cifar):
    tarball, batches, _ = cifar
    root = tmp_path / "extracted"
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="data")
    images, labels = expected(batches, BATCH_NAMES[:5])
    for path in (root / "cifar-10-batches-py", root):  # the batches folder, or a folder containing it
        data = load_image_data("cifar10", str(path))
        np.testing.assert_array_equal(data.images, images)
        np.testing.assert_array_equal(data.labels, labels)


def test_cifar_python2_style_pickle(tmp_path, cifar):
    """The real batches come from Python 2: str keys (BINSTRING) and numpy.core.multiarray."""

    class Py2Pickler(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_bytes(self, obj):
            if len(obj) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
            self.memoize(obj)

        dispatch[bytes] = save_bytes

    _, batches, _ = cifar
    members = {}
    for name, batch in batches.items():
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(batch)
        raw = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
        members[name] = raw
    tarball = write_cifar_tar(tmp_path / "py2.tar.gz", members)
    data = load_image_data("cifar10", str(tarball))
    images, labels = expected(batches, BATCH_NAMES[:5])
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)


def test_cifar_truncated_tarball(tmp_path, cifar):
    tarball, _, _ = cifar
    cut = tmp_path / "cut" / "cifar-10-python.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("cifar10", str(cut))
    message = one_line_error(excinfo)
    assert str(cut) in message and "truncated or corrupt" in message and "re-download" in message


def test_cifar_not_a_tarball(tmp_path):
    bogus = tmp_path / "cifar-10-python.tar.gz"
    bogus.write_bytes(b"this is not gzip data at all" * 10)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("cifar10", str(bogus))
    assert "truncated or corrupt" in one_line_error(excinfo)


class Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_hostile_global_refused(tmp_path, cifar):
    _, _, members = cifar
    marker = tmp_path / "pwned"
    batch = make_batch(3)
    batch[b"data"] = Hostile(marker)
    members = dict(members, data_batch_3=pickle.dumps(batch, protocol=2))
    tarball = write_cifar_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("cifar10", str(tarball))
    message = one_line_error(excinfo)
    assert "system" in message and "data_batch_3" in message and "refused" in message
    assert not marker.exists()


@pytest.mark.parametrize("corrupt, needle", [
    (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "20 images but 19 labels"),
    (lambda b: b.update({b"labels": [10] + b[b"labels"][1:]}), "outside 0..9"),
    (lambda b: b.update({b"data": b[b"data"][:, :3000]}), "expected uint8 (n, 3072)"),
    (lambda b: b.pop(b"labels"), "no 'labels' entry"),
])
def test_cifar_malformed_batch(tmp_path, cifar, corrupt, needle):
    _, _, members = cifar
    batch = make_batch(2)
    corrupt(batch)
    members = dict(members, data_batch_2=pickle.dumps(batch, protocol=2))
    tarball = write_cifar_tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("cifar10", str(tarball))
    message = one_line_error(excinfo)
    assert needle in message and "data_batch_2" in message


def test_cifar_truncated_batch_pickle(tmp_path, cifar):
    _, _, members = cifar
    members = dict(members, data_batch_4=members["data_batch_4"][:5000])
    tarball = write_cifar_tar(tmp_path / "short.tar.gz", members)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("cifar10", str(tarball))
    message = one_line_error(excinfo)
    assert "data_batch_4" in message and ("truncated" in message or "not a readable pickle" in message)


def test_cifar_missing_batch_member(tmp_path, cifar):
    _, _, members = cifar
    members = {k: v for k, v in members.items() if k != "data_batch_5"}
    tarball = write_cifar_tar(tmp_path / "partial.tar.gz", members)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("cifar10", str(tarball))
    assert "data_batch_5" in one_line_error(excinfo)


def test_cifar_missing_names_places_and_download(tmp_path, monkeypatch):
    monkeypatch.setenv("APCTL_DATA", str(tmp_path / "env_data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for path in (None, str(tmp_path / "nowhere" / "cifar-10-python.tar.gz")):
        with pytest.raises(ApctlError) as excinfo:
            load_image_data("cifar10", path)
        message = one_line_error(excinfo)
        assert "cifar-10-python.tar.gz" in message and "internet" in message
        assert "cs.toronto.edu/~kriz/cifar.html" in message
        assert "APCTL_DATA" in message or path in message
        assert ".cache/apctl/data" in message or path in message
        if path is not None:
            assert path in message


def test_cifar_found_through_apctl_data(tmp_path, monkeypatch, cifar):
    tarball, batches, _ = cifar
    monkeypatch.setenv("APCTL_DATA", str(tarball.parent))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    np.testing.assert_array_equal(load_image_data("cifar10", None).images, expected(batches, BATCH_NAMES[:5])[0])
    # a relative name that is not in the working directory is looked for there too
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path / "home")
    assert len(load_image_data("cifar10", "cifar-10-python.tar.gz")) == 5 * N_PER_BATCH


# =============================================================================== EDM datasets

def png_bytes(img: np.ndarray) -> bytes:
    mode = "L" if img.ndim == 2 else "RGB"
    buf = io.BytesIO()
    PIL.Image.fromarray(img, mode).save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def write_edm(dest: Path, images: list[np.ndarray], labels: list[int] | None, *, per_folder: int = 1000,
              extra: dict[str, bytes] | None = None) -> Path:
    """Like dataset_tool.py: '{idx[:5]}/img{idx}.png' uncompressed PNGs and dataset.json."""
    files: dict[str, bytes] = {}
    entries = []
    for idx, img in enumerate(images):
        idx_str = f"{idx:08d}"
        name = f"{idx_str[:5]}/img{idx_str}.png" if per_folder == 1000 else f"{idx // per_folder:05d}/img{idx_str}.png"
        files[name] = png_bytes(img)
        entries.append([name, labels[idx]] if labels is not None else None)
    files["dataset.json"] = json.dumps({"labels": entries if labels is not None else None}).encode()
    files.update(extra or {})
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
    return dest


def random_images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels == 3 else (size, size)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_edm_dataset_images_and_labels(tmp_path, form):
    images = random_images(12)
    labels = [3, 1, 4, 1, 5, 0, 2, 6, 5, 3, 5, 0]
    dest = tmp_path / ("cifar10-8x8.zip" if form == "zip" else "cifar10-8x8")
    write_edm(dest, images, labels, per_folder=5)  # several sub-folders, as with > 1000 images
    data = load_image_data("edm", str(dest))
    assert isinstance(data, ImageData) and data.name == "cifar10-8x8"
    np.testing.assert_array_equal(data.images, np.stack(images).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(data.labels, labels)
    assert data.label_dim == 7 and data.image_shape == (3, 8, 8)
    assert load_image_data("edm", str(dest), use_labels=False).label_dim == 0


def test_edm_labels_null_is_unconditional(tmp_path):
    dest = write_edm(tmp_path / "uncond.zip", random_images(4, channels=1), None)
    data = load_image_data("edm", str(dest))
    assert data.labels is None and data.label_dim == 0 and data.one_hot([0, 1]) is None
    assert data.images.shape == (4, 1, 8, 8)


def test_plain_image_folder(tmp_path):
    root = tmp_path / "pics"
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    imgs = random_images(3, size=16)
    PIL.Image.fromarray(imgs[0]).save(root / "cats" / "a.png")
    PIL.Image.fromarray(imgs[1]).save(root / "cats" / "deep" / "b.jpg", quality=95)
    PIL.Image.fromarray(imgs[2]).convert("RGBA").save(root / "dogs" / "c.png")
    PIL.Image.fromarray(imgs[2][:, :, 0]).save(root / "dogs" / "d.png")  # grayscale → repeated to RGB
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    data = load_image_data("folder", str(root))
    assert data.images.shape == (4, 3, 16, 16) and data.label_dim == 0 and data.labels is None
    np.testing.assert_array_equal(data.images[0], imgs[0].transpose(2, 0, 1))  # cats/a.png sorts first
    np.testing.assert_array_equal(data.images[2], imgs[2].transpose(2, 0, 1))  # alpha dropped
    assert (data.images[3] == imgs[2][None, :, :, 0]).all()


def test_edm_mixed_sizes(tmp_path):
    images = random_images(3, size=8) + random_images(1, size=16)
    dest = write_edm(tmp_path / "mixed.zip", images, None)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", str(dest))
    message = one_line_error(excinfo)
    assert "00000/img00000003.png" in message and "16x16" in message and "one size" in message
    assert str(dest) in message


def test_edm_not_square_or_power_of_two(tmp_path):
    dest = write_edm(tmp_path / "odd.zip", [np.zeros((12, 12, 3), np.uint8)], None)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", str(dest))
    assert "power-of-two" in one_line_error(excinfo) and "--resolution=8x8" in str(excinfo.value)


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_edm_corrupt_png(tmp_path, form):
    images = random_images(3)
    broken = png_bytes(images[1])[:60]
    dest = tmp_path / ("broken.zip" if form == "zip" else "broken")
    write_edm(dest, images, [0, 1, 2], extra={"00000/img00000001.png": broken})
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", str(dest))
    message = one_line_error(excinfo)
    assert "00000/img00000001.png" in message and "corrupt" in message


def test_edm_missing_label_and_bad_json(tmp_path):
    images = random_images(3)
    dest = write_edm(tmp_path / "partial", images, [0, 1, 2])
    (dest / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 0]]}))
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", str(dest))
    assert "no label for 00000/img00000001.png" in one_line_error(excinfo)
    (dest / "dataset.json").write_text("{not json")
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", str(dest))
    assert "not valid JSON" in one_line_error(excinfo)
    (dest / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", [0.5, 0.5]]]}))
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", str(dest))
    assert "only integer class labels" in one_line_error(excinfo)


def test_edm_relative_path_found_through_apctl_data(tmp_path, monkeypatch):
    (tmp_path / "store").mkdir()
    write_edm(tmp_path / "store" / "tiny.zip", random_images(2), [1, 0])
    monkeypatch.setenv("APCTL_DATA", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    data = load_image_data("edm", "tiny.zip")
    assert data.source == str(tmp_path / "store" / "tiny.zip") and data.label_dim == 2


def test_edm_missing_empty_and_not_a_zip(tmp_path):
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", str(tmp_path / "nope.zip"))
    assert "nope.zip" in one_line_error(excinfo) and "dataset_tool.py" in str(excinfo.value)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", None)
    assert "no path given" in one_line_error(excinfo)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("folder", str(tmp_path / "empty"))
    assert "no image files" in one_line_error(excinfo)
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("edm", str(tmp_path / "fake.zip"))
    assert "readable zip" in one_line_error(excinfo)


# =============================================================================== digits

def test_digits_native():
    data = load_image_data("digits", None)
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == np.uint8
    assert data.images.min() == 0 and data.images.max() == 255
    assert data.labels.shape == (1797,) and set(np.unique(data.labels)) == set(range(10))
    assert data.label_dim == 10
    from sklearn.datasets import load_digits

    raw = load_digits().data.reshape(-1, 8, 8)
    np.testing.assert_array_equal(data.images[:, 0], np.rint(raw * 255 / 16).astype(np.uint8))


def test_digits_upsampled():
    native = load_image_data("digits", None).images
    for res in (16, 32):
        data = load_image_data("digits", None, resolution=res)
        assert data.images.shape == (1797, 1, res, res) and data.images.dtype == np.uint8
        assert data.image_shape == (1, res, res)
    nearest = load_image_data("digits", None, resolution=16, upsample="nearest").images
    np.testing.assert_array_equal(nearest, native.repeat(2, axis=2).repeat(2, axis=3))
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("digits", None, resolution=12)
    assert "8, 16, 32" in one_line_error(excinfo)


# =============================================================================== ImageData / dispatch

def small_data(n: int = 10, labelled: bool = True) -> ImageData:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 3, 4, 4), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    labels = np.arange(n, dtype=np.int64) % 3 if labelled else None
    return ImageData(images=images, labels=labels, label_dim=3 if labelled else 0, name="t", source="memory")


def test_to_tensor_and_one_hot():
    data = small_data()
    x = data.to_tensor([0, 1, 2])
    assert x.dtype == torch.float32 and x.shape == (3, 3, 4, 4)
    assert (x[0] == -1).all() and (x[1] == 1).all()
    assert torch.allclose(x[2], torch.from_numpy(data.images[2]).float() / 127.5 - 1)
    assert data.to_tensor(None).shape == (10, 3, 4, 4) and data.to_tensor(torch.tensor([4])).shape == (1, 3, 4, 4)
    y = data.one_hot(np.array([0, 4, 5]))
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]))


def test_sample_batch_deterministic_and_xflip():
    data = small_data(50)
    a = data.sample_batch(torch.Generator().manual_seed(7), 64, xflip=True)
    b = data.sample_batch(torch.Generator().manual_seed(7), 64, xflip=True)
    c = data.sample_batch(torch.Generator().manual_seed(8), 64, xflip=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    plain, labels = data.sample_batch(torch.Generator().manual_seed(7), 64, xflip=False)
    assert torch.equal(labels, a[1])  # same indices whether or not xflip is on
    flipped = torch.tensor([torch.equal(f, p.flip(-1)) for f, p in zip(a[0], plain)])
    same = torch.tensor([torch.equal(f, p) for f, p in zip(a[0], plain)])
    assert (flipped | same).all() and flipped.any() and same.any()
    unlabelled = small_data(5, labelled=False).sample_batch(torch.Generator().manual_seed(0), 4, xflip=False)
    assert unlabelled[1] is None and unlabelled[0].shape == (4, 3, 4, 4)


def test_dispatch_errors():
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("imagenet", None)
    assert "cifar10, edm, folder, digits" in one_line_error(excinfo)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("digits", None, resolutoin=16)
    assert "resolutoin" in one_line_error(excinfo)
    with pytest.raises(ApctlError) as excinfo:
        load_image_data("cifar10", None, split="validation")
    assert "validation" in one_line_error(excinfo)
