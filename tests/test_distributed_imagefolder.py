"""--dataset imagefolder: layout errors in one line, per-rank sharding, exact resume, a CLI run."""
import numpy as np
import pytest
import torch

from contsup_fast import data as D
from contsup_fast import train as T


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    """train/ 3 classes x 5 images, val/ 3 classes x 2 images; 24x20 PNGs coloured by class."""
    from PIL import Image
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 20, (24, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_layout_errors_name_the_path_and_layout(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    for root, missing in ((tmp_path / "nope", "nope"), (tmp_path, "train")):
        with pytest.raises(SystemExit) as exc:
            T.main(["--dataset", "imagefolder", "--data-dir", str(root), "--epochs", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, err
        assert missing in err[0] and "DIR/train/<class>/<image>" in err[0]
    with pytest.raises(SystemExit):
        T.main(["--data-dir", "/nonexistent", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["contsup-train: error: --data-dir '/nonexistent' does not exist"]


def test_loaders_shard_over_ranks_and_resume_exactly(tiny_imagefolder):
    common = dict(seed=3, num_workers=0, size=16)
    train, val, classes = D.imagefolder_loaders(tiny_imagefolder, 4, 4, **common)
    assert classes == ["class0", "class1", "class2"] and len(train) == 4 and len(val) == 2
    train.set_epoch(1)
    full = list(train)
    assert full[0][0].shape == (4, 3, 16, 16) and full[0][0].dtype == torch.float32
    tail = list(train.iter_from(1))  # mid-epoch resume: identical images and augmentation
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[1:], tail))
    train.set_epoch(2)
    assert not torch.equal(next(iter(train))[0], full[0][0])
    # two ranks: disjoint training shares of batch 4 // 2, every validation image exactly once
    seen_val = []
    for rank in range(2):
        tr, va, _ = D.imagefolder_loaders(tiny_imagefolder, 4, 4, rank=rank, world_size=2, **common)
        tr.set_epoch(0)
        assert tr.sharded and tr.batch_size == 2 and len(tr) == 3
        seen_val += list(va.dataset.indices)
    assert sorted(seen_val) == list(range(6))
    idx = [set(D.imagefolder_loaders(tiny_imagefolder, 4, 4, rank=r, world_size=2, **common)[0].sampler)
           for r in range(2)]
    assert not idx[0] & idx[1]


def test_imagefolder_cli_run(tiny_imagefolder, tmp_path):
    res = T.main(["--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--image-size", "16",
                  "--model", "resnet20", "--K", "2", "--context", "R1E", "--batch-size", "5",
                  "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--no-progress",
                  "--out", str(tmp_path / "run")])
    assert 0 <= res["final_test_acc"] <= 100 and res["K"] == 2
