"""Frozen TorchScript copies of a network's forward pass, for single-pair CPU inference.

A network of ~20 small layers on one 112×112 image spends as long in Python and PyTorch's
per-module dispatch as in arithmetic. ``torch.jit.trace`` + ``torch.jit.freeze`` removes that:
the weights become constants and the Python module calls disappear. One pair, taking
turns (``python benchmarks/localizer_speed.py``): the MNIST SSD ~25 % faster, the matcher's
U-Net ~35 %, outputs identical; no change for batches of 64+, which are arithmetic-bound.

The frozen graph has no autograd through the weights, so :func:`use_frozen` routes a call to
it only when gradients are off; training and ``loss`` always run the eager module.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn


class _Method(nn.Module):
    """``owner.<name>`` as a module's forward, so that it can be traced."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self.owner = owner
        self.name = name

    def forward(self, *args: torch.Tensor):
        return getattr(self.owner, self.name)(*args)


def freeze_method(owner: nn.Module, name: str, example: tuple[torch.Tensor, ...],
                  atol: float = 1e-4, also: tuple[tuple[torch.Tensor, ...], ...] = ()
                  ) -> Callable | None:
    """``owner.<name>`` (a pure tensor function of its arguments, no Python control flow that
    depends on values or batch size) traced on ``example`` and frozen; checked against the
    eager method on ``example`` and on it stacked with random values of its shape (a
    batch size it was not traced at), and on each of ``also`` (e.g. another image size).
    Returns None (and warns) if tracing fails or disagrees, so callers keep the eager path."""
    owner.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")            # jit's deprecation and tracer warnings
            traced = torch.jit.freeze(torch.jit.trace(_Method(owner, name).eval(), example,
                                                      check_trace=False))
            method = getattr(owner, name)
            g = torch.Generator().manual_seed(0)
            two = tuple(torch.cat([t, torch.rand(t.shape, generator=g, dtype=t.dtype)])
                        for t in example)
            for args in (example, two, *also):
                want, got = method(*args), traced(*args)
                want = want if isinstance(want, tuple) else (want,)
                got = got if isinstance(got, tuple) else (got,)
                if len(want) != len(got) or not all(
                        a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-4)
                        for a, b in zip(want, got)):
                    raise RuntimeError("frozen outputs differ from the eager module's")
        return traced
    except Exception as e:                              # noqa: BLE001 - any failure → eager
        warnings.warn(f"{type(owner).__name__}.{name}: running eagerly, freezing failed: {e}",
                      RuntimeWarning, stacklevel=2)
        return None


def attach(owner: nn.Module, name: str, example: tuple[torch.Tensor, ...],
           also: tuple[tuple[torch.Tensor, ...], ...] = ()) -> bool:
    """Freeze ``owner.<name>`` (see :func:`freeze_method`) and keep it on ``owner`` outside
    its submodules (so state_dict and ``modules()`` ignore it). True if frozen."""
    fn = freeze_method(owner, name, example, also=also)
    object.__setattr__(owner, "_frozen", fn)
    return fn is not None


def is_frozen(owner: nn.Module) -> bool:
    """Has :func:`attach` given ``owner`` a frozen forward pass?"""
    return owner.__dict__.get("_frozen") is not None


def use_frozen(owner: nn.Module) -> Callable | None:
    """The frozen forward attached to ``owner``, if any and gradients are off; else None."""
    fn = owner.__dict__.get("_frozen")
    return fn if fn is not None and not torch.is_grad_enabled() else None


def finish_inference_copy(model: nn.Module, sequences=(), conv_positions=(0,),
                          freeze: bool = True) -> nn.Module:
    """The common end of the networks' ``for_inference``: ``model`` (an eval-mode deep copy)
    gets every BatchNorm that directly follows a convolution at ``conv_positions`` of each
    ``nn.Sequential`` in ``sequences`` folded into it (an ``nn.Identity`` left in its place;
    same outputs up to float rounding), is put in channels-last layout, and, if ``freeze``,
    has its forward pass frozen by its own ``freeze()``. Returns it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for seq in sequences:
        for i in conv_positions:
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    model = model.to(memory_format=torch.channels_last)
    if freeze:
        model.freeze()
    return model
