"""Text to speech: espeak-ng, converted by sox to 16-kHz mono 16-bit wav.

The one TTS wrapper of the project (SynthSpeech, Audio-MLQA and the tests
that need real speech all call :func:`synthesise`).  espeak-ng writes a wav
to a pipe and sox converts it, without any intermediate file::

    espeak-ng -v VOICE[+VARIANT] [-s SPEED] [-p PITCH] --stdout -- TEXT |
        sox -q -t wav - -t wav -r 16000 -c 1 -b 16 -e signed-integer OUT vol 0.9

(``vol 0.9`` keeps the result from clipping.)  ``OUT`` is a temporary file
beside the destination that is renamed over it once the audio is checked,
so the destination either holds a complete wav or is absent.

Debian packages: ``espeak-ng sox`` (:data:`APT_HINT`).

Authors
 * speechbrain-blspkd contributors 2025
"""

import pathlib
import shutil
import signal
import subprocess
import tempfile

from speechbrain_blspkd.utils.atomic import atomic_path

__all__ = [
    "APT_HINT",
    "SAMPLE_RATE",
    "TTSError",
    "check_tools",
    "is_complete_wav",
    "missing_tools",
    "synthesise",
]

#: Sample rate of every synthesised wav.
SAMPLE_RATE = 16000
#: How to install the two programs on Debian/Ubuntu.
APT_HINT = "apt-get install -y --no-install-recommends espeak-ng sox"


class TTSError(RuntimeError):
    """espeak-ng or sox is missing, failed, or produced no audio."""


def missing_tools(espeak="espeak-ng", sox="sox"):
    """The TTS programs that cannot be found on ``PATH``.

    Arguments
    ---------
    espeak, sox : str
        The programs (names looked up on ``PATH``, or paths).

    Returns
    -------
    list of str
        The missing ones, in the order given (empty when both exist).

    Example
    -------
    >>> missing_tools("no-such-espeak", "no-such-sox")
    ['no-such-espeak', 'no-such-sox']
    """
    return [tool for tool in (espeak, sox) if shutil.which(tool) is None]


def check_tools(espeak="espeak-ng", sox="sox"):
    """Raise :class:`TTSError` naming every missing TTS program.

    Arguments
    ---------
    espeak, sox : str
        The programs to check.

    Example
    -------
    >>> check_tools("no-such-espeak")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.tts.TTSError: no-such-espeak not found; ...
    """
    missing = missing_tools(espeak, sox)
    if missing:
        raise TTSError(
            f"{' and '.join(missing)} not found; install "
            f"{'it' if len(missing) == 1 else 'them'} "
            f"(Debian: {APT_HINT})"
        )


def is_complete_wav(path):
    """Whether ``path`` holds audio as :func:`synthesise` writes it.

    That is a readable wav with at least one frame, 16 kHz, mono, 16-bit
    (what a rerun may reuse instead of synthesising again).

    Arguments
    ---------
    path : str or pathlib.Path
        The file to check (it may be absent).

    Returns
    -------
    bool

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.wav"
    >>> is_complete_wav(p)
    False
    >>> _ = p.write_bytes(b"RIFF")  # e.g. copied in half
    >>> is_complete_wav(p)
    False
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:
        return False
    return (
        info.frames > 0
        and info.samplerate == SAMPLE_RATE
        and info.channels == 1
        and info.subtype == "PCM_16"
    )


def synthesise(
    text,
    path,
    voice="en-us",
    variant=None,
    speed=None,
    pitch=None,
    volume=0.9,
    espeak="espeak-ng",
    sox="sox",
):
    """Speak ``text`` with espeak-ng into a 16-kHz mono 16-bit wav at ``path``.

    The file appears only when complete (written through a temporary file
    beside it, then renamed); missing parent folders are created.

    Arguments
    ---------
    text : str
        What to say (may start with ``-``).
    path : str or pathlib.Path
        Output wav.
    voice : str
        espeak-ng voice (``en-us``, ``de``, ``cmn`` ...).
    variant : str, optional
        Voice variant (``f1``, ``m3``, ``klatt`` ...: ``-v VOICE+VARIANT``).
    speed : int, optional
        Words per minute (espeak-ng ``-s``; its default is 175).
    pitch : int, optional
        Pitch, 0 to 99 (espeak-ng ``-p``; its default is 50).
    volume : float
        Gain sox applies (``vol``); below 1 keeps the result from clipping.
    espeak, sox : str
        The programs to run.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TTSError
        A program is missing (the message names it and the apt command),
        fails (the message names it, with its exit code and error output),
        or the result holds no 16-kHz mono 16-bit audio.

    Example
    -------
    >>> import tempfile, soundfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "hi.wav"
    >>> _ = synthesise("Hello there.", p, voice="en-us", variant="f1",
    ...     speed=160, pitch=50)
    >>> info = soundfile.info(str(p))
    >>> info.samplerate, info.channels, info.subtype
    (16000, 1, 'PCM_16')
    """
    check_tools(espeak, sox)
    path = pathlib.Path(path)
    what = f"speaking {text[:40]!r} to {path.name}"
    speak = [espeak, "-v", f"{voice}+{variant}" if variant else voice]
    if speed is not None:
        speak += ["-s", str(int(speed))]
    if pitch is not None:
        speak += ["-p", str(int(pitch))]
    speak += ["--stdout", "--", text]
    with atomic_path(path) as tmp:
        convert = [sox, "-q", "-t", "wav", "-", "-t", "wav"]
        convert += ["-r", str(SAMPLE_RATE), "-c", "1", "-b", "16"]
        convert += ["-e", "signed-integer", str(tmp), "vol", str(volume)]
        with tempfile.TemporaryFile() as speak_err:
            try:
                p1 = subprocess.Popen(
                    speak, stdout=subprocess.PIPE, stderr=speak_err
                )
            except FileNotFoundError:
                raise TTSError(
                    f"{espeak} not found; install it (Debian: {APT_HINT})"
                ) from None
            try:
                p2 = subprocess.run(
                    convert, stdin=p1.stdout, capture_output=True
                )
            except FileNotFoundError:
                p1.kill()
                raise TTSError(
                    f"{sox} not found; install it (Debian: {APT_HINT})"
                ) from None
            finally:
                p1.stdout.close()
                rc1 = p1.wait()
            speak_err.seek(0)
            err1 = speak_err.read().decode("utf-8", "replace").strip()
        # espeak-ng killed by SIGPIPE is the echo of a sox failure
        broken_pipe = rc1 == -signal.SIGPIPE and p2.returncode != 0
        if rc1 != 0 and not broken_pipe:
            raise TTSError(
                f"{espeak} failed while {what} (exit {rc1}): {err1[-300:]}"
            )
        if p2.returncode != 0:
            err2 = p2.stderr.decode("utf-8", "replace").strip()
            raise TTSError(
                f"{sox} failed while {what} (exit {p2.returncode}): "
                f"{err2[-300:]}"
            )
        if not is_complete_wav(tmp):
            raise TTSError(
                f"{espeak} | {sox} gave no 16-kHz mono 16-bit audio while "
                f"{what}"
            )
    return path
