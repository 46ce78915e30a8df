"""What ``blspkd-infer`` answers: its inputs, gathered and batched.

:func:`collect_inputs` turns the ``--wav``, ``--wav-list``, ``--manifest``
and ``--text`` arguments into :class:`Input` records (each id once, in
order); :func:`probe_audio` checks an audio file before the model loads;
:func:`length_sorted_batches` groups inputs of similar length. A
``--wav-list`` or ``--manifest`` that cannot be read raises
:class:`InputError`.

Authors
 * speechbrain-blspkd contributors 2025
"""

import dataclasses
import logging
import pathlib

__all__ = [
    "Input",
    "InputError",
    "collect_inputs",
    "length_sorted_batches",
    "probe_audio",
    "read_wav_list",
]

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A ``--wav-list`` or ``--manifest`` cannot be read."""


@dataclasses.dataclass
class Input:
    """One thing to answer.

    Arguments
    ---------
    id : str
        Its id in the output (resuming skips ids already written).
    file : str, optional
        The audio file (None for a transcript).
    text : str, optional
        The transcript (for a text input).
    instruction : str, optional
        Its own instruction (None: ``--instruction`` or the model's).
    seconds : float, optional
        Audio duration, once known.
    wav : torch.Tensor, optional
        The loaded audio while its batch is decoded.
    """

    id: str
    file: str = None
    text: str = None
    instruction: str = None
    seconds: float = None
    wav: object = dataclasses.field(default=None, repr=False)


def read_wav_list(path):
    """The audio paths of a ``--wav-list`` file.

    Arguments
    ---------
    path : str or pathlib.Path
        Text file: one path a line; blank lines and ``#`` comments skipped.

    Returns
    -------
    list of str
        The paths, in the file's order.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "list.txt"
    >>> _ = p.write_text("# mine\\na.wav\\n\\n  b c.wav  \\n")
    >>> read_wav_list(p)
    ['a.wav', 'b c.wav']
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: wav list not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the wav list ({err})") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def collect_inputs(
    wavs=(), wav_lists=(), manifests=(), texts=(), data_root=None
):
    """Every input of a command line, in order, each id once.

    Arguments
    ---------
    wavs : list of str
        ``--wav`` paths.
    wav_lists : list of str
        ``--wav-list`` files.
    manifests : list of str
        ``--manifest`` CSV files.
    texts : list of str
        ``--text`` transcripts.
    data_root : str, optional
        ``$data_root`` of the manifests (default: each manifest's folder).

    Returns
    -------
    list of Input

    Raises
    ------
    InputError
        A wav list or manifest cannot be read (the message names it).

    Example
    -------
    >>> [i.id for i in collect_inputs(["a.wav", "b.wav", "a.wav"],
    ...     texts=["hello"])]
    ['a.wav', 'b.wav', 'hello']
    """
    from speechbrain_blspkd.dataio.manifest import ManifestError, read_manifest

    found = [Input(id=str(w), file=str(w)) for w in wavs]
    for path in wav_lists:
        found += [Input(id=w, file=w) for w in read_wav_list(path)]
    for path in manifests:
        root = data_root
        if root is None:
            root = str(pathlib.Path(path).resolve().parent)
        try:
            rows = read_manifest(path, data_root=root)
        except ManifestError as err:
            raise InputError(str(err)) from None
        for row in rows:
            found.append(
                Input(
                    id=row["ID"],
                    file=row["wav"],
                    instruction=(row.get("instruction") or "").strip() or None,
                    seconds=row["duration"],
                )
            )
    found += [Input(id=str(t), text=str(t)) for t in texts]
    seen, out = set(), []
    for item in found:
        if item.id in seen:
            logger.warning("%s: given more than once; answered once", item.id)
            continue
        seen.add(item.id)
        out.append(item)
    return out


def length_sorted_batches(items, batch_size):
    """Batches of at most ``batch_size`` items, longest first.

    Arguments
    ---------
    items : list of Input
        Each with ``seconds`` (audio) or ``text``.
    batch_size : int
        Largest batch.

    Returns
    -------
    list of list of Input

    Example
    -------
    >>> items = [Input(str(s), file="x", seconds=s) for s in (1, 5, 3, 4)]
    >>> [[i.seconds for i in b] for b in length_sorted_batches(items, 3)]
    [[5, 4, 3], [1]]
    """

    def length(item):
        if item.text is not None:
            return len(item.text)
        return item.seconds or 0.0

    ordered = sorted(items, key=length, reverse=True)
    return [
        ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)
    ]


def probe_audio(item):
    """Fill ``item.seconds`` from the audio header; an error message or None."""
    import soundfile

    path = pathlib.Path(item.file)
    if not path.is_file():
        return f"{path}: audio file not found"
    try:
        info = soundfile.info(str(path))
    except Exception as err:  # soundfile raises several types
        return f"{path}: cannot read audio ({err})"
    if not info.frames:
        return f"{path}: zero-length audio"
    item.seconds = info.frames / float(info.samplerate)
    return None
