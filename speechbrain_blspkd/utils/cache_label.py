"""The label of a cache folder: the settings that wrote it, checked on reuse.

A cache built once and reused across runs (stored teachers, token
timings) is only valid for the settings that wrote it.  Its folder holds a
small JSON label with those settings.  Each such cache derives from
:class:`LabelledFolder`, whose :meth:`~LabelledFolder.check_label`
compares the label with this run's settings, refuses a folder written for
other settings (or holding data without a label) with an error that names
every difference, rebuilds it when told to, and labels a new folder.
Weights go into a label as a checksum: :func:`hash_tensors` feeds a
model's tensors to a hash (:func:`tensor_bytes` is the raw bytes each
tensor contributes).

Authors
 * speechbrain-blspkd contributors 2026
"""

import json
import logging

import torch

from speechbrain_blspkd.utils.atomic import atomic_write_text

__all__ = ["LabelledFolder", "hash_tensors", "tensor_bytes"]

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


class LabelledFolder:
    """A cache folder labelled with the settings that wrote it.

    A subclass names its kind of cache in four class attributes and says
    what its data is by overriding :meth:`holds_data` and :meth:`clear`
    (and :meth:`describe` to shorten long values in messages); its
    constructor sets ``self.folder`` and calls :meth:`check_label` with
    this run's settings.

    Attributes
    ----------
    label_name : str
        File name of the label in the folder (JSON).
    what : str
        What the folder holds, for messages (e.g. ``"teacher cache"``).
    error : type
        Exception class raised for a stale folder.
    how_to_write : str
        Told when the folder is missing and ``create`` is False;
        ``{folder}`` is replaced by the folder.
    folder : pathlib.Path
        The cache folder (set by the subclass).

    Example
    -------
    >>> import pathlib, tempfile
    >>> class Notes(LabelledFolder):
    ...     what, error, how_to_write = "notes", ValueError, "write {folder}"
    ...     def __init__(self, folder, settings, **kw):
    ...         self.folder = pathlib.Path(folder)
    ...         self.label = self.check_label(settings, **kw)
    ...     def holds_data(self):
    ...         return (self.folder / "notes.txt").is_file()
    ...     def clear(self):
    ...         (self.folder / "notes.txt").unlink()
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> Notes(folder, {"k": 8}, create=True).label
    {'k': 8}
    >>> _ = (folder / "notes.txt").write_text("x")
    >>> Notes(folder, {"k": 4})
    Traceback (most recent call last):
    ...
    ValueError: notes in ... was written for other settings: k 8 != 4 (this run); use another folder, delete it, or rebuild it with overwrite=True (--overwrite)
    >>> Notes(folder, {"k": 4}, overwrite=True).label
    {'k': 4}
    >>> (folder / "notes.txt").exists()
    False
    """

    label_name = "meta.json"
    what = "cache"
    error = ValueError
    how_to_write = ""

    def holds_data(self):
        """Whether the folder holds cached data (unlabelled data is stale)."""
        raise NotImplementedError

    def clear(self):
        """Delete the cached data (``overwrite`` of a stale folder)."""
        raise NotImplementedError

    def describe(self, key, value):
        """How the value of setting ``key`` is shown in messages."""
        return repr(value)

    def check_label(self, settings, create=False, overwrite=False):
        """Check (or write) the folder's label; return the label.

        Arguments
        ---------
        settings : dict
            This run's settings (JSON values).
        create : bool
            Label a new (empty) folder instead of refusing it.
        overwrite : bool
            Clear a stale folder and relabel it instead of refusing it.

        Returns
        -------
        dict
            The folder's label (this run's settings when newly written).

        Raises
        ------
        error
            When the folder was written for other settings, or holds data
            but no label, and ``overwrite`` is False.
        FileNotFoundError
            When the folder has no label and no data and ``create`` is
            False.
        """
        label_path = self.folder / self.label_name
        label = None
        if label_path.is_file():
            try:
                label = json.loads(label_path.read_text(encoding="utf-8"))
            except ValueError:
                label = {"version": f"<unreadable {self.label_name}>"}
        stale = None
        if label is not None:
            differ = [
                f"{key} {self.describe(key, label.get(key))} != "
                f"{self.describe(key, value)}"
                for key, value in settings.items()
                if label.get(key) != value
            ]
            if differ:
                stale = (
                    f"{self.what} in {self.folder} was written for other "
                    f"settings: {'; '.join(differ)} (this run)"
                )
        elif self.holds_data():
            stale = (
                f"{self.what} in {self.folder} holds data but no "
                f"{self.label_name} saying what wrote it"
            )
        elif not create:
            how_to_write = self.how_to_write.format(folder=self.folder)
            raise FileNotFoundError(
                f"no {self.what} in {self.folder} (no {self.label_name}); "
                f"{how_to_write}"
            )
        if stale is not None:
            if not overwrite:
                raise self.error(
                    stale + "; use another folder, delete it, or rebuild it "
                    "with overwrite=True (--overwrite)"
                )
            logger.warning("%s: deleting and rebuilding", stale)
            self.clear()
            label = None
        if label is None:
            label = dict(settings)
            atomic_write_text(label_path, json.dumps(label, indent=1))
        return label
