"""Make torchaudio usable beside a CPU-only torch (an explicit install step).

Every torchaudio wheel on PyPI for Linux is a CUDA build: its compiled
extensions (``torchaudio/lib/*.so``) link against ``libc10_cuda`` and fail to
load when torch is the CPU build.  The pure-Python parts that this project
and speechbrain use (``compliance.kaldi.fbank``, ``functional.resample``,
``transforms.MelSpectrogram``) do not need them.  This step moves the
extensions aside into ``torchaudio/lib/disabled-cuda-ext/`` so that
``import torchaudio`` no longer tries to load them.  The operators that need
them (``forced_align``, ``rnnt_loss``) are then unavailable; audio I/O goes
through soundfile anyway.

The step does nothing when torch has CUDA or when the extensions load, and
is idempotent: run it again after reinstalling torchaudio.

Usage: ``python tools/fix_torchaudio.py [--check]``
"""

import argparse
import ctypes
import importlib.util
import pathlib
import sys


def _torchaudio_lib():
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        sys.exit("fix_torchaudio: torchaudio is not installed")
    return pathlib.Path(spec.origin).parent / "lib"


def _loads(path):
    """True when the shared object at ``path`` loads in this process."""
    try:
        ctypes.CDLL(str(path))
        return True
    except OSError:
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only report, change nothing"
    )
    args = parser.parse_args(argv)

    import torch  # noqa: F401  (loads libc10 so the check below is fair)

    lib = _torchaudio_lib()
    aside = lib / "disabled-cuda-ext"
    exts = sorted(lib.glob("*.so"))
    broken = [p for p in exts if not _loads(p)]
    if torch.version.cuda is not None:
        print(
            f"fix_torchaudio: torch {torch.__version__} has CUDA; nothing to do"
        )
    elif not broken:
        state = "moved aside earlier" if aside.exists() else "load fine"
        print(f"fix_torchaudio: torchaudio extensions {state}; nothing to do")
    elif args.check:
        print(
            "fix_torchaudio: would move aside: "
            + ", ".join(p.name for p in broken)
        )
        return 1
    else:
        aside.mkdir(exist_ok=True)
        for p in exts:
            p.rename(aside / p.name)
        print(
            f"fix_torchaudio: moved {len(exts)} CUDA-only extension(s) to {aside}"
        )

    # Prove that what we rely on works.
    import torchaudio

    wav = torch.randn(1, 16000)
    feats = torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80)
    res = torchaudio.functional.resample(wav, 16000, 8000)
    assert feats.shape[-1] == 80 and res.shape[-1] == 8000
    print("fix_torchaudio: fbank and resample work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
