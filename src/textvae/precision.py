"""Which floating-point precision the network runs in, on the device at hand.

bf16 autocast is a training and evaluation setting (``train.precision``, ``eval.precision``);
on a device without native bfloat16 it runs as fp32 (:func:`runnable_precision`), and an
``nn.LSTM`` called under bf16 autocast there runs in float32 (:func:`lstm_forward`), so a bf16
preset trains and scores on any machine and every record says what ran.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)
_FALLBACK_WARNED: set[str] = set()  # device types already warned about


@functools.cache
def bf16_native(device_type: str) -> bool:
    """Whether a ``device_type`` ("cpu", "cuda", ...) runs bfloat16 natively: CUDA by
    ``torch.cuda.is_bf16_supported()``, a CPU where oneDNN has bf16 kernels (AVX-512 or AMX)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        # oneDNN's bfloat16 kernels (LSTM included) need AVX-512 or AMX
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return True  # other accelerators: autocast decides


def runnable_precision(precision: str, device: torch.device | str) -> str:
    """The precision that runs on ``device``: ``precision``, except ``"bf16"`` where the device
    has no native bfloat16, which runs as ``"fp32"`` (logged as a warning once per device type).

    On an x86 CPU without AVX-512 (e.g. an AVX2-only AMD EPYC) PyTorch 2.13's bf16 autocast
    cannot run an ``nn.LSTM`` ("could not create a primitive descriptor for the LSTM forward
    propagation primitive") and emulates bf16 matmuls: a training step of the PTB CPU preset
    took 4.98 s under bf16 autocast (the LSTM kept in fp32) against 0.42 s in fp32 on one such
    core (``bench/bf16_fallback.py``, bench/RESULTS.md). Training, validation, ``textvae
    evaluate`` (its file name included) and sweeps record the precision that ran, so a bf16
    preset scored on such a machine says ``fp32``.

    Args:
        precision: ``"fp32"`` or ``"bf16"``.
        device: the device the network runs on.
    Returns:
        ``"fp32"`` or ``"bf16"``.
    """
    kind = torch.device(device).type
    if precision == "bf16" and not bf16_native(kind):
        if kind not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(kind)
            log.warning(
                "precision bf16 requested but this %s has no native bfloat16 "
                "(CPU: needs AVX-512 or AMX): running in fp32",
                kind,
            )
        return "fp32"
    return precision


def lstm_forward(lstm: nn.LSTM, x, state=None):
    """``lstm(x, state)``, in float32 outside autocast when bf16 autocast is active on a CPU
    without native bfloat16, where PyTorch 2.13 raises "could not create a primitive descriptor
    for the LSTM forward propagation primitive" (:func:`runnable_precision`).

    Args:
        lstm: the module. x: (B, T, D) float or a ``PackedSequence``. state: optional
            (h0, c0), each (layers x directions, B, H).
    Returns:
        what ``lstm`` returns (outputs in float32 on the fallback path).
    """
    if (
        torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not bf16_native("cpu")
        and next(lstm.parameters()).device.type == "cpu"
    ):
        with torch.autocast("cpu", enabled=False):
            if isinstance(x, torch.Tensor):
                x = x.float()
            if state is not None:
                state = tuple(s.float() for s in state)
            return lstm(x, state)
    return lstm(x, state)
