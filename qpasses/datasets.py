"""Real data for ``qpasses``: the scikit-learn digits set, and small training helpers.

The data is :func:`sklearn.datasets.load_digits` -- 1797 greyscale 8x8
images of the digits 0-9 with pixel values 0..16 -- which ships inside
scikit-learn, so nothing is downloaded.

Splits
------
The 1797 images are split once, deterministically, with
``sklearn.model_selection.train_test_split(test_size=500, stratify=labels,
random_state=seed)``:

* ``"train"``: 1297 images (class-stratified);
* ``"test"``: 500 images (class-stratified);
* ``"calib"``: the first 256 images of ``"train"`` (in split order), meant
  for post-training-quantisation calibration.

Images are returned as ``float32`` tensors of shape ``[N, 1, 8, 8]``,
normalised as ``(x - mean) / std`` with the scalar mean and standard
deviation of all pixels of the *training* split (so the test data is
normalised with training statistics only).  Labels are ``int64``.

Training
--------
:func:`fit` is the reusable, deterministic training loop (Adam/AdamW with a
cosine learning-rate schedule, cross-entropy loss); :func:`train_classifier`
wraps it with an on-disk cache of the trained ``state_dict``, and
:func:`train_digits_cnn` builds and trains the project's real-data model
:class:`qpasses.zoo.DigitsCNN`.  :func:`accuracy` evaluates a classifier.

The cache directory is the ``cache_dir`` argument, else the environment
variable ``QPASSES_CACHE``, else ``<tempfile.gettempdir()>/qpasses-cache``;
it is never inside the repository.  Cache files are keyed by a hash of the
training hyper-parameters, the data split and the model's initial
parameters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "NUM_TRAIN",
    "NUM_TEST",
    "NUM_CALIB",
    "load_digits_tensors",
    "calib_batches",
    "fit",
    "accuracy",
    "cache_dir_path",
    "train_classifier",
    "train_digits_cnn",
]

#: Number of images in the ``"train"`` split.
NUM_TRAIN = 1297
#: Number of images in the ``"test"`` split.
NUM_TEST = 500
#: Number of images in the ``"calib"`` split (the first images of ``"train"``).
NUM_CALIB = 256

# Bump when the data pipeline or the training loop changes in a way that
# would make cached weights stale.
_CACHE_VERSION = 2


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _digits_arrays(seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalised ``(x_train, y_train, x_test, y_test)`` numpy arrays for a split seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32)  # [1797, 8, 8], values 0..16
    labels = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=NUM_TEST, stratify=labels, random_state=seed
    )
    mean = float(x_tr.mean())
    std = float(x_tr.std())
    x_tr = ((x_tr - mean) / std).astype(np.float32)[:, None]
    x_te = ((x_te - mean) / std).astype(np.float32)[:, None]
    for a in (x_tr, y_tr, x_te, y_te):
        a.setflags(write=False)
    return x_tr, y_tr, x_te, y_te


def load_digits_tensors(split: str = "train", seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load a split of the scikit-learn digits as tensors.

    Args:
        split: ``"train"`` (1297 images), ``"test"`` (500 images) or
            ``"calib"`` (the first 256 training images).
        seed: ``random_state`` of the stratified train/test split; keep the
            default 0 for the project's reference split.

    Returns:
        ``(x, y)``: ``x`` float32 ``[N, 1, 8, 8]`` normalised with the
        training split's pixel mean and standard deviation, ``y`` int64
        ``[N]`` with labels 0..9.  The tensors are fresh copies and may be
        modified by the caller.

    Raises:
        ValueError: for an unknown split name.
    """
    x_tr, y_tr, x_te, y_te = _digits_arrays(seed)
    if split == "train":
        x, y = x_tr, y_tr
    elif split == "test":
        x, y = x_te, y_te
    elif split == "calib":
        x, y = x_tr[:NUM_CALIB], y_tr[:NUM_CALIB]
    else:
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'calib'")
    return torch.tensor(x), torch.tensor(y)


def calib_batches(batch_size: int = 32, n: int = NUM_CALIB, seed: int = 0) -> List[torch.Tensor]:
    """Calibration inputs: the first ``n`` training images, in batches.

    With the defaults this is the ``"calib"`` split cut into 8 batches of
    32 images.  ``n`` may exceed 256 (up to the 1297 training images); the
    last batch is smaller when ``batch_size`` does not divide ``n``.

    Args:
        batch_size: images per batch.
        n: total number of images.
        seed: split seed, as in :func:`load_digits_tensors`.

    Returns:
        A list of float32 tensors of shape ``[b, 1, 8, 8]`` (no labels).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x, _ = load_digits_tensors("train", seed)
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"n must be in [1, {x.shape[0]}], got {n}")
    return [b.clone() for b in x[:n].split(batch_size)]


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    callback: Optional[Callable[[nn.Module, int, float], Optional[bool]]] = None,
    *,
    step_hook: Optional[Callable[[nn.Module, int], None]] = None,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    num_threads: Optional[int] = 1,
) -> nn.Module:
    """Train ``model`` on ``(x, y)`` with mini-batch gradient descent, in place.

    The loop is deterministic for a given ``seed``: the shuffling uses a
    private :class:`torch.Generator`, anything that draws from the global
    RNG inside the model (e.g. dropout) runs under
    :func:`torch.random.fork_rng` seeded with ``seed`` (so the caller's
    global RNG state is left untouched), and by default training runs on a
    single intra-op thread, which makes the result independent of the
    machine's core count.

    Defaults: :class:`torch.optim.AdamW` (``weight_decay`` as given; plain
    Adam when it is 0) with a per-step cosine learning-rate decay from
    ``lr`` to 0, cross-entropy loss, and the last incomplete batch kept.

    Args:
        model: the network; it is put in training mode and left in **eval**
            mode on return.
        x: inputs ``[N, ...]``.
        y: targets ``[N]`` (class indices for the default loss).
        epochs: number of passes over the data.
        lr: peak learning rate.
        batch_size: mini-batch size.
        seed: seeds shuffling and the forked global RNG.
        weight_decay: decoupled weight decay (AdamW).
        callback: called as ``callback(model, epoch, mean_loss)`` after each
            epoch (``epoch`` counts from 0, the model is still in training
            mode); returning ``True`` stops training early.
        step_hook: called as ``step_hook(model, step)`` after every optimiser
            step (e.g. to clip latent weights of binarised networks).
        loss_fn: ``loss_fn(logits, targets)``; default
            :func:`torch.nn.functional.cross_entropy`.
        optimizer: a ready optimiser over the model's parameters to use
            instead of the default; its learning rates are still driven by
            the cosine schedule, scaled relative to each group's initial
            ``lr``.
        num_threads: intra-op threads (:func:`torch.set_num_threads`) used
            while training, restored afterwards; ``None`` keeps the current
            setting.  The default 1 is deliberate: the models trained here
            are too small to gain from threads, and on a busy machine
            multi-threaded CPU training of them can be 10-30x slower.

    Returns:
        ``model`` (trained, in eval mode).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        if weight_decay:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total_steps = max(1, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        _fit_loop(model, x, y, epochs, batch_size, gen, seed, optimizer, base_lrs,
                  total_steps, loss_fn, callback, step_hook)
    finally:
        torch.set_num_threads(prev_threads)
    model.eval()
    return model


def _fit_loop(model, x, y, epochs, batch_size, gen, seed, optimizer, base_lrs,
              total_steps, loss_fn, callback, step_hook) -> None:
    """Inner loop of :func:`fit` (training mode, cosine schedule, hooks)."""
    n = x.shape[0]
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total_loss = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                scale = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                for g, base in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base * scale
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                step += 1
                if step_hook is not None:
                    step_hook(model, step)
                total_loss += float(loss.detach()) * idx.numel()
            if callback is not None and callback(model, epoch, total_loss / n):
                break


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in percent.

    The model is evaluated in eval mode, under :func:`torch.no_grad`, in
    batches of ``batch_size``; its previous training/eval mode is restored
    afterwards.  Works for any callable module returning ``[N, C]`` logits.
    """
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, x.shape[0], batch_size):
            pred = model(x[i : i + batch_size]).argmax(dim=1)
            correct += int((pred == y[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / max(1, x.shape[0])


# ---------------------------------------------------------------------------
# Cached training
# ---------------------------------------------------------------------------


def cache_dir_path(cache_dir: Optional[str] = None) -> str:
    """Resolve the weight-cache directory (it is created if missing).

    Order: the ``cache_dir`` argument, the ``QPASSES_CACHE`` environment
    variable, then ``<tempfile.gettempdir()>/qpasses-cache``.
    """
    path = cache_dir or os.environ.get("QPASSES_CACHE") or os.path.join(
        tempfile.gettempdir(), "qpasses-cache"
    )
    os.makedirs(path, exist_ok=True)
    return path


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (CPU, contiguous, any dtype or rank)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _state_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's class name and state_dict (names, shapes, dtypes, values)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _cache_file(cache_key: str, hparams: Dict, model: nn.Module, cache_dir: Optional[str]) -> str:
    """Path of the cache file for ``cache_key``, hyper-parameters and initial weights."""
    blob = json.dumps(
        {"version": _CACHE_VERSION, "hparams": hparams, "init": _state_fingerprint(model)},
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in cache_key)
    return os.path.join(cache_dir_path(cache_dir), f"{safe_key}-{digest}.pt")


def train_classifier(
    model: nn.Module,
    epochs: int,
    lr: float,
    seed: int = 0,
    cache_key: Optional[str] = None,
    *,
    x: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    split_seed: int = 0,
    cache_dir: Optional[str] = None,
    on_train: Optional[Callable[[], None]] = None,
) -> nn.Module:
    """Train a classifier with :func:`fit`, optionally caching the result on disk.

    Without ``x``/``y`` the model is trained on the digits ``"train"``
    split (``split_seed``).  With a ``cache_key`` the trained
    ``state_dict`` is stored in :func:`cache_dir_path` under a file name
    made of the key and a hash of the hyper-parameters, the training data
    (split seed, or a hash of explicit ``x``/``y``) and the model's
    *initial* parameters; a later call with the same inputs loads it
    instead of training.  Writes are atomic (temporary file + rename).

    Args:
        model: the network to train (in place).
        epochs: passes over the data.
        lr: peak learning rate (see :func:`fit`).
        seed: training seed (see :func:`fit`).
        cache_key: readable cache-file prefix such as ``"mlp-digits"``;
            ``None`` disables caching.
        x: training inputs; default the digits training images.
        y: training labels; default the digits training labels.
        batch_size: mini-batch size.
        weight_decay: AdamW weight decay.
        split_seed: digits split seed when ``x``/``y`` are not given.
        cache_dir: cache directory override.
        on_train: called (without arguments) just before training starts; not called when
            the weights come from the cache (e.g. to tell the user that training runs).

    Returns:
        ``model``, trained (or loaded from the cache), in eval mode.
    """
    if (x is None) != (y is None):
        raise ValueError("pass both x and y, or neither")
    if x is None:
        x, y = load_digits_tensors("train", split_seed)
        data_id = f"digits-train-{split_seed}"
    else:
        h = hashlib.sha256()
        for t in (x, y):
            h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
            h.update(_tensor_bytes(t))
        data_id = h.hexdigest()

    path = None
    if cache_key is not None:
        hparams = {
            "epochs": epochs,
            "lr": lr,
            "seed": seed,
            "batch_size": batch_size,
            "weight_decay": weight_decay,
            "data": data_id,
        }
        path = _cache_file(cache_key, hparams, model, cache_dir)
        if os.path.exists(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
                model.eval()
                return model
            except Exception:  # corrupt or incompatible file: retrain and overwrite
                pass

    if on_train is not None:
        on_train()
    fit(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay)

    if path is not None:
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return model


def train_digits_cnn(
    model: Optional[nn.Module] = None,
    epochs: int = 15,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    *,
    width: int = 16,
    lr: float = 0.01,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    split_seed: int = 0,
    on_train: Optional[Callable[[], None]] = None,
) -> nn.Module:
    """Train (or load from the cache) the project's real-data model.

    Builds :class:`qpasses.zoo.DigitsCNN` (``width``) with its parameters
    initialised under ``torch.manual_seed(seed)`` (inside
    :func:`torch.random.fork_rng`, so the global RNG is untouched), unless a
    ``model`` is given, and trains it on the digits ``"train"`` split with
    :func:`train_classifier` (cache key ``"digits_cnn"``).  With the
    defaults it reaches about 99 % accuracy on the ``"test"`` split (99.4 %
    for seed 0) in a few seconds on two CPU cores; a second call loads identical weights from
    the cache.

    Args:
        model: a model to train instead of a fresh ``DigitsCNN(width)``.
        epochs: passes over the 1297 training images.
        seed: initialisation and training seed.
        cache_dir: cache directory override (see :func:`cache_dir_path`).
        width: ``DigitsCNN`` width when ``model`` is None.
        lr: peak learning rate.
        batch_size: mini-batch size.
        weight_decay: AdamW weight decay.
        split_seed: digits split seed.
        on_train: called just before training starts, not on a cache hit
            (see :func:`train_classifier`).

    Returns:
        The trained model in eval mode.
    """
    if model is None:
        from .zoo import DigitsCNN

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsCNN(width=width)
    return train_classifier(
        model,
        epochs=epochs,
        lr=lr,
        seed=seed,
        cache_key="digits_cnn",
        batch_size=batch_size,
        weight_decay=weight_decay,
        split_seed=split_seed,
        cache_dir=cache_dir,
        on_train=on_train,
    )
