"""sparsekern.data: embedded digits, CIFAR-10 from (fake) pickles, specs, synthetic inputs, loaders."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from sparsekern import data
from sparsekern.data import CIFAR10_MEAN, CIFAR10_STD
from sparsekern.training.data import make_loader


@pytest.fixture(scope="module")
def raw_digits():
    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def test_digits_shapes_and_dtypes():
    train, test = data.digits("train"), data.digits("test")
    x, y = train.tensors
    assert x.shape == (1438, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (1438,) and y.dtype == torch.int64
    assert test.tensors[0].shape == (359, 3, 32, 32)
    assert len(train) + len(test) == 1797
    assert set(y.tolist()) == set(range(10)) == set(test.tensors[1].tolist())
    # channels are replicas of one grey image
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert data.digits(image_size=16, channels=1).tensors[0].shape == (1438, 1, 16, 16)


def test_digits_is_deterministic_and_seeded():
    a, b = data.digits("test"), data.digits("test")
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    other = data.digits("test", seed=1)
    assert len(other) == len(a)
    assert not torch.equal(other.tensors[0], a.tensors[0])


def test_digits_split_is_disjoint_stratified_and_exact(raw_digits):
    pixels, labels = raw_digits
    _, _, train_idx, test_idx = data._digits_split_indices(0)
    # disjoint, and together the whole set
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(1797))
    assert len(test_idx) == 359
    # at 8x8 (no resampling), undoing the train-set normalisation gives exactly load_digits / 16
    train = data.digits("train", image_size=8, channels=1)
    test = data.digits("test", image_size=8, channels=1)
    ref = torch.from_numpy(pixels)
    mean, std = ref[train_idx].mean(), ref[train_idx].std()
    torch.testing.assert_close(train.tensors[0][:, 0] * std + mean, ref[train_idx], atol=1e-5, rtol=0)
    torch.testing.assert_close(test.tensors[0][:, 0] * std + mean, ref[test_idx], atol=1e-5, rtol=0)
    assert train.tensors[1].tolist() == labels[train_idx].tolist()
    assert test.tensors[1].tolist() == labels[test_idx].tolist()
    # stratified: every class gives round(20%) of its samples to test
    for cls in range(10):
        n = int((labels == cls).sum())
        assert int((test.tensors[1] == cls).sum()) == round(0.2 * n)


def test_digits_normalised_with_train_statistics():
    x_train = data.digits("train").tensors[0]
    x_test = data.digits("test").tensors[0]
    assert abs(x_train.mean().item()) < 1e-4
    assert abs(x_train.std().item() - 1.0) < 1e-4
    # the test split uses the train statistics, so its own are close but not exactly 0 / 1
    assert abs(x_test.mean().item()) < 0.1 and x_test.mean().item() != pytest.approx(0.0, abs=1e-6)
    # background pixels (0 in the raw image) map to the same value in both splits
    assert x_train.min().item() == pytest.approx(x_test.min().item(), abs=1e-6)


def test_digits_bad_arguments():
    with pytest.raises(ValueError):
        data.digits("val")
    with pytest.raises(ValueError):
        data.digits(channels=0)


def _write_fake_cifar(folder, n_train_per_batch=4, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train_per_batch
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, size=n).tolist(),
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
        written[name] = batch
    return written


def _expected_image(row: np.ndarray) -> torch.Tensor:
    img = torch.from_numpy(row.astype(np.float32)).view(3, 32, 32) / 255.0
    return (img - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(3, 1, 1)


def test_cifar10_loads_fake_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_fake_cifar(folder)
    train = data.cifar10(folder, "train")
    test = data.cifar10(folder, "test")
    x, y = train.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert test.tensors[0].shape == (3, 3, 32, 32)
    # batches are concatenated in order 1..5; labels follow
    expected_labels = sum((written[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert y.tolist() == expected_labels
    assert test.tensors[1].tolist() == written["test_batch"][b"labels"]
    # channel-major layout: bytes 0..1023 are R, 1024..2047 G, 2048..3071 B, each row-major 32x32
    row = written["data_batch_2"][b"data"][1]
    torch.testing.assert_close(x[4 + 1], _expected_image(row))
    assert x[5, 1, 0, 2].item() == pytest.approx((row[1024 + 2] / 255.0 - CIFAR10_MEAN[1]) / CIFAR10_STD[1], abs=1e-5)
    assert x[5, 2, 31, 31].item() == pytest.approx((row[3071] / 255.0 - CIFAR10_MEAN[2]) / CIFAR10_STD[2], abs=1e-5)
    # the parent folder holding cifar-10-batches-py is accepted too
    assert torch.equal(data.cifar10(tmp_path, "test").tensors[0], test.tensors[0])


def test_cifar10_missing_file_is_named(tmp_path):
    folder = tmp_path / "cifar"
    _write_fake_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.cifar10(folder, "train")
    assert len(data.cifar10(folder, "test")) == 3  # the test split does not need the train files
    with pytest.raises(FileNotFoundError, match="test_batch"):
        data.cifar10(tmp_path / "empty", "test")


def test_cifar10_rejects_malformed_batch(tmp_path):
    folder = tmp_path / "cifar"
    _write_fake_cifar(folder)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="3072"):
        data.cifar10(folder, "test")


def test_load_specs(tmp_path):
    bundle = data.load("digits")
    assert (bundle.name, bundle.num_classes, bundle.in_channels, bundle.image_size) == ("digits", 10, 3, 32)
    assert len(bundle.train) == 1438 and len(bundle.test) == 359
    assert data.load("digits", image_size=16).train.tensors[0].shape[-2:] == (16, 16)

    folder = tmp_path / "c10"
    _write_fake_cifar(folder)
    c = data.load(f"cifar10:{folder}")
    assert (c.name, c.num_classes, c.in_channels, c.image_size) == ("cifar10", 10, 3, 32)
    assert len(c.train) == 20 and len(c.test) == 3
    small = data.load(f"cifar10:{folder}", image_size=16)
    assert small.train.tensors[0].shape == (20, 3, 16, 16) and small.image_size == 16


@pytest.mark.parametrize("spec", ["", "mnist", "cifar10", "cifar10:", "digits:extra", "cifar100:/tmp"])
def test_load_bad_spec(spec):
    with pytest.raises(ValueError, match=r"'digits' or 'cifar10:PATH'"):
        data.load(spec)


def test_synthetic_inputs():
    a = data.synthetic_inputs((4, 3, 8, 8), seed=3)
    b = data.synthetic_inputs((4, 3, 8, 8), seed=3)
    c = data.synthetic_inputs((4, 3, 8, 8), seed=4)
    assert a.shape == (4, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.count_nonzero(a) == a.numel()
    big = data.synthetic_inputs(100_000)
    assert big.shape == (100_000,)
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1.0) < 0.02
    d = data.synthetic_inputs((4, 3, 8, 8), seed=3, dtype=torch.float64)
    assert d.dtype == torch.float64 and torch.equal(d, a.double())
    assert data.synthetic_inputs([2, 2], seed=3, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_loader_is_seeded():
    ds = torch.utils.data.TensorDataset(torch.arange(50))

    def order(seed):
        return torch.cat([b[0] for b in data.loader(ds, 8, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(50))
    plain = data.loader(ds, 8, shuffle=False)
    assert plain.num_workers == 0
    assert torch.cat([b[0] for b in plain]).tolist() == list(range(50))
    assert len(data.loader(ds, 8, shuffle=False, drop_last=True)) == 6
    assert len(plain) == 7


# ----------------------------------------------------------------------------------------------- augmentation

def _windows(image, padding, fill):
    """Every (i, j, flipped) window of ``image`` (C, H, W) padded by ``padding`` with ``fill`` per channel."""
    c, h, w = image.shape
    padded = torch.as_tensor(fill, dtype=image.dtype).view(-1, 1, 1).expand(c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, padding:padding + h, padding:padding + w] = image
    out = {}
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            win = padded[:, i:i + h, j:j + w]
            out[(i, j, False)] = win
            out[(i, j, True)] = win.flip(-1)
    return out


def _which_window(out, windows):
    hits = [key for key, win in windows.items() if torch.equal(out, win)]
    assert len(hits) == 1, f"the output matches {len(hits)} windows of the padded image (expected exactly one)"
    return hits[0]


def test_random_crop_flip_outputs_a_window_of_the_zero_padded_image():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 6, 7, generator=gen) + 0.5  # no zeros: a window is identified by its values
    windows = _windows(image, 2, [0.0, 0.0, 0.0])
    transform = data.RandomCropFlip(2)
    torch.manual_seed(1)
    seen = set()
    for _ in range(400):
        out = transform(image)
        assert out.shape == image.shape and out.dtype == image.dtype
        seen.add(_which_window(out, windows))
    # every offset and both orientations occur (50 keys, 400 uniform draws: each is missed w.p. ~3e-4)
    assert {(i, j) for i, j, _ in seen} == {(i, j) for i in range(5) for j in range(5)}
    assert {f for _, _, f in seen} == {False, True}
    assert torch.equal(image, windows[(2, 2, False)])  # the input is not modified


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_crop_flip_flips_half_the_time(seed):
    image = torch.arange(12, dtype=torch.float32).view(1, 3, 4)
    torch.manual_seed(seed)
    flips = sum(torch.equal(data.RandomCropFlip(0)(image), image.flip(-1)) for _ in range(2000))
    assert 800 <= flips <= 1200  # Binomial(2000, 1/2): mean 1000, sd 22; the margin is 9 sd
    torch.manual_seed(seed)
    assert all(torch.equal(data.RandomCropFlip(0, flip=False)(image), image) for _ in range(50))


def test_random_crop_flip_bad_arguments_are_named():
    with pytest.raises(ValueError, match="padding"):
        data.RandomCropFlip(-1)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        data.RandomCropFlip()(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="fill has 2 values"):
        data.RandomCropFlip(fill=[0.0, 1.0])(torch.zeros(3, 8, 8))


def _black_pixel():
    return [-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)]


def test_cifar10_train_is_augmented_by_default_and_test_is_not(tmp_path):
    folder = tmp_path / "cifar"
    _write_fake_cifar(folder)
    train, test = data.cifar10(folder, "train"), data.cifar10(folder, "test")
    assert isinstance(train, data.AugmentedTensorDataset)
    assert not isinstance(test, data.AugmentedTensorDataset)
    x, y = train.tensors  # the stored images are the unaugmented ones
    torch.testing.assert_close(x, data.cifar10(folder, "train", augment=False).tensors[0], rtol=0, atol=0)
    torch.manual_seed(0)
    changed = 0
    for i in range(len(train)):
        for _ in range(5):
            img, label = train[i]
            assert label.item() == y[i].item() and img.shape == (3, 32, 32) and img.dtype == torch.float32
            _which_window(img, _windows(x[i], 4, _black_pixel()))
            changed += not torch.equal(img, x[i])
    assert changed >= 50  # of 100 reads, only (4, 4, unflipped) = 1 in 162 returns the original
    for i in range(len(test)):
        img, label = test[i]
        assert torch.equal(img, test.tensors[0][i]) and label.item() == test.tensors[1][i].item()
    forced = data.cifar10(folder, "test", augment=True)
    assert isinstance(forced, data.AugmentedTensorDataset)


def test_cifar10_padding_is_black_in_pixel_units(tmp_path):
    folder = tmp_path / "cifar"
    _write_fake_cifar(folder)
    train = data.cifar10(folder, "train")
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.manual_seed(0)
    top_padded = 0
    for i in range(len(train)):
        for _ in range(5):
            img = train[i][0]
            row, _, _ = _which_window(img, _windows(train.tensors[0][i], 4, _black_pixel()))
            if row < 4:  # shifted down: the first 4 - row rows are padding, pixel value 0 once unnormalised
                pixels = img[:, : 4 - row] * std + mean
                torch.testing.assert_close(pixels, torch.zeros(3, 4 - row, 32), atol=1e-6, rtol=0)
                top_padded += 1
    assert top_padded >= 20  # 4 of the 9 row offsets pad the top: ~44 of 100 reads


def test_augmented_reads_are_reproducible_under_the_torch_seed(tmp_path):
    folder = tmp_path / "cifar"
    _write_fake_cifar(folder)
    train = data.cifar10(folder, "train")

    def epoch(seed):
        torch.manual_seed(seed)
        loader, sampler = make_loader(train, batch_size=8, shuffle=True, seed=0, rank=0, world_size=1)
        x, y = (torch.cat(t) for t in zip(*loader))
        order = list(sampler)
        assert torch.equal(y, train.tensors[1][order])  # labels follow their images
        assert not torch.equal(x, train.tensors[0][order])  # the loader's batches are augmented
        return x

    assert torch.equal(epoch(3), epoch(3))
    assert not torch.equal(epoch(3), epoch(4))


def test_load_augments_cifar_training_data_only_and_never_digits(tmp_path):
    folder = tmp_path / "c10"
    _write_fake_cifar(folder)
    c = data.load(f"cifar10:{folder}")
    assert isinstance(c.train, data.AugmentedTensorDataset) and not isinstance(c.test, data.AugmentedTensorDataset)
    assert c.train.transform.padding == 4
    assert not isinstance(data.load(f"cifar10:{folder}", augment=False).train, data.AugmentedTensorDataset)
    small = data.load(f"cifar10:{folder}", image_size=16)
    assert small.train.transform.padding == 2 and small.train[0][0].shape == (3, 16, 16)

    digits = data.load("digits", image_size=8)
    assert not isinstance(digits.train, data.AugmentedTensorDataset)
    assert not isinstance(digits.test, data.AugmentedTensorDataset)
    torch.manual_seed(0)
    assert torch.equal(digits.train[5][0], digits.train.tensors[0][5])
    forced = data.load("digits", image_size=8, augment=True)
    assert isinstance(forced.train, data.AugmentedTensorDataset) and forced.train.transform.padding == 1
    assert not isinstance(forced.test, data.AugmentedTensorDataset)
    # digits' padding is the background: the 0 pixel after the digits' normalisation
    assert forced.train.transform.fill.tolist() == pytest.approx([forced.train.tensors[0].min().item()] * 3, abs=1e-6)
