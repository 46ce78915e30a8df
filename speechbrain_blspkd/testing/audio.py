"""Fake audio for tests: speech-like clips and their manifests, and
whether piper can speak here.

Not part of the library's public API (see :mod:`speechbrain_blspkd.utils.
testing`).
"""


def piper_unavailable():
    """Why piper synthesis cannot run here, or None when it can.

    For the ``skipif`` of the tests that speak with piper
    (:func:`speechbrain_blspkd.dataprep.tts.synthesise_piper`): the Python
    packages ``piper`` (PyPI ``piper-tts``), ``onnxruntime`` and the voice
    package must import, and ``sox`` must be on ``PATH``.

    Returns
    -------
    str or None

    Example
    -------
    >>> reason = piper_unavailable()
    >>> reason is None or reason.startswith("piper cannot run")
    True
    """
    import importlib.util
    import shutil

    from speechbrain_blspkd.dataprep.tts import PIPER_REQUIREMENT, PIPER_VOICES

    module, requirement = PIPER_VOICES["joe"]
    missing = [
        name
        for name in ("piper", "onnxruntime", module)
        if importlib.util.find_spec(name) is None
    ]
    if shutil.which("sox") is None:
        missing.append("sox (Debian package)")
    if not missing:
        return None
    return (
        f"piper cannot run: missing {', '.join(missing)} "
        f"(pip install {PIPER_REQUIREMENT} {requirement})"
    )


def write_speechlike_wav(path, seconds, seed=0, pitch=220.0, sample_rate=16000):
    """Write a speech-like test clip: a modulated tone plus a little noise.

    Arguments
    ---------
    path : str or pathlib.Path
        Destination (16-bit-range float samples, mono).
    seconds : float
        Duration.
    seed : int
        Seed of the noise.
    pitch : float
        Tone frequency (Hz).
    sample_rate : int
        Samples per second.

    Returns
    -------
    str or pathlib.Path
        ``path``.

    Example
    -------
    >>> import tempfile, pathlib, soundfile
    >>> p = write_speechlike_wav(pathlib.Path(tempfile.mkdtemp()) / "a.wav", 0.5)
    >>> soundfile.info(str(p)).frames
    8000
    """
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    envelope = 1 + np.sin(2 * np.pi * 3 * t)
    tone = 0.3 * np.sin(2 * np.pi * pitch * t) * envelope
    data = (tone / 2 + 0.02 * rng.standard_normal(t.size)).astype("float32")
    sf.write(str(path), data, sample_rate)
    return path


def write_speech_manifest(folder, transcripts, name="test.csv", **columns):
    """Speech-like clips (0.3 s, 0.4 s, ...) of ``transcripts`` and their
    manifest ``folder/name`` (``$data_root`` is ``folder``).

    Arguments
    ---------
    folder : pathlib.Path
        Where the clips ``u<k>.wav`` and the manifest go.
    transcripts : list of str
        One utterance ``u<k>`` each (English, speaker ``s``).
    name : str
        Manifest file name.
    **columns
        Extra columns: ``column=[value per utterance]``.

    Returns
    -------
    pathlib.Path
        The manifest.

    Example
    -------
    >>> import tempfile, pathlib
    >>> from speechbrain_blspkd.dataio.manifest import read_manifest
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> path = write_speech_manifest(folder, ["hi", "yo"], answer=["a", "b"])
    >>> [(r["ID"], r["answer"]) for r in read_manifest(path)]
    [('u0', 'a'), ('u1', 'b')]
    """
    from speechbrain_blspkd.dataio.manifest import write_manifest

    rows = []
    for k, text in enumerate(transcripts):
        seconds = 0.3 + 0.1 * k
        write_speechlike_wav(folder / f"u{k}.wav", seconds, seed=k)
        row = dict(
            ID=f"u{k}",
            wav=f"$data_root/u{k}.wav",
            duration=seconds,
            transcript=text,
            language="en",
            speaker="s",
        )
        row.update({key: values[k] for key, values in columns.items()})
        rows.append(row)
    write_manifest(folder / name, rows)
    return folder / name


def write_clip_folder(tsv_name, tsv_text, clip="c1.wav", frames=4000, name=""):
    """A Common Voice-like folder: one silent clip in ``clips/`` and a tsv.

    Arguments
    ---------
    tsv_name : str
        File name of the tsv (``dev.tsv``, ``covost_v2.fr_en.tsv`` ...).
    tsv_text : str
        Its content.
    clip : str
        File name of the clip (16 kHz wav).
    frames : int
        Its length in samples.
    name : str
        Name of the folder inside a new temporary folder (``de``); empty:
        the temporary folder itself.

    Returns
    -------
    pathlib.Path
        The folder.

    Example
    -------
    >>> d = write_clip_folder("t.tsv", "path\\nc1.wav\\n", name="de")
    >>> d.name, sorted(p.name for p in (d / "clips").iterdir())
    ('de', ['c1.wav'])
    """
    import pathlib
    import tempfile

    import numpy as np
    import soundfile as sf

    folder = pathlib.Path(tempfile.mkdtemp()) / name
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    sf.write(folder / "clips" / clip, np.zeros(frames, "float32"), 16000)
    (folder / tsv_name).write_text(tsv_text, encoding="utf-8")
    return folder
