"""Numeric precision chosen from the hardware (``precision: auto``).

bfloat16 halves memory traffic and, where the hardware has bf16 units, is
much faster than float32: about 5x for a large matmul on a CPU with AMX,
and the norm on recent GPUs.  Where it has none it is emulated, and slow:
on an AVX2-only CPU a 1024^3 bf16 matmul was measured about 86x slower than
float32 (README, "Precision").  Nothing here assumes either: ``auto``
resolves, once per process and device, to

* ``bf16`` on CUDA when ``torch.cuda.is_bf16_supported()``; ``fp32`` on a
  CUDA device without bf16;
* on a CPU, ``bf16`` only when the CPU reports native bf16 support (oneDNN's
  bf16 check: AVX-512 with bf16 instructions or AMX) **and** a one-off
  micro-benchmark (a square matmul in both dtypes) confirms bf16 is faster;
  ``fp32`` otherwise;
* ``fp32`` on any other device.

Two names follow one decision: ``precision`` (the autocast setting of a
speechbrain ``Brain``: ``fp32``, ``bf16``, ``fp16``) and ``dtype`` (the
weight dtype of frozen parts and of generation: ``float32``,
``bfloat16``...).  Explicit values always win over ``auto``.  The choice
and its reason are logged once per device and process.

The device that ``auto`` resolves for is the run's device: recipes call
:func:`set_run_device` with ``--device`` before their YAML is built, so
objects constructed in the YAML (``dtype: auto``) resolve for the device
they will run on; without it, speechbrain's ``infer_device`` (CUDA when
available) is used.

Authors
 * speechbrain-blspkd contributors 2026
"""

import dataclasses
import functools
import logging
import statistics
import time

import torch

__all__ = [
    "PrecisionChoice",
    "bf16_supported",
    "choose",
    "resolve_dtype",
    "resolve_precision",
    "run_device",
    "set_run_device",
]

logger = logging.getLogger(__name__)

_PRECISION_OF_DTYPE = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
_DTYPE_OF_PRECISION = {v: k for k, v in _PRECISION_OF_DTYPE.items()}
_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
}

_RUN_DEVICE = None


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` resolved to on one device, and why.

    Arguments
    ---------
    precision : str
        ``"bf16"`` or ``"fp32"``.
    device : str
        The device type it was decided for (``"cpu"``, ``"cuda"``).
    reason : str
        One sentence for the log.
    """

    precision: str
    device: str
    reason: str

    @property
    def dtype(self):
        """The matching ``torch.dtype``."""
        return _DTYPE_OF_PRECISION[self.precision]


def set_run_device(device):
    """The device ``auto`` resolves for in this process (None: inferred).

    Arguments
    ---------
    device : str or torch.device or None
        E.g. ``"cpu"``, ``"cuda:1"``.

    Example
    -------
    >>> set_run_device("cpu"); run_device()
    device(type='cpu')
    >>> set_run_device(None)
    """
    global _RUN_DEVICE
    _RUN_DEVICE = None if device is None else torch.device(device)


def run_device():
    """The run's device (see :func:`set_run_device`), else the inferred one.

    Returns
    -------
    torch.device
    """
    if _RUN_DEVICE is not None:
        return _RUN_DEVICE
    from speechbrain.utils.distributed import infer_device

    return torch.device(infer_device())


def bf16_supported(device_type):
    """Whether the hardware of ``device_type`` has native bf16 support.

    CPU: oneDNN's own check (AVX-512 with bf16 instructions, or AMX), which
    is what decides whether its bf16 kernels are native or emulated; CUDA:
    ``torch.cuda.is_bf16_supported()`` without emulation.

    Arguments
    ---------
    device_type : str
        ``"cpu"``, ``"cuda"`` or another type (always False).

    Returns
    -------
    (bool, str)
        The answer and the capability string it was read from.
    """
    if device_type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            native = False
        return native, f"CPU capability {capability}, oneDNN bf16 {native}"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA not available"
        name = torch.cuda.get_device_name()
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return bool(ok), f"{name}, bf16 {'supported' if ok else 'unsupported'}"
    return False, f"device type {device_type!r}"


def matmul_speedup(device_type="cpu", size=512, repeats=7):
    """Time of a square float32 matmul over the same in bfloat16.

    A one-off micro-benchmark (a few hundred milliseconds at most): after
    one warm-up of each, ``repeats`` rounds each time one float32 and one
    bfloat16 product back to back, and the result is the median of the
    rounds' ratios.  Interleaving matters: on a machine that other work
    loads now and then, a best-of-n per dtype measured one dtype after
    the other flipped the choice between runs (0.68x in one process, 2.0x
    in the next on the same CPU), and with it the dtype of a cached
    encoder's features.

    Arguments
    ---------
    device_type : str
        Device to measure on.
    size : int
        Matrix side.
    repeats : int
        Timed rounds.

    Returns
    -------
    float
        ``t(fp32) / t(bf16)``: above 1 means bf16 is faster.

    Example
    -------
    >>> matmul_speedup(size=32, repeats=1) > 0
    True
    """
    device = torch.device(device_type)
    pairs = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        pairs[dtype] = (a, b)
        a @ b  # warm-up
    ratios = []
    for _ in range(max(int(repeats), 1)):
        spent = {}
        for dtype, (a, b) in pairs.items():
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            spent[dtype] = time.perf_counter() - start
        ratios.append(spent[torch.float32] / max(spent[torch.bfloat16], 1e-12))
    return statistics.median(ratios)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def choose(device_type):
    """Decide ``auto`` for a device type (once per process; logged).

    Arguments
    ---------
    device_type : str
        ``"cpu"``, ``"cuda"``...

    Returns
    -------
    PrecisionChoice
    """
    supported, capability = bf16_supported(device_type)
    if device_type == "cuda":
        choice = PrecisionChoice(
            "bf16" if supported else "fp32", "cuda", capability
        )
    elif device_type != "cpu":
        choice = PrecisionChoice(
            "fp32", device_type, f"{capability}: no bf16 decision, fp32"
        )
    elif not supported:
        choice = PrecisionChoice(
            "fp32",
            "cpu",
            f"{capability}: bf16 would be emulated (slow)",
        )
    else:
        speedup = matmul_speedup("cpu")
        fast = _on_every_process(speedup > 1.0)
        reason = (
            f"{capability}; 512^3 matmul bf16 {speedup:.2f}x the speed of fp32"
        )
        if fast != (speedup > 1.0):
            reason += (
                "; fp32 as another process of the run measured bf16 slower"
            )
        choice = PrecisionChoice("bf16" if fast else "fp32", "cpu", reason)
    logger.info(
        "precision auto on %s: %s (%s)",
        device_type,
        choice.precision,
        choice.reason,
    )
    return choice


def _on_every_process(flag):
    """``flag`` where it holds on every process of a CPU run, else False.

    The processes of one run (torchrun on one or several nodes) time the
    matmul each on its own, at the same moment on the same cores, and can
    come to different answers; one precision for all of them keeps the
    encoder's cached features (whose label holds the weights' dtype) the
    same on every rank.  Only a gloo group (a CPU run) is asked, and
    :func:`choose` runs first on every process while the recipe is loaded,
    so every process takes part; without a process group the flag is
    returned as it is.

    Example
    -------
    >>> _on_every_process(True), _on_every_process(False)
    (True, False)
    """
    import torch.distributed as dist

    from speechbrain_blspkd.utils.sharding import agree

    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    if dist.get_backend() != "gloo" or run_device().type != "cpu":
        return bool(flag)
    return agree(flag, "all")


def _device_type(device):
    if device is None:
        return run_device().type
    return torch.device(device).type


def resolve_precision(precision, device=None):
    """A speechbrain ``precision`` (``fp32``/``bf16``/``fp16``).

    Arguments
    ---------
    precision : str or torch.dtype or None
        ``"auto"`` (decided for ``device``), None (``fp32``, speechbrain's
        default) or an explicit value (returned in its canonical spelling).
    device : str or torch.device, optional
        Default: :func:`run_device`.

    Returns
    -------
    str

    Example
    -------
    >>> resolve_precision("bfloat16")
    'bf16'
    >>> resolve_precision(None)
    'fp32'
    >>> resolve_precision("auto", "cpu") in ("bf16", "fp32")
    True
    """
    if precision is None:
        return "fp32"
    if isinstance(precision, torch.dtype):
        if precision not in _PRECISION_OF_DTYPE:
            raise ValueError(f"precision: unsupported dtype {precision}")
        return _PRECISION_OF_DTYPE[precision]
    name = str(precision).lower().replace("torch.", "")
    if name == "auto":
        return choose(_device_type(device)).precision
    if name not in _ALIASES:
        raise ValueError(
            f"precision {precision!r}: expected auto, fp32, bf16 or fp16"
        )
    return _ALIASES[name]


def resolve_dtype(dtype, device=None):
    """A weight ``torch.dtype`` from ``auto``, a name or a dtype.

    Arguments
    ---------
    dtype : str or torch.dtype or None
        ``"auto"`` (decided for ``device``), a name (``"bfloat16"``,
        ``"torch.float16"``, ``"bf16"``), a dtype, or None (returned as None:
        keep the stored dtype).
    device : str or torch.device, optional
        Default: :func:`run_device`.

    Returns
    -------
    torch.dtype or None

    Example
    -------
    >>> resolve_dtype("bfloat16")
    torch.bfloat16
    >>> resolve_dtype("fp32")
    torch.float32
    >>> resolve_dtype(None) is None
    True
    >>> resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    True
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name in _ALIASES or name == "auto":
        return _DTYPE_OF_PRECISION[resolve_precision(name, device)]
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return found
