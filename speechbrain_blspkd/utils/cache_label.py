"""The label of a cache folder: the settings that wrote it, checked on reuse.

A cache built once and reused across runs (stored teachers, token
timings) is only valid for the settings that wrote it.  Its folder holds a
small JSON label with those settings; :func:`check_label` compares the
label with this run's settings, refuses a folder written for other
settings (or holding data without a label) with an error that names every
difference, rebuilds it when told to, and labels a new folder.  Weights go
into a label as a checksum: :func:`hash_tensors` feeds a model's tensors to
a hash (:func:`tensor_bytes` is the raw bytes each tensor contributes).

Authors
 * speechbrain-blspkd contributors 2026
"""

import json
import logging
import pathlib

import torch

from speechbrain_blspkd.utils.atomic import atomic_write_text

__all__ = ["check_label", "hash_tensors", "tensor_bytes"]

logger = logging.getLogger(__name__)


def hash_tensors(h, named_tensors, end=""):
    """Feed ``(name, tensor)`` pairs to the hash ``h``: each tensor's name,
    dtype and shape (``name|dtype|shape`` then ``end``), then its bytes.

    Example
    -------
    >>> import hashlib, torch
    >>> h = hashlib.sha256()
    >>> hash_tensors(h, [("w", torch.zeros(2))])
    >>> h.hexdigest()[:8]
    'a03ab0a7'
    """
    for name, tensor in named_tensors:
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}{end}".encode())
        h.update(tensor_bytes(tensor))


def tensor_bytes(tensor):
    """The raw bytes of ``tensor``'s elements, in row-major order.

    The tensor is detached, copied to the CPU and made contiguous first;
    every dtype (bfloat16 included) gives its in-memory bytes, and an
    empty tensor gives ``b""``.  Checksums of weights and files that store
    tensors (CTranslate2) are made of these bytes.

    Arguments
    ---------
    tensor : torch.Tensor
        Any tensor, on any device.

    Returns
    -------
    bytes
        ``tensor.numel() * tensor.element_size()`` bytes.

    Example
    -------
    >>> tensor_bytes(torch.tensor([1, 258], dtype=torch.int16))
    b'\\x01\\x00\\x02\\x01'
    >>> tensor_bytes(torch.arange(4).reshape(2, 2).t()) == tensor_bytes(
    ...     torch.tensor([0, 2, 1, 3]))
    True
    """
    t = tensor.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def check_label(
    folder,
    label_name,
    settings,
    what,
    error,
    holds_data,
    clear,
    how_to_write,
    create=False,
    overwrite=False,
    describe=None,
):
    """Check (or write) the label of a cache folder; return the label.

    Arguments
    ---------
    folder : str or pathlib.Path
        The cache folder.
    label_name : str
        File name of the label in ``folder`` (JSON).
    settings : dict
        This run's settings (JSON values).
    what : str
        What the folder holds, for messages (e.g. ``"teacher cache"``).
    error : type
        Exception class raised for a stale folder.
    holds_data : callable
        ``() -> bool``: whether the folder holds cached data.
    clear : callable
        ``() -> None``: deletes the cached data (``overwrite``).
    how_to_write : str
        Told when the folder is missing and ``create`` is False.
    create : bool
        Label a new (empty) folder instead of refusing it.
    overwrite : bool
        Clear a stale folder and relabel it instead of refusing it.
    describe : callable, optional
        ``(key, value) -> str`` for the differences (default ``repr``).

    Returns
    -------
    dict
        The folder's label (this run's settings when newly written).

    Raises
    ------
    error
        When the folder was written for other settings, or holds data but
        no label, and ``overwrite`` is False.
    FileNotFoundError
        When the folder has no label and no data and ``create`` is False.

    Example
    -------
    >>> import tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> kw = dict(what="cache", error=ValueError, holds_data=lambda: False,
    ...     clear=lambda: None, how_to_write="build it")
    >>> check_label(folder, "meta.json", {"k": 8}, create=True, **kw)
    {'k': 8}
    >>> check_label(folder, "meta.json", {"k": 4}, **kw)
    Traceback (most recent call last):
    ...
    ValueError: cache in ... was written for other settings: k 8 != 4 (this run); use another folder, delete it, or rebuild it with overwrite=True (--overwrite)
    >>> check_label(folder, "meta.json", {"k": 4}, overwrite=True, **kw)
    {'k': 4}
    """
    folder = pathlib.Path(folder)
    describe = describe or (lambda key, value: repr(value))
    label_path = folder / label_name
    label = None
    if label_path.is_file():
        try:
            label = json.loads(label_path.read_text(encoding="utf-8"))
        except ValueError:
            label = {"version": f"<unreadable {label_name}>"}
    stale = None
    if label is not None:
        differ = [
            f"{key} {describe(key, label.get(key))} != {describe(key, value)}"
            for key, value in settings.items()
            if label.get(key) != value
        ]
        if differ:
            stale = (
                f"{what} in {folder} was written for other settings: "
                f"{'; '.join(differ)} (this run)"
            )
    elif holds_data():
        stale = (
            f"{what} in {folder} holds data but no {label_name} saying what "
            "wrote it"
        )
    elif not create:
        raise FileNotFoundError(
            f"no {what} in {folder} (no {label_name}); {how_to_write}"
        )
    if stale is not None:
        if not overwrite:
            raise error(
                stale + "; use another folder, delete it, or rebuild it "
                "with overwrite=True (--overwrite)"
            )
        logger.warning("%s: deleting and rebuilding", stale)
        clear()
        label = None
    if label is None:
        label = dict(settings)
        atomic_write_text(label_path, json.dumps(label, indent=1))
    return label
