"""Cheap construction of the small modules (observers, fake quantizers) models hold thousands of."""
from __future__ import annotations

import torch
from torch.nn.modules import module as _nn_module

__all__ = ["add_buffers", "replace_parameters"]


def add_buffers(mod: torch.nn.Module, **buffers: torch.Tensor) -> None:
    """``mod.register_buffer(name, tensor)`` for each item, on a module that has none of these names yet.

    Without global buffer-registration hooks that is one dict update; ``register_buffer``
    validates names the callers here hard-code, at several microseconds a buffer.
    """
    if getattr(_nn_module, "_global_buffer_registration_hooks", True):
        for name, t in buffers.items():  # hooks installed (or an unknown torch): the public way
            mod.register_buffer(name, t)
        return
    mod._buffers.update(buffers)


def replace_parameters(mod: torch.nn.Module, **params: torch.nn.Parameter) -> None:
    """``setattr(mod, name, param)`` for parameters ``mod`` already has (e.g. a folded conv's
    weight and bias): without global parameter-registration hooks that is one dict update,
    where ``nn.Module.__setattr__`` walks its checks at several microseconds a call."""
    if getattr(_nn_module, "_global_parameter_registration_hooks", True) or not all(
            name in mod._parameters and isinstance(p, torch.nn.Parameter) for name, p in params.items()):
        for name, p in params.items():
            setattr(mod, name, p)
        return
    mod._parameters.update(params)
