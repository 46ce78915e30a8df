"""Where a model source is: a local folder, or the folder of an asset.

:func:`resolve_source` is the one place the library turns a base-model
source (what ``llm_source``, ``encoder_source``, ``transcriber_source`` of
a ``hyperparams.yaml``, or a command line's ``--llm``, ``--whisper``,
name) into a local transformers folder: an existing folder is taken as it
is, a name of :data:`speechbrain_blspkd.assets.ASSETS` is fetched on first
use (:func:`speechbrain_blspkd.assets.asset_path`).

Usable from HyperPyYAML:
``!apply:speechbrain_blspkd.assets.paths.resolve_source [whisper-base]``.

Authors
 * speechbrain-blspkd contributors 2025
"""

import pathlib

__all__ = ["resolve_source"]


def resolve_source(name_or_path):
    """A local folder path as is, else the folder of the asset so named.

    Arguments
    ---------
    name_or_path : str or pathlib.Path
        An existing folder, or an asset name of
        :data:`speechbrain_blspkd.assets.ASSETS` (fetched on first use).

    Returns
    -------
    pathlib.Path
        The local folder (an asset's once it is installed).

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> resolve_source(folder) == pathlib.Path(folder)
    True
    >>> resolve_source("no-such-model")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model source 'no-such-model' is neither a folder nor a known asset (whisper-base, ...)
    """
    if name_or_path is None or str(name_or_path) == "":
        raise ValueError("model source is empty (give a folder or an asset)")
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from speechbrain_blspkd.assets.fetch import ASSETS, asset_path

    name = str(name_or_path)
    if name in ASSETS:
        return asset_path(name)
    raise FileNotFoundError(
        f"model source {name!r} is neither a folder nor a known asset "
        f"({', '.join(ASSETS)})"
    )
