"""Data pipeline: CIFAR reader, checksums, augmentation, loaders, subsets (CPU only)."""
import hashlib
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from contsup_fast import data as D


# ---------------------------------------------------------------------------------------------
# synthetic official-layout folders (no shared data needed)


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(root, per_batch=7, test=5, seed=0):
    """Tiny cifar-10-batches-py/ in the official layout; returns (train NHWC, labels, test...)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    xs, ys = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        _write_pickle(os.path.join(folder, f"data_batch_{b}"),
                      {b"data": x.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
                       b"labels": y.tolist(), b"batch_label": b"x"})
        xs.append(x)
        ys.append(y)
    xt = rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8)
    yt = rng.integers(0, 10, test)
    _write_pickle(os.path.join(folder, "test_batch"),
                  {b"data": xt.transpose(0, 3, 1, 2).reshape(test, 3072), b"labels": yt.tolist()})
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def _fake_md5(folder, names):
    out = {}
    for n in names:
        with open(os.path.join(folder, n), "rb") as f:
            out[n] = hashlib.md5(f.read()).hexdigest()
    return out


def test_reader_synthetic_layout(tmp_path):
    x, y, xt, yt = write_fake_cifar10(str(tmp_path))
    with pytest.warns(UserWarning, match="differs from the official release"):
        a, b = D.load_cifar(tmp_path, "cifar10", train=True)
    assert a.dtype == np.uint8 and a.shape == (35, 32, 32, 3)
    assert b.dtype == np.int64
    np.testing.assert_array_equal(a, x)  # R|G|B planes -> NHWC exactly
    np.testing.assert_array_equal(b, y)
    # the batches folder itself is accepted too
    with pytest.warns(UserWarning):
        a2, b2 = D.load_cifar(tmp_path / "cifar-10-batches-py", "cifar10", train=False)
    np.testing.assert_array_equal(a2, xt)
    np.testing.assert_array_equal(b2, yt)


def test_reader_no_warning_when_checksums_match(tmp_path, monkeypatch):
    write_fake_cifar10(str(tmp_path))
    folder = str(tmp_path / "cifar-10-batches-py")
    sums = _fake_md5(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    monkeypatch.setattr(D.cifar, "_official_md5", lambda name: sums)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.load_cifar(tmp_path, "cifar10", train=True)
        D.load_cifar(tmp_path, "cifar10", train=False)


def test_official_checksums_come_from_torchvision():
    pytest.importorskip("torchvision")
    assert D.cifar._official_md5("cifar10") == D.CIFAR10_MD5
    assert D.cifar._official_md5("cifar100") == D.CIFAR100_MD5


def test_reader_cifar100_layout(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 99, 5, 42, 7, 63])
    for name in ("train", "test"):
        _write_pickle(folder / name, {b"data": x.transpose(0, 3, 1, 2).reshape(6, 3072),
                                      b"fine_labels": y.tolist(), b"coarse_labels": [0] * 6})
    with pytest.warns(UserWarning, match="cifar100"):
        a, b = D.load_dataset(tmp_path, "cifar100", train=True)
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, y)
    assert D.num_classes("cifar100") == 100


def test_missing_data_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.load_cifar(tmp_path, "cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        D.load_cifar(tmp_path, "cifar100")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset(tmp_path, "no_such_dataset")


def test_torchvision_fallback_missing(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="STL10"):
        D.load_dataset(tmp_path, "stl10")


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTSUP_DATA_CACHE", str(tmp_path))
    assert D.default_data_dir("CIFAR-10") == os.path.join(str(tmp_path), "cifar10")
    with pytest.raises(FileNotFoundError, match="default cache"):
        D.find_data_dir("cifar10")
    write_fake_cifar10(str(tmp_path / "cifar10"))
    assert D.find_data_dir("cifar10") == str(tmp_path / "cifar10")
    assert D.find_data_dir("cifar10", "/x/y") == "/x/y"


# ---------------------------------------------------------------------------------------------
# the shared (JPEG) copy of CIFAR-10


def test_shared_cifar10(cifar10_root):
    with pytest.warns(UserWarning, match="official"):
        x, y = D.load_cifar(cifar10_root, "cifar10", train=True)
    assert x.shape == (50000, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.min() == 0 and y.max() == 9
    assert np.bincount(y).tolist() == [5000] * 10
    with pytest.warns(UserWarning, match="test_batch"):
        xt, yt = D.load_cifar(cifar10_root, "cifar10", train=False)
    assert xt.shape == (10000, 32, 32, 3) and np.bincount(yt).tolist() == [1000] * 10
    # the normalisation constants fit the data (JPEG copy: within 0.01)
    mean, std = D.dataset_stats("cifar10")
    xf = x[::10].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(xf.mean(0), mean, atol=0.01)
    np.testing.assert_allclose(xf.std(0), std, atol=0.01)


# ---------------------------------------------------------------------------------------------
# augmentation and loaders


def _reference_augment(x, dy, dx, flip, p=4):
    pad = torch.nn.functional.pad(x, (p, p, p, p))
    out = []
    for i in range(len(x)):
        r = pad[i, :, dy[i]:dy[i] + x.shape[2], dx[i]:dx[i] + x.shape[3]]
        out.append(r.flip(-1) if flip[i] else r)
    return torch.stack(out)


def test_augment_batch_matches_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    plan = D.epoch_plan(16, seed=3, epoch=0)
    out = D.augment_batch(x, plan["dy"], plan["dx"], plan["flip"])
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, _reference_augment(x, plan["dy"], plan["dx"], plan["flip"]))
    assert plan["flip"].any() and not plan["flip"].all()
    assert int(plan["dy"].min()) >= 0 and int(plan["dy"].max()) <= 8
    # centre offsets and no flip: identity
    z = torch.full((16,), 4)
    assert torch.equal(D.augment_batch(x, z, z, torch.zeros(16, dtype=torch.bool)), x)


def _images(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64))


def _collect(loader, epoch=0, start=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader.iter_from(start)]


def test_loader_shapes_and_determinism():
    x, y = _images()
    mean, std = D.dataset_stats("cifar10")
    mk = lambda seed, **kw: D.CPUAugmentLoader(x, y, 64, mean, std, seed=seed,  # noqa: E731
                                               num_workers=0, **kw)
    a = _collect(mk(1))
    assert len(a) == len(mk(1)) == 5  # 4 x 64 + 44
    xb, yb = a[0]
    assert xb.dtype == torch.float32 and xb.shape == (64, 3, 32, 32)
    assert yb.dtype == torch.int64 and yb.shape == (64,)
    assert a[-1][0].shape[0] == 300 - 256
    assert sorted(torch.cat([b[1] for b in a]).tolist()) == sorted(y.tolist())  # a permutation
    b = _collect(mk(1))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    c = _collect(mk(2))
    assert not torch.equal(a[0][0], c[0][0])
    d = _collect(mk(1), epoch=1)
    assert not torch.equal(a[0][0], d[0][0])
    # mid-epoch start = tail of the full epoch (exact resume)
    tail = _collect(mk(1), start=3)
    assert len(tail) == 2 and torch.equal(tail[0][0], a[3][0]) and torch.equal(tail[1][1], a[4][1])
    # channels_last
    cl = _collect(mk(1, channels_last=True))[0][0]
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, xb)


def test_normalisation():
    x = np.full((4, 32, 32, 3), 255, dtype=np.uint8)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    out = D.EvalLoader(x, np.zeros(4, dtype=np.int64), 4, mean, std)
    xb, _ = next(iter(out))
    torch.testing.assert_close(xb[:, :, 0, 0], torch.tensor([[1.0, 3.0, 1.0]] * 4))


def test_gpu_loader_equals_cpu_loader():
    # GPUAugmentLoader is device-generic; on the CPU it must give the CPU loader's batches
    x, y = _images(130)
    mean, std = D.dataset_stats("cifar10")
    g = D.GPUAugmentLoader(x, y, 32, mean, std, device="cpu", seed=5)
    c = D.CPUAugmentLoader(x, y, 32, mean, std, seed=5, num_workers=0)
    # 130 = 4 x 32 + 2
    assert len(g) == len(c) == 5
    for (xg, yg), (xc, yc) in zip(_collect(g, 2), _collect(c, 2)):
        assert torch.equal(xg, xc) and torch.equal(yg, yc)


def test_last_batch_of_one_is_dropped():
    x, y = _images(65)
    L = D.CPUAugmentLoader(x, y, 32, *D.dataset_stats("cifar10"), num_workers=0)
    assert len(L) == 2 and sum(len(b[1]) for b in _collect(L)) == 64


def test_worker_processes_give_identical_batches():
    x, y = _images(200)
    mean, std = D.dataset_stats("cifar10")
    a = _collect(D.CPUAugmentLoader(x, y, 50, mean, std, seed=7, num_workers=0), 1)
    b = _collect(D.CPUAugmentLoader(x, y, 50, mean, std, seed=7, num_workers=2), 1)
    assert len(a) == len(b) == 4
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_make_train_loader_picks_cpu_loader():
    x, y = _images(10)
    L = D.make_train_loader(x, y, 4, *D.dataset_stats("cifar10"), "cpu", num_workers=0)
    assert isinstance(L, D.CPUAugmentLoader) and L.padding == 4


def test_subset_is_balanced_fixed_and_valid():
    y = np.repeat(np.arange(10), 100)
    np.random.default_rng(0).shuffle(y)
    idx = D.subset_indices(y, 250, seed=0)
    assert len(idx) == 250 and len(set(idx.tolist())) == 250
    assert np.all(np.diff(idx) > 0) and idx.max() < 1000
    counts = np.bincount(y[idx], minlength=10)
    assert counts.min() == 25 and counts.max() == 25
    assert np.array_equal(idx, D.subset_indices(y, 250, seed=0))
    assert not np.array_equal(idx, D.subset_indices(y, 250, seed=1))
    counts = np.bincount(y[D.subset_indices(y, 253)], minlength=10)
    assert counts.min() == 25 and counts.max() == 26
    with pytest.raises(ValueError):
        D.subset_indices(y, 1001)
    with pytest.raises(ValueError):
        D.subset_indices(y, 0)
