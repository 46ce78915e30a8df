"""Reader and writer for CTranslate2 ``model.bin`` files.

CTranslate2 stores a model as one little-endian binary file:

* ``u32`` format version, a string with the spec name, ``u32`` spec revision;
* ``u32`` variable count, then per variable: string name, ``u8`` rank,
  ``rank`` x ``u32`` shape, ``u8`` dtype, ``u32`` byte count, raw data;
* ``u32`` alias count, then (alias, target) string pairs.

A string is a ``u16`` length (counting a trailing NUL) followed by the bytes.
Dtype codes: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Weights quantised to int8/int16 come with a ``<prefix>/weight_scale``
variable (one scale per output row); :func:`dequantize` turns them back into
floats (``weight = quantised / scale``).
"""

import dataclasses
import pathlib
import struct

import torch

from speechbrain_blspkd.utils.cache_label import tensor_bytes

DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class CT2FormatError(ValueError):
    """A CTranslate2 ``model.bin`` is truncated, corrupt or unsupported."""


@dataclasses.dataclass
class CT2Model:
    """The content of a CTranslate2 ``model.bin``.

    Arguments
    ---------
    variables : dict
        Variable name -> tensor (in file order).
    aliases : dict
        Alias name -> name of the variable it refers to.
    spec : str
        The model spec name, e.g. ``"WhisperSpec"``.
    revision : int
        The spec revision.
    version : int
        The binary format version.

    Example
    -------
    >>> m = CT2Model({"a/weight": torch.ones(2, 3)}, {"b": "a/weight"})
    >>> m.get("b").shape
    torch.Size([2, 3])
    """

    variables: dict
    aliases: dict = dataclasses.field(default_factory=dict)
    spec: str = ""
    revision: int = 1
    version: int = 6

    def get(self, name):
        """Return the variable ``name``, following aliases.

        Arguments
        ---------
        name : str
            Variable or alias name.

        Returns
        -------
        torch.Tensor

        Example
        -------
        >>> CT2Model({"x": torch.zeros(1)}).get("x")
        tensor([0.])
        """
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:
                raise CT2FormatError(f"alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        if name not in self.variables:
            raise KeyError(f"CTranslate2 model has no variable {name!r}")
        return self.variables[name]

    def __contains__(self, name):
        return name in self.variables or name in self.aliases


class _Reader:
    """Sequential little-endian reader that names the file in its errors."""

    def __init__(self, data, path):
        self.data = data
        self.pos = 0
        self.path = path
        self.where = "header"

    def take(self, n):
        if self.pos + n > len(self.data):
            raise CT2FormatError(
                f"{self.path}: truncated or corrupt CTranslate2 file while "
                f"reading {self.where} at byte offset {self.pos} (needs {n} "
                f"bytes, {len(self.data) - self.pos} left)"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt):
        fmt = "<" + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self):
        (length,) = self.unpack("H")
        raw = self.take(length)
        if length == 0 or raw[-1] != 0:
            raise CT2FormatError(
                f"{self.path}: string without NUL terminator while reading "
                f"{self.where} at byte offset {self.pos - length}"
            )
        try:
            return bytes(raw[:-1]).decode("utf-8")
        except UnicodeDecodeError as err:
            raise CT2FormatError(
                f"{self.path}: invalid UTF-8 string while reading "
                f"{self.where} at byte offset {self.pos - length}"
            ) from err


def parse_ct2(data, path="<bytes>"):
    """Parse the bytes of a CTranslate2 ``model.bin``.

    Arguments
    ---------
    data : bytes or bytearray or memoryview
        The whole file content.
    path : str
        Name used in error messages.

    Returns
    -------
    CT2Model

    Example
    -------
    >>> blob = ct2_bytes(CT2Model({"w": torch.arange(3, dtype=torch.int32)}))
    >>> parse_ct2(blob).variables["w"]
    tensor([0, 1, 2], dtype=torch.int32)
    """
    reader = _Reader(memoryview(data), path)
    (version,) = reader.unpack("I")
    if version < 2 or version > 6:
        raise CT2FormatError(
            f"{path}: unsupported CTranslate2 binary version {version} "
            "(this reader handles 2..6)"
        )
    spec = reader.string()
    (revision,) = reader.unpack("I")
    (count,) = reader.unpack("I")
    variables = {}
    for index in range(count):
        reader.where = f"variable #{index}"
        name = reader.string()
        reader.where = f"variable #{index} {name!r}"
        (rank,) = reader.unpack("B")
        shape = reader.unpack("I" * rank)
        if version >= 4:
            code, nbytes = reader.unpack("BI")
            if code not in DTYPES:
                raise CT2FormatError(
                    f"{path}: unknown dtype code {code} for variable "
                    f"{name!r} at byte offset {reader.pos - 5}"
                )
            dtype = DTYPES[code]
        else:  # versions 2-3 store the item size and an element count
            itemsize, numel = reader.unpack("BI")
            dtype = {4: torch.float32, 1: torch.int8, 2: torch.int16}.get(
                itemsize
            )
            if dtype is None:
                raise CT2FormatError(
                    f"{path}: unsupported item size {itemsize} for {name!r}"
                )
            nbytes = itemsize * numel
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for dim in shape:
            numel *= dim
        if nbytes != numel * itemsize:
            raise CT2FormatError(
                f"{path}: variable {name!r} declares {nbytes} bytes but its "
                f"shape {tuple(shape)} and dtype {dtype} need "
                f"{numel * itemsize} (byte offset {reader.pos})"
            )
        raw = bytearray(reader.take(nbytes))
        if nbytes:
            tensor = torch.frombuffer(raw, dtype=dtype)
        else:
            tensor = torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(shape)
    aliases = {}
    if version >= 3:
        reader.where = "alias table"
        (count,) = reader.unpack("I")
        for index in range(count):
            reader.where = f"alias #{index}"
            alias = reader.string()
            target = reader.string()
            aliases[alias] = target
    if reader.pos != len(reader.data):
        raise CT2FormatError(
            f"{path}: {len(reader.data) - reader.pos} unexpected trailing "
            f"bytes after the alias table (byte offset {reader.pos})"
        )
    return CT2Model(variables, aliases, spec, revision, version)


def read_ct2(path):
    """Read a CTranslate2 ``model.bin`` (or several parts joined in order).

    Arguments
    ---------
    path : str or pathlib.Path or list
        The file, or a list of files whose concatenation is the model.

    Returns
    -------
    CT2Model

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "model.bin"
    >>> write_ct2(p, CT2Model({"x": torch.ones(2)}, spec="TestSpec"))
    >>> read_ct2(p).spec
    'TestSpec'
    """
    if isinstance(path, (list, tuple)):
        paths = [pathlib.Path(p) for p in path]
        data = b"".join(p.read_bytes() for p in paths)
        name = "+".join(str(p) for p in paths)
    else:
        data = pathlib.Path(path).read_bytes()
        name = str(path)
    return parse_ct2(data, name)


def _pack_string(text):
    raw = text.encode("utf-8") + b"\0"
    if len(raw) > 0xFFFF:
        raise ValueError(f"CTranslate2 string too long: {text[:40]!r}...")
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(model):
    """Serialise a :class:`CT2Model` to bytes (binary version 6).

    Arguments
    ---------
    model : CT2Model

    Returns
    -------
    bytes

    Example
    -------
    >>> len(ct2_bytes(CT2Model({}))) > 0
    True
    """
    out = [struct.pack("<I", 6), _pack_string(model.spec)]
    out.append(struct.pack("<II", model.revision, len(model.variables)))
    for name, tensor in model.variables.items():
        tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
        if tensor.dtype not in DTYPE_CODES:
            raise ValueError(
                f"variable {name!r}: dtype {tensor.dtype} has no CTranslate2 "
                "code"
            )
        out.append(_pack_string(name))
        out.append(
            struct.pack(f"<B{tensor.dim()}I", tensor.dim(), *tensor.shape)
        )
        raw = tensor_bytes(tensor)
        out.append(struct.pack("<BI", DTYPE_CODES[tensor.dtype], len(raw)))
        out.append(raw)
    out.append(struct.pack("<I", len(model.aliases)))
    for alias, target in model.aliases.items():
        out.append(_pack_string(alias) + _pack_string(target))
    return b"".join(out)


def write_ct2(path, model):
    """Write a :class:`CT2Model` to ``path`` atomically.

    Arguments
    ---------
    path : str or pathlib.Path
    model : CT2Model

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "model.bin"
    >>> write_ct2(p, CT2Model({"x": torch.ones(2, dtype=torch.bfloat16)}))
    >>> read_ct2(p).variables["x"].dtype
    torch.bfloat16
    """
    from speechbrain_blspkd.utils.atomic import atomic_write_bytes

    atomic_write_bytes(path, ct2_bytes(model))


def dequantize(model, dtype=torch.float32):
    """Return ``name -> float tensor`` with quantised weights de-quantised.

    Every ``<prefix>/weight`` stored as int8/int16 with a sibling
    ``<prefix>/weight_scale`` becomes ``weight / scale`` (one scale per row,
    or a scalar); the scale variables are dropped. Other floating variables
    are cast to ``dtype``; integer variables (flags, head counts) are kept.

    Arguments
    ---------
    model : CT2Model
    dtype : torch.dtype
        Floating dtype of the result.

    Returns
    -------
    dict

    Example
    -------
    >>> m = CT2Model({"l/weight": torch.tensor([[64, -127]], dtype=torch.int8),
    ...               "l/weight_scale": torch.tensor([127.0])})
    >>> dequantize(m)["l/weight"]
    tensor([[ 0.5039, -1.0000]])
    """
    out = {}
    for name, tensor in model.variables.items():
        if name.endswith("/weight_scale"):
            continue
        scale_name = name + "_scale" if name.endswith("/weight") else None
        if scale_name and scale_name in model.variables:
            if tensor.is_floating_point():
                raise CT2FormatError(
                    f"{name!r} has a weight_scale but is stored as "
                    f"{tensor.dtype}, expected an integer type"
                )
            scale = model.variables[scale_name].to(dtype)
            if scale.dim() == 1:
                scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))
            out[name] = tensor.to(dtype) / scale
        elif tensor.is_floating_point():
            out[name] = tensor.to(dtype)
        else:
            out[name] = tensor
    return out
