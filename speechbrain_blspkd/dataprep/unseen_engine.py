"""A test set spoken by a TTS engine the training never hears (piper).

SynthSpeech (:mod:`speechbrain_blspkd.dataprep.synthspeech`) trains and
tests on espeak-ng voices only; its test split holds out voice *variants*,
not the engine.  This module writes a second English test set whose
speech comes from a different engine, piper's neural ``joe`` voice
(:func:`speechbrain_blspkd.dataprep.tts.synthesise_piper`), so that a
model that only learned espeak-ng's formant sound shows it.

The sentences are held out from training:

1. the English sentences of the SynthSpeech **test** split, in plan order
   (the same texts as the espeak-ng test set, so the two differ only in
   engine and voice);
2. when more are asked for (``num`` above their number), English sentences
   of the same pool that no SynthSpeech split uses, in a seeded order.

Every chosen sentence is checked against the **train and valid** sentences
of the SynthSpeech plan (compared after
:func:`speechbrain_blspkd.metrics.normalize_text`); an overlap raises
:class:`HeldOutError` naming the sentences.

The build is resumable like SynthSpeech: the plan (sentences, voice) is
written first to ``unseen_engine_plan.json``; each wav is written
atomically and a rerun skips the complete ones; the manifest ``test.csv``
(the project's manifest schema, ``$data_root`` standing for the save
folder, speaker ``piper:<voice>``) is written last.

Command line::

    python -m speechbrain_blspkd.dataprep.unseen_engine SYNTH_FOLDER \\
        [SAVE_FOLDER] [--num 100] [--voice joe] [--seed 0]

(``SAVE_FOLDER`` defaults to ``SYNTH_FOLDER/unseen_engine.piper-joe``.)

Authors
 * speechbrain-blspkd contributors 2026
"""

import argparse
import hashlib
import json
import logging
import pathlib
import random
import sys

from speechbrain_blspkd.dataio.manifest import read_manifest, write_manifest
from speechbrain_blspkd.dataprep import synthspeech_plan, tts
from speechbrain_blspkd.metrics import normalize_text
from speechbrain_blspkd.utils.atomic import atomic_write_text, remove_stray_tmp
from speechbrain_blspkd.utils.cli import report_error, setup_logging

__all__ = [
    "HeldOutError",
    "check_held_out",
    "default_folder",
    "held_out_sentences",
    "prepare_unseen_engine_test",
]

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
PLAN_FILE = "unseen_engine_plan.json"
MANIFEST = "test.csv"
LANGUAGE = "en"  # the piper voices of PIPER_VOICES are English
TRAINING_SPLITS = ("train", "valid")


class HeldOutError(ValueError):
    """A test sentence also appears in the training (or validation) text."""


def default_folder(synth_folder, voice="joe"):
    """Where the test set of ``voice`` goes by default.

    Example
    -------
    >>> default_folder("data").as_posix()
    'data/unseen_engine.piper-joe'
    """
    return pathlib.Path(synth_folder) / f"unseen_engine.piper-{voice}"


def check_held_out(sentences, training_sentences, what="test"):
    """Raise :class:`HeldOutError` when a sentence is also a training one.

    Sentences are compared after
    :func:`~speechbrain_blspkd.metrics.normalize_text` (case, punctuation
    and spacing do not make a sentence new).

    Arguments
    ---------
    sentences : list of str
        The held-out candidates.
    training_sentences : iterable of str
        Every sentence the training (and validation) may have seen.
    what : str
        How the candidates are named in the error.

    Example
    -------
    >>> check_held_out(["A new one."], ["An old one.", "Another."])
    >>> check_held_out(["An OLD one!"], ["An old one."])
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.unseen_engine.HeldOutError: 1 test sentence(s) also in the training text: 'An OLD one!'
    """
    seen = {normalize_text(s, LANGUAGE) for s in training_sentences}
    overlap = [s for s in sentences if normalize_text(s, LANGUAGE) in seen]
    if overlap:
        shown = ", ".join(repr(s) for s in overlap[:5])
        more = f" (+{len(overlap) - 5} more)" if len(overlap) > 5 else ""
        raise HeldOutError(
            f"{len(overlap)} {what} sentence(s) also in the training text: "
            f"{shown}{more}"
        )


def _plan_texts(plan, splits, language=None):
    return [
        u["text"]
        for u in plan["utterances"]
        if u["split"] in splits
        and (language is None or u["language"] == language)
    ]


def held_out_sentences(plan, num=None, pool=None, seed=0):
    """English sentences of a SynthSpeech plan that no training split uses.

    Arguments
    ---------
    plan : dict
        A SynthSpeech plan
        (:func:`~speechbrain_blspkd.dataprep.synthspeech_plan.make_plan`,
        or the saved ``synthspeech_plan.json``).
    num : int, optional
        How many (None: the English test sentences of the plan).  Beyond
        those, sentences of ``pool`` that no split of the plan uses are
        added in a seeded order.
    pool : list of str, optional
        The English sentence pool (default:
        :func:`~speechbrain_blspkd.dataprep.synthspeech_plan.language_sentences`,
        read only when more sentences than the test split's are needed).
    seed : int
        Seed of the order of the pool sentences.

    Returns
    -------
    list of str
        Distinct sentences, test-split ones first.

    Raises
    ------
    HeldOutError
        A chosen sentence is also a train or valid sentence of the plan.
    ValueError
        Fewer held-out sentences exist than ``num``.

    Example
    -------
    >>> sents = {"en": [f"This is sentence number {w}." for w in
    ...     "one two three four five six seven eight nine ten".split()]}
    >>> plan = synthspeech_plan.make_plan(4, 2, 2, ["en"], 0, sentences=sents)
    >>> test = held_out_sentences(plan)
    >>> test == [u["text"] for u in plan["utterances"] if u["split"] == "test"]
    True
    >>> more = held_out_sentences(plan, num=4, pool=sents["en"])
    >>> more[:2] == test, len(more)
    (True, 4)
    """
    chosen, keys = [], set()
    for text in _plan_texts(plan, ("test",), LANGUAGE):
        key = normalize_text(text, LANGUAGE)
        if key not in keys:
            keys.add(key)
            chosen.append(text)
    if num is not None and num < len(chosen):
        chosen = chosen[:num]
    elif num is not None and num > len(chosen):
        used = {
            normalize_text(t, LANGUAGE)
            for t in _plan_texts(plan, ("train", "valid", "test"))
        }
        extra = list(
            pool
            if pool is not None
            else synthspeech_plan.language_sentences(LANGUAGE)
        )
        random.Random(f"{seed}-unseen-engine").shuffle(extra)
        for text in extra:
            if len(chosen) >= num:
                break
            key = normalize_text(text, LANGUAGE)
            if key not in used and key not in keys:
                keys.add(key)
                chosen.append(text)
        if len(chosen) < num:
            raise ValueError(
                f"only {len(chosen)} held-out English sentences available, "
                f"{num} asked for"
            )
    if not chosen:
        raise ValueError("the SynthSpeech plan has no English test sentence")
    check_held_out(chosen, _plan_texts(plan, TRAINING_SPLITS))
    return chosen


def _wav_relpath(utt):
    key = "|".join(str(utt[k]) for k in ("text", "voice", "length_scale"))
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"wavs/{utt['ID']}_{digest}.wav"


def _synth_plan(synth_folder):
    path = pathlib.Path(synth_folder) / synthspeech_plan.PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no SynthSpeech plan; build the corpus first "
            "(python -m speechbrain_blspkd.dataprep.synthspeech FOLDER, or "
            "make demo)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def prepare_unseen_engine_test(
    synth_folder,
    save_folder=None,
    num=100,
    voice="joe",
    length_scale=None,
    seed=0,
    pool=None,
):
    """Build (or resume, or skip) the piper test set of a SynthSpeech corpus.

    Arguments
    ---------
    synth_folder : str or pathlib.Path
        A SynthSpeech folder (its ``synthspeech_plan.json`` decides which
        sentences are held out).
    save_folder : str or pathlib.Path, optional
        Output folder (``test.csv``, ``unseen_engine_plan.json``,
        ``wavs/``); default :func:`default_folder`.
    num : int, optional
        Number of sentences (None: the English test sentences of the plan);
        see :func:`held_out_sentences`.
    voice : str
        Piper voice (:data:`~speechbrain_blspkd.dataprep.tts.PIPER_VOICES`).
    length_scale : float, optional
        Piper's phoneme duration factor (None: the voice's own).
    seed : int
        Seed of the order of the extra pool sentences.
    pool : list of str, optional
        English sentence pool (default: SynthSpeech's).

    Returns
    -------
    pathlib.Path
        The manifest ``test.csv``.

    Raises
    ------
    HeldOutError
        A sentence is also a training or validation sentence.
    speechbrain_blspkd.dataprep.tts.TTSError
        piper, the voice or sox is missing (named) or synthesis failed.

    Example
    -------
    >>> import tempfile
    >>> synth = pathlib.Path(tempfile.mkdtemp())
    >>> sents = {"en": [f"This is sentence number {w}." for w in
    ...     "one two three four five six seven eight".split()]}
    >>> plan = synthspeech_plan.make_plan(4, 2, 2, ["en"], 0, sentences=sents)
    >>> _ = (synth / synthspeech_plan.PLAN_FILE).write_text(json.dumps(plan))
    >>> manifest = prepare_unseen_engine_test(synth, num=None)
    >>> rows = read_manifest(manifest)
    >>> len(rows), rows[0]["speaker"], rows[0]["language"]
    (2, 'piper:joe', 'en')
    """
    save_folder = pathlib.Path(
        save_folder or default_folder(synth_folder, voice)
    )
    synth_plan = _synth_plan(synth_folder)
    options = dict(
        version=PLAN_VERSION,
        # any change of the corpus plan (options or sentences) replans
        synth_plan=hashlib.sha1(
            json.dumps(synth_plan, sort_keys=True).encode()
        ).hexdigest(),
        num=num,
        voice=str(voice),
        length_scale=length_scale,
        seed=seed,
    )
    plan_path = save_folder / PLAN_FILE
    manifest = save_folder / MANIFEST
    if save_folder.is_dir():
        remove_stray_tmp(save_folder)
    plan = synthspeech_plan.load_saved_plan(plan_path, options)
    if plan is None:
        manifest.unlink(missing_ok=True)
        texts = held_out_sentences(synth_plan, num, pool=pool, seed=seed)
        utts = [
            dict(
                ID=f"piper_{LANGUAGE}_{i:06d}",
                text=text,
                voice=str(voice),
                length_scale=length_scale,
            )
            for i, text in enumerate(texts, 1)
        ]
        plan = dict(options=options, utterances=utts)
        atomic_write_text(
            plan_path, json.dumps(plan, ensure_ascii=False, indent=1)
        )
    # checked on every run: the corpus may have been rebuilt since
    check_held_out(
        [u["text"] for u in plan["utterances"]],
        _plan_texts(synth_plan, TRAINING_SPLITS),
    )
    planned = {_wav_relpath(u) for u in plan["utterances"]}
    if (save_folder / "wavs").is_dir():
        for old in (save_folder / "wavs").glob("*.wav"):
            if old.relative_to(save_folder).as_posix() not in planned:
                old.unlink()
    todo = [
        u
        for u in plan["utterances"]
        if not tts.is_complete_wav(save_folder / _wav_relpath(u))
    ]
    if not todo and manifest.is_file() and _manifest_matches(manifest, plan):
        logger.info("piper test set in %s is complete, skipping", save_folder)
        return manifest
    logger.info(
        "piper test set: %d of %d wavs to synthesise in %s",
        len(todo),
        len(plan["utterances"]),
        save_folder,
    )
    for u in todo:
        with tts.naming_failures(u["ID"]):
            tts.synthesise_piper(
                u["text"],
                save_folder / _wav_relpath(u),
                voice=u["voice"],
                length_scale=u["length_scale"],
            )
    _write_manifest(plan, save_folder, manifest)
    return manifest


def _manifest_matches(manifest, plan):
    try:
        rows = read_manifest(manifest)
    except ValueError:
        return False
    want = [(u["ID"], u["text"]) for u in plan["utterances"]]
    return [(r["ID"], r["transcript"]) for r in rows] == want


def _write_manifest(plan, save_folder, manifest):
    import soundfile as sf

    rows = []
    for u in plan["utterances"]:
        rel = _wav_relpath(u)
        info = sf.info(str(save_folder / rel))
        rows.append(
            dict(
                ID=u["ID"],
                wav=f"$data_root/{rel}",
                duration=round(info.frames / info.samplerate, 4),
                transcript=u["text"],
                language=LANGUAGE,
                speaker=f"piper:{u['voice']}",
            )
        )
    write_manifest(manifest, rows)


def main(argv=None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Speak the held-out English SynthSpeech sentences with "
        "piper (a TTS engine the training never hears)."
    )
    parser.add_argument("synth_folder", help="SynthSpeech folder (its plan)")
    parser.add_argument("save_folder", nargs="?", default=None)
    parser.add_argument(
        "--num",
        type=int,
        default=100,
        help="sentences (0: the English test sentences of the plan only)",
    )
    parser.add_argument("--voice", default="joe")
    parser.add_argument("--length-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        out = prepare_unseen_engine_test(
            args.synth_folder,
            args.save_folder,
            num=args.num or None,
            voice=args.voice,
            length_scale=args.length_scale,
            seed=args.seed,
        )
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        return report_error(e)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
