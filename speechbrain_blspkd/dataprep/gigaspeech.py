"""GigaSpeech manifests, with the long recordings cut into utterance files.

GigaSpeech describes every recording in ``<data_folder>/GigaSpeech.json``::

    {"audios": [{"aid": "YOU0000000315",
                 "path": "audio/youtube/P0000/YOU0000000315.opus",
                 "segments": [{"sid": "YOU0000000315_S0000660",
                               "begin_time": 2.5, "end_time": 4.6,
                               "text_tn": "AS THEY'RE LEAVING <COMMA> ...",
                               "subsets": ["{XL}", "{L}"]}, ...]}, ...]}

Subsets are ``{XS}``, ``{S}``, ``{M}``, ``{L}``, ``{XL}`` (each training
subset contains the smaller ones), ``{DEV}`` and ``{TEST}``.  The manifest
schema has one audio file per row and no start/stop columns, so every
selected segment is cut from its recording, down-mixed, resampled to
``sample_rate`` and written (atomically) as 16-bit PCM
``<segment_folder>/<aid>/<sid>.wav``; ``segment_folder`` (default
``<save_folder>/segments``) is what ``$data_root`` stands for in these
manifests.  Segments already written with the right rate and length are
reused, so an interrupted run resumes.

Transcripts: the punctuation tags ``<COMMA> <PERIOD> <QUESTIONMARK>
<EXCLAMATIONPOINT>`` become ``, . ? !`` (or are dropped with
``punctuation=False``), the garbage tags ``<SIL> <MUSIC> <NOISE> <OTHER>``
are dropped, and segments left without words are skipped.  Text is
lower-cased unless ``lowercase=False``.

Audio is read with soundfile: libsndfile >= 1.0.29 decodes the released
Opus files; wav and flac recordings work as well.

One manifest per subset goes to ``<save_folder>/<subset>.csv`` with the
subset name in lower case (``xs.csv``, ``dev.csv``, ``test.csv``).

Command line::

    python -m speechbrain_blspkd.dataprep.gigaspeech GigaSpeech SAVE \\
        --splits XS DEV TEST
"""

import logging
import math
import pathlib

import numpy as np
import soundfile as sf
import torch

from speechbrain_blspkd.dataprep.common import (
    PrepareError,
    check_folder,
    check_splits,
    load_json,
    manifest_row,
    require_key,
)
from speechbrain_blspkd.dataprep.preparation import (
    prepare_corpus,
    prepare_parser,
    run_parsed,
)
from speechbrain_blspkd.utils.atomic import atomic_path

logger = logging.getLogger(__name__)

CORPUS = "gigaspeech"
SUBSETS = ("XS", "S", "M", "L", "XL", "DEV", "TEST")
DEFAULT_SPLITS = ("XS", "DEV", "TEST")
PUNCTUATION = {
    "<COMMA>": ",",
    "<PERIOD>": ".",
    "<QUESTIONMARK>": "?",
    "<EXCLAMATIONPOINT>": "!",
}
GARBAGE = ("<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>")
#: Seconds a segment may run past the end of its recording (then clipped).
END_TOLERANCE = 0.1


def normalise_text(text_tn, punctuation=True, lowercase=True, where=""):
    """Turn a GigaSpeech ``text_tn`` into a plain transcript.

    Arguments
    ---------
    text_tn : str
        Upper-case text with ``<TAG>`` tokens.
    punctuation : bool
        Turn punctuation tags into marks (else drop them).
    lowercase : bool
        Lower-case the words.
    where : str
        Location for error messages.

    Returns
    -------
    str
        Possibly empty (a garbage-only segment).

    Example
    -------
    >>> normalise_text("WELL <COMMA> HELLO THERE <QUESTIONMARK>")
    'well, hello there?'
    >>> normalise_text("<MUSIC>")
    ''
    """
    words = []
    for token in text_tn.split():
        if token.startswith("<") and token.endswith(">"):
            if token in GARBAGE:
                continue
            if token not in PUNCTUATION:
                raise PrepareError(f"{where}: unknown tag {token} in text_tn")
            if punctuation and words:
                words[-1] += PUNCTUATION[token]
            continue
        words.append(token.lower() if lowercase else token)
    return " ".join(words)


def prepare_gigaspeech(
    data_folder,
    save_folder,
    splits=DEFAULT_SPLITS,
    skip_prep=False,
    segment_folder=None,
    sample_rate=16000,
    punctuation=True,
    lowercase=True,
):
    """Write ``<save_folder>/<subset>.csv`` and the segment wav files.

    Arguments
    ---------
    data_folder : str or pathlib.Path
        The GigaSpeech folder (``GigaSpeech.json`` and the audio it names).
    save_folder : str or pathlib.Path
        Where the manifests (and the options record) go.
    splits : str or list of str
        Subsets among :data:`SUBSETS` (case-insensitive, braces optional).
    skip_prep : bool
        Do nothing at all (SpeechBrain convention).
    segment_folder : str or pathlib.Path, optional
        Where utterance wavs go; ``$data_root`` of the manifests.
        Default: ``<save_folder>/segments``.
    sample_rate : int
        Rate of the written segments.
    punctuation : bool
        Keep punctuation (from the tags) in the transcripts.
    lowercase : bool
        Lower-case the transcripts.

    Returns
    -------
    dict
        Subset name -> manifest path (empty when ``skip_prep``).

    Example
    -------
    >>> import tempfile, pathlib, json, numpy, soundfile
    >>> data = pathlib.Path(tempfile.mkdtemp())
    >>> soundfile.write(data / "rec.wav", numpy.zeros(32000), 16000)
    >>> meta = {"audios": [{"aid": "A1", "path": "rec.wav", "segments": [
    ...     {"sid": "A1_S1", "begin_time": 0.5, "end_time": 1.25,
    ...      "text_tn": "HI <PERIOD>", "subsets": ["{DEV}"]}]}]}
    >>> _ = (data / "GigaSpeech.json").write_text(json.dumps(meta))
    >>> out = prepare_gigaspeech(data, data / "save", splits=["DEV"])
    >>> from speechbrain_blspkd.dataio.manifest import read_manifest
    >>> row = read_manifest(out["DEV"])[0]
    >>> row["wav"], row["duration"], row["transcript"]
    ('$data_root/A1/A1_S1.wav', 0.75, 'hi.')
    """
    if skip_prep:
        return {}
    if isinstance(splits, str):
        splits = [splits]
    splits = [str(s).strip().strip("{}").upper() for s in splits]
    splits = check_splits(splits, SUBSETS)
    data_folder = check_folder(data_folder, "GigaSpeech data folder")
    save_folder = pathlib.Path(save_folder)
    segment_folder = pathlib.Path(segment_folder or save_folder / "segments")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise PrepareError(
            f"sample_rate must be a positive integer, got {sample_rate}"
        )
    options = {
        "data_folder": data_folder,
        "segment_folder": segment_folder,
        "sample_rate": int(sample_rate),
        "punctuation": bool(punctuation),
        "lowercase": bool(lowercase),
    }
    meta_path = data_folder / "GigaSpeech.json"

    def check():
        meta = load_json(meta_path)
        return require_key(meta, "audios", str(meta_path), list)

    def walk(audios):
        return _cut_corpus(
            audios,
            meta_path,
            splits,
            segment_folder,
            int(sample_rate),
            punctuation,
            lowercase,
        )

    def split_rows(split, rows):
        if not rows[split]:
            raise PrepareError(
                f"{meta_path}: no segments in subset {{{split}}}"
            )
        return sorted(rows[split], key=lambda r: r["ID"])

    return prepare_corpus(
        CORPUS,
        "GigaSpeech",
        save_folder,
        splits,
        options,
        split_rows,
        check=check,
        walk=walk,
        unit="segments",
        hours=False,
        manifest_name=lambda split: f"{split.lower()}.csv",
        log=logger,
    )


def _cut_corpus(
    audios,
    meta_path,
    splits,
    segment_folder,
    sample_rate,
    punctuation,
    lowercase,
):
    """Cut the segments of ``splits`` out of ``audios``; their rows by split."""
    data_folder = meta_path.parent
    rows = {s: [] for s in splits}
    wanted = {"{" + s + "}": s for s in splits}
    seen, garbage, written = set(), 0, 0
    for i, audio in enumerate(audios):
        where = f"{meta_path} audios[{i}]"
        aid = str(require_key(audio, "aid", where, str))
        where = f"{where} (aid {aid})"
        segments = require_key(audio, "segments", where, list)
        todo = []
        for j, seg in enumerate(segments):
            swhere = f"{where} segments[{j}]"
            sid = require_key(seg, "sid", swhere, str)
            swhere = f"{swhere} (sid {sid})"
            subsets = require_key(seg, "subsets", swhere, list)
            picked = [wanted[s] for s in subsets if s in wanted]
            if not picked:
                continue
            if sid in seen:
                raise PrepareError(f"{swhere}: segment id listed twice")
            seen.add(sid)
            begin = _seconds(seg, "begin_time", swhere)
            end = _seconds(seg, "end_time", swhere)
            if not 0 <= begin < end:
                raise PrepareError(
                    f"{swhere}: need 0 <= begin_time < end_time, got "
                    f"{begin} and {end}"
                )
            text = normalise_text(
                require_key(seg, "text_tn", swhere, str),
                punctuation,
                lowercase,
                swhere,
            )
            if not text:
                garbage += 1
                continue
            speaker = str(seg.get("speaker") or "N/A")
            todo.append(
                dict(
                    sid=sid,
                    begin=begin,
                    end=end,
                    text=text,
                    speaker=aid if speaker == "N/A" else speaker,
                    subsets=picked,
                    where=swhere,
                )
            )
        if not todo:
            continue
        rel = require_key(audio, "path", where, str)
        source = data_folder / rel
        if not source.is_file():
            raise PrepareError(f"{where}: audio {source} not found")
        written += _cut_segments(
            source, todo, segment_folder / aid, sample_rate, where
        )
        for seg in todo:
            wav = segment_folder / aid / f"{seg['sid']}.wav"
            row = manifest_row(
                seg["sid"],
                wav,
                segment_folder,
                seg["text"],
                "en",
                seg["speaker"],
                seg["duration"],
            )
            for subset in seg["subsets"]:
                rows[subset].append(row)
    if garbage:
        logger.info("%d segments without words (garbage tags) skipped", garbage)
    logger.info(
        "%d segment files written, %d reused",
        written,
        len(seen) - written - garbage,
    )
    return rows


def _seconds(seg, key, where):
    value = require_key(seg, key, where, (int, float))
    if isinstance(value, bool) or not math.isfinite(value):
        raise PrepareError(f"{where}: {key} must be a finite number")
    return float(value)


def _segment_ok(path, sample_rate, frames):
    """Whether ``path`` is a finished segment of the expected shape."""
    if not path.is_file():
        return False
    try:
        info = sf.info(str(path))
    except Exception:
        return False
    return (
        info.samplerate == sample_rate
        and info.channels == 1
        and info.frames == frames
    )


def _cut_segments(source, segments, out_dir, sample_rate, where):
    """Write the segments of one recording; set each one's ``duration``.

    Returns the number of files written (others were already there).
    """
    try:
        handle = sf.SoundFile(str(source))
    except Exception as e:
        raise PrepareError(
            f"{where}: cannot read audio {source} ({e})"
        ) from None
    written = 0
    with handle:
        rate, total = handle.samplerate, handle.frames
        for seg in segments:
            if seg["end"] > total / rate + END_TOLERANCE:
                raise PrepareError(
                    f"{seg['where']}: end_time {seg['end']} is past the end "
                    f"of {source} ({total / rate:.3f} s)"
                )
            first = round(seg["begin"] * rate)
            last = min(round(seg["end"] * rate), total)
            if last <= first:
                raise PrepareError(f"{seg['where']}: segment holds no audio")
            # Resampling keeps ceil(n * new / old) samples.
            frames = math.ceil((last - first) * sample_rate / rate)
            seg["duration"] = frames / sample_rate
            path = out_dir / f"{seg['sid']}.wav"
            if _segment_ok(path, sample_rate, frames):
                continue
            handle.seek(first)
            data = handle.read(last - first, dtype="float32", always_2d=True)
            if data.shape[0] != last - first:
                raise PrepareError(
                    f"{seg['where']}: read {data.shape[0]} of {last - first} "
                    f"samples from {source}"
                )
            wav = data.mean(axis=1)
            if rate != sample_rate:
                import torchaudio

                wav = torchaudio.functional.resample(
                    torch.from_numpy(np.ascontiguousarray(wav)),
                    rate,
                    sample_rate,
                ).numpy()
                # Pin the length so a rerun recognises the finished file.
                wav = np.pad(wav[:frames], (0, max(0, frames - len(wav))))
            out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                sf.write(
                    str(tmp),
                    np.clip(wav, -1.0, 1.0),
                    sample_rate,
                    format="WAV",
                    subtype="PCM_16",
                )
            written += 1
    return written


def main(argv=None):
    """Cut GigaSpeech and write its manifests from the command line."""
    parser = prepare_parser(
        "Cut GigaSpeech segments and write manifests per subset.",
        "the GigaSpeech folder",
        DEFAULT_SPLITS,
        f"subsets among {' '.join(SUBSETS)} (default: %(default)s)",
        lowercase=True,
    )
    parser.add_argument(
        "--segment-folder",
        help="where segment wavs go (default: SAVE/segments)",
    )
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument(
        "--no-punctuation",
        dest="punctuation",
        action="store_false",
        help="drop the punctuation tags instead of writing , . ? !",
    )
    run_parsed(prepare_gigaspeech, parser, argv)


if __name__ == "__main__":
    main()
