"""Tests for the digits data and training helpers in :mod:`qpasses.datasets`."""

import os
import time

import pytest
import torch

from qpasses import datasets as D
from qpasses import zoo


# --------------------------------------------------------------------------- data


def test_split_sizes_and_types():
    sizes = {"train": D.NUM_TRAIN, "test": D.NUM_TEST, "calib": D.NUM_CALIB}
    assert D.NUM_TRAIN + D.NUM_TEST == 1797
    for split, n in sizes.items():
        x, y = D.load_digits_tensors(split)
        assert x.shape == (n, 1, 8, 8) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) == 0 and int(y.max()) == 9


def test_normalised_with_train_statistics():
    x, _ = D.load_digits_tensors("train")
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std()) - 1.0) < 1e-3
    xt, _ = D.load_digits_tensors("test")
    assert abs(float(xt.mean())) < 0.1 and 0.9 < float(xt.std()) < 1.1


def test_calib_is_train_prefix_and_split_is_stratified():
    x, y = D.load_digits_tensors("train")
    xc, yc = D.load_digits_tensors("calib")
    assert torch.equal(xc, x[: D.NUM_CALIB]) and torch.equal(yc, y[: D.NUM_CALIB])
    _, yt = D.load_digits_tensors("test")
    counts = torch.bincount(yt, minlength=10)
    assert int(counts.min()) >= 45 and int(counts.max()) <= 55


def test_split_is_deterministic_and_returns_copies():
    x1, y1 = D.load_digits_tensors("test")
    x1.zero_()
    x2, y2 = D.load_digits_tensors("test")
    assert float(x2.abs().sum()) > 0
    assert torch.equal(y1, y2)
    x3, _ = D.load_digits_tensors("test", seed=1)
    assert not torch.equal(x2, x3)


def test_unknown_split():
    with pytest.raises(ValueError):
        D.load_digits_tensors("valid")


def test_calib_batches():
    batches = D.calib_batches()
    assert len(batches) == 8 and all(b.shape == (32, 1, 8, 8) for b in batches)
    xc, _ = D.load_digits_tensors("calib")
    assert torch.equal(torch.cat(batches), xc)
    odd = D.calib_batches(batch_size=100, n=250)
    assert [b.shape[0] for b in odd] == [100, 100, 50]
    with pytest.raises(ValueError):
        D.calib_batches(n=0)
    with pytest.raises(ValueError):
        D.calib_batches(batch_size=0)


# --------------------------------------------------------------------------- training helpers


class _Constant(torch.nn.Module):
    """Always predicts class 3."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 10)
        out[:, 3] = 1.0
        return out


def test_accuracy_percent_and_mode_restored():
    x, y = D.load_digits_tensors("test")
    model = _Constant().train()
    acc = D.accuracy(model, x, y, batch_size=64)
    assert acc == pytest.approx(100.0 * float((y == 3).float().mean()))
    assert model.training
    model.eval()
    D.accuracy(model, x, y)
    assert not model.training


def test_fit_is_deterministic_and_keeps_global_rng():
    x, y = D.load_digits_tensors("calib")
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = zoo.MLP(hidden=(16,))
        rng = torch.random.get_rng_state()
        threads = torch.get_num_threads()
        D.fit(model, x, y, epochs=2, lr=1e-2, batch_size=32, seed=3)
        assert torch.get_num_threads() == threads
        assert torch.equal(torch.random.get_rng_state(), rng)
        assert not model.training
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])


def test_fit_callback_and_step_hook():
    x, y = D.load_digits_tensors("calib")
    torch.manual_seed(0)
    model = zoo.MLP(hidden=(16,))
    losses, steps = [], []

    def callback(m, epoch, loss):
        assert m is model and m.training
        losses.append(loss)
        return epoch == 2  # stop after the third epoch

    D.fit(model, x, y, epochs=10, lr=1e-2, batch_size=64, callback=callback,
          step_hook=lambda m, s: steps.append(s))
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert steps == list(range(1, 13))  # 4 steps per epoch


def test_train_classifier_mlp_and_cache(tmp_path):
    x, y = D.load_digits_tensors("test")
    torch.manual_seed(0)
    model = D.train_classifier(zoo.MLP(), epochs=20, lr=1e-3, cache_key="mlp", cache_dir=str(tmp_path))
    assert D.accuracy(model, x, y) >= 93.0
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("mlp-") and files[0].endswith(".pt")
    torch.manual_seed(0)
    again = D.train_classifier(zoo.MLP(), epochs=20, lr=1e-3, cache_key="mlp", cache_dir=str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    # Other hyper-parameters or another initialisation get their own entries.
    torch.manual_seed(0)
    D.train_classifier(zoo.MLP(), epochs=1, lr=1e-3, cache_key="mlp", cache_dir=str(tmp_path))
    torch.manual_seed(1)
    D.train_classifier(zoo.MLP(), epochs=1, lr=1e-3, cache_key="mlp", cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 3


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QPASSES_CACHE", str(tmp_path / "env"))
    assert D.cache_dir_path() == str(tmp_path / "env")
    assert D.cache_dir_path(str(tmp_path / "arg")) == str(tmp_path / "arg")
    x, y = D.load_digits_tensors("calib")
    torch.manual_seed(0)
    D.train_classifier(zoo.MLP(hidden=(8,)), epochs=1, lr=1e-3, cache_key="tiny", x=x, y=y)
    assert len(os.listdir(tmp_path / "env")) == 1
    monkeypatch.delenv("QPASSES_CACHE")
    assert "qpasses-cache" in D.cache_dir_path()


def test_train_digits_cnn_accuracy_and_cache(tmp_path):
    x, y = D.load_digits_tensors("test")
    t0 = time.perf_counter()
    model = D.train_digits_cnn(cache_dir=str(tmp_path))
    train_s = time.perf_counter() - t0
    assert isinstance(model, zoo.DigitsCNN) and not model.training
    acc = D.accuracy(model, x, y)
    assert acc >= 95.0, f"DigitsCNN test accuracy {acc:.1f}% < 95% (trained in {train_s:.1f}s)"

    t0 = time.perf_counter()
    cached = D.train_digits_cnn(cache_dir=str(tmp_path))
    cached_s = time.perf_counter() - t0
    assert cached_s < max(1.0, train_s / 2)
    assert cached is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, cached.state_dict()[k])
    assert D.accuracy(cached, x, y) == acc
