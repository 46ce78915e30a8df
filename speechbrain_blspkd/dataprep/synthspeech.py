"""SynthSpeech: the embedded default corpus, synthesised on this machine.

Sentences come from texts that Debian packages install (the ``fortunes``
collections in English, German, Spanish, Italian and Brazilian Portuguese,
and the human translations in the gettext ``.mo`` catalogues under
``/usr/share/locale`` for French, Mandarin Chinese, Hindi and Arabic, and as
a supplement for the others): the *core* pool of each language.  English
also has an *extra* pool (:mod:`~speechbrain_blspkd.dataprep.english_sources`):
the other English fortune files and ``tfortunes``, the King James Bible
(``bible-kjv``, verse numbers stripped, split into sentences), the example
sentences of the WordNet glosses (``wordnet-base``) and the English
Dhammapada (``display-dhammapada``): about 9,200 core and 53,600 extra
clean English sentences (``python -m
speechbrain_blspkd.dataprep.english_text --count``).  Valid and test
sentences are drawn from the core pool only; training takes the rest of
it, then the extra pool (:func:`~.synthspeech_plan.make_plan`,
:func:`~.synthspeech_plan.language_pools`).
They are cleaned (3-25 words, or 5-40 characters for Chinese; letters of
the language's script and basic punctuation only, no URLs, code or digits),
deduplicated (case and punctuation ignored: :func:`~.sentences.sentence_key`), and
spoken by ``espeak-ng`` with many voices, voice variants
(``+f1`` .. ``+m7`` and named variants), speeds and pitches, then converted
by ``sox`` to 16 kHz mono 16-bit wav.  Optionally a share of the English
training clips is spoken by a second engine, ``flite`` (its four 16-kHz
voices; ``train_flite_share``), so that the training does not hear one
synthesiser only; valid and test stay espeak-ng.

Languages (:data:`~.synthspeech_plan.LANGUAGES`): ``en de es fr it pt`` in Latin script, and
``zh`` (Mandarin, espeak-ng's ``cmn`` voice, Han characters), ``hi``
(Devanagari) and ``ar`` (Arabic script), whose sentences are checked
against their script (:data:`~.sentences.SCRIPTS`) by :func:`~.sentences.clean_sentence`.

Splits: ``train``, ``valid`` and ``test``.  The sentences of the three splits
are disjoint, and so are their voice variants: valid and test are spoken
only by variants held out from training, so they measure unseen voices.
The test split (sentences, voices, speeds, pitches) does not depend on
``num_train`` or ``num_valid``, and a larger ``num_train`` keeps the
training sentences of a smaller one.

The build is resumable and idempotent:

1. the plan (every utterance's sentence, voice, speed and pitch) is a pure
   function of the options and the seed; it is written first to
   ``synthspeech_plan.json``;
2. each wav is written atomically (temporary file + rename); a rerun skips
   the wav files that are already complete and removes stray temporaries;
3. the manifests (``train.csv``, ``valid.csv``, ``test.csv``, with
   ``$data_root`` standing for ``save_folder``) are written last; a call
   whose plan options match and whose manifests exist does nothing;
4. other options make a new plan (old utterance IDs get other clips), so
   a folder that also holds data made from the corpus (feature cache,
   token timings, continuations: all keyed by utterance ID) is refused
   instead, unchanged.

Debian packages needed: ``espeak-ng sox fortunes fortunes-min fortunes-de
fortunes-es fortunes-it fortunes-br``, and for English ``bible-kjv
bible-kjv-text wordnet-base fortune-anarchism tfortunes display-dhammapada``
(see :data:`APT_PACKAGES`); ``flite`` for a flite share.

This module is the build; the sentences and their cleaning are in
:mod:`~speechbrain_blspkd.dataprep.sentences` and
:mod:`~speechbrain_blspkd.dataprep.english_sources`, the plan (languages,
voices, splits) in :mod:`~speechbrain_blspkd.dataprep.synthspeech_plan`,
the TTS wrapper in :mod:`~speechbrain_blspkd.dataprep.tts`;
their public names can also be imported from here.

Command line::

    python -m speechbrain_blspkd.dataprep.synthspeech SAVE_FOLDER \\
        [--num-train 8000] [--num-valid 300] [--num-test 300] \\
        [--languages en,de,es,fr,it,pt] [--seed 1234] [--num-workers 2] \\
        [--en-fraction 0.8|equal] [--train-speed-range LOW,HIGH] \\
        [--train-flite-share 0.25]
"""

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

from speechbrain_blspkd.dataio.manifest import read_manifest, write_manifest
from speechbrain_blspkd.dataprep import english_sources, tts
from speechbrain_blspkd.dataprep.sentences import (
    FORTUNE_DIR,
    LOCALE_DIR,
    LOCALES,
    SCRIPTS,
    clean_script_sentence,
    clean_sentence,
    fortune_sentences,
    gettext_sentences,
    read_mo,
    sentence_key,
)
from speechbrain_blspkd.dataprep.synthspeech_plan import (
    FLITE_SPEED,
    LANGUAGES,
    PITCH_RANGE,
    PLAN_FILE,
    PLAN_VERSION,
    SPEED_RANGE,
    SPLITS,
    VARIANTS,
    language_pools,
    language_sentences,
    load_saved_plan,
    make_plan,
    plan_options,
)
from speechbrain_blspkd.utils.atomic import (
    atomic_write_text,
    read_json,
    remove_stray_tmp,
)
from speechbrain_blspkd.utils.cli import report_error, setup_logging

# The build's own names, and those of the sentence and plan modules that
# were defined here before (importers of this module keep working).
# fmt: off
__all__ = [
    "APT_PACKAGES", "FORTUNE_DIR", "LANGUAGES", "LOCALES", "LOCALE_DIR",
    "PITCH_RANGE", "PLAN_FILE", "PLAN_VERSION", "SCRIPTS", "SPEED_RANGE",
    "SPLITS", "VARIANTS", "check_requirements", "clean_script_sentence",
    "clean_sentence", "fortune_sentences", "gettext_sentences",
    "language_pools", "language_sentences", "load_saved_plan", "main",
    "make_plan", "prepare_synthspeech", "read_mo", "sentence_key",
    "synthesise", "wav_relpath",
]
# fmt: on

logger = logging.getLogger(__name__)

#: Debian packages the default corpus needs (the English sources beyond
#: the fortunes: :data:`.english_sources.APT_PACKAGES`).
APT_PACKAGES = (
    "espeak-ng",
    "sox",
    "fortunes",
    "fortunes-min",
    "fortunes-de",
    "fortunes-es",
    "fortunes-it",
    "fortunes-br",
) + english_sources.APT_PACKAGES


def _apt_hint(packages):
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def check_requirements(languages):
    """Raise ``RuntimeError`` naming the apt command if a tool/text is missing.

    Arguments
    ---------
    languages : list of str
        Languages to synthesise.

    Example
    -------
    >>> check_requirements([])  # tools only
    """
    missing = tts.missing_tools()
    for lang in languages:
        if lang not in LANGUAGES:
            raise ValueError(
                f"language {lang!r} is not supported; choose from "
                f"{sorted(LANGUAGES)}"
            )
        _, sources, pkg = LANGUAGES[lang]
        if sources and not any((FORTUNE_DIR / s).exists() for s in sources):
            missing.extend(pkg.split())
        if lang == "en":  # the training sentences beyond the fortunes
            missing.extend(english_sources.missing_sources())
    if missing:
        raise RuntimeError(
            "SynthSpeech needs Debian packages that are not installed: "
            f"{' '.join(missing)}.  Install them with:\n  "
            + _apt_hint(APT_PACKAGES)
        )


def _espeak_variants():
    """The variant names this espeak-ng installation knows."""
    out = subprocess.run(
        ["espeak-ng", "--voices=variant"], capture_output=True, text=True
    ).stdout
    names = set()
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5 and parts[4].startswith("!v/"):
            names.add(parts[4][3:])
    return names


def wav_relpath(utt):
    """Relative path of an utterance's wav inside the save folder.

    The name ends with a hash of what is spoken and how, so a wav left by
    an earlier plan is reused only when it is exactly the same utterance.

    Example
    -------
    >>> u = dict(ID="synth_train_en_000001", split="train", language="en",
    ...     text="Hello there you.", voice="en-us", variant="f1", speed=150,
    ...     pitch=50)
    >>> wav_relpath(u)[:36]
    'wavs/train/en/synth_train_en_000001_'
    """
    fields = ("text", "voice", "variant", "speed", "pitch")
    # espeak-ng utterances carry no engine (their names predate flite)
    fields += ("engine",) if "engine" in utt else ()
    key = "|".join(str(utt[k]) for k in fields)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"wavs/{utt['split']}/{utt['language']}/{utt['ID']}_{digest}.wav"


def _remove_unplanned_wavs(save_folder, plan):
    planned = {wav_relpath(u) for u in plan["utterances"]}
    removed = 0
    for p in (save_folder / "wavs").rglob("*.wav"):
        if p.relative_to(save_folder).as_posix() not in planned:
            p.unlink()
            removed += 1
    if removed:
        logger.info("removed %d wavs of an earlier plan", removed)


def synthesise(utt, path):
    """Speak the plan entry ``utt`` into a 16 kHz mono wav, atomically.

    A thin adapter from a plan entry to the project's one TTS wrapper:
    :func:`.tts.synthesise` (espeak-ng), or :func:`.tts.synthesise_flite`
    for an entry with ``engine: flite`` (its speed becomes flite's
    ``duration_stretch``, :data:`~.synthspeech_plan.FLITE_SPEED` / speed).

    Arguments
    ---------
    utt : dict
        A plan entry (``text``, ``voice``, ``variant``, ``speed``,
        ``pitch``, optionally ``engine``; ``ID`` names it in errors).
    path : str or pathlib.Path
        Destination wav file.

    Raises
    ------
    speechbrain_blspkd.dataprep.tts.TTSError
        (a ``RuntimeError``) naming the utterance and the failing program.

    Example
    -------
    >>> import tempfile, soundfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.wav"
    >>> synthesise(dict(text="Hello there.", voice="en-us", variant="f1",
    ...     speed=160, pitch=50), p)
    >>> soundfile.info(str(p)).samplerate
    16000
    """
    with tts.naming_failures(utt.get("ID", path)):
        if utt.get("engine") == "flite":
            stretch = FLITE_SPEED / utt["speed"]
            tts.synthesise_flite(utt["text"], path, utt["voice"], stretch)
            return
        tts.synthesise(
            utt["text"],
            path,
            voice=utt["voice"],
            variant=utt["variant"],
            speed=utt["speed"],
            pitch=utt["pitch"],
        )


def _remove_stray_tmp(folder, recursive=True):
    removed = remove_stray_tmp(folder, recursive=recursive)
    if removed:
        logger.info("removed %d unfinished temporary files", removed)


def _refuse_stale_derived_data(save_folder, plan_path, options):
    """Refuse to re-plan a folder that holds data made from its corpus.

    A new plan gives old utterance IDs other sentences and voices, while
    the feature cache, the token timings and the continuations beside the
    corpus are keyed by utterance ID: they would silently describe the old
    clips. The folder is left as it is.
    """
    kept = {"wavs", PLAN_FILE, *(f"{s}.csv" for s in SPLITS)}
    derived = sorted(
        p.name for p in save_folder.iterdir() if p.name not in kept
    )
    if not derived:
        return
    saved = read_json(plan_path)
    saved = saved.get("options") if isinstance(saved, dict) else None
    if not isinstance(saved, dict):  # an unreadable plan
        saved = {}
    changes = [
        f"{key} {saved.get(key)!r} -> {options.get(key)!r}"
        for key in sorted(set(saved) | set(options))
        if saved.get(key) != options.get(key)
    ]
    raise RuntimeError(
        f"{save_folder} holds a SynthSpeech corpus made with other options "
        f"({'; '.join(changes) or 'an unreadable plan'}) and data made from "
        f"it ({', '.join(derived)}), keyed by utterance ID: a new plan "
        "would leave those describing the old clips. Use another data "
        f"folder for these options, or delete {save_folder} to rebuild it."
    )


def _manifests_done(save_folder, plan):
    for split in SPLITS:
        path = pathlib.Path(save_folder) / f"{split}.csv"
        if not path.is_file():
            return False
    ids = {u["ID"] for u in plan["utterances"]}
    try:
        got = set()
        for split in SPLITS:
            got |= {
                r["ID"]
                for r in read_manifest(
                    pathlib.Path(save_folder) / f"{split}.csv"
                )
            }
    except ValueError:
        return False
    return got == ids


def prepare_synthspeech(
    save_folder,
    num_train=8000,
    num_valid=300,
    num_test=300,
    languages=("en", "de", "es", "fr", "it", "pt"),
    seed=1234,
    num_workers=2,
    en_fraction=0.8,
    skip_prep=False,
    train_speed_range=None,
    train_flite_share=0.0,
):
    """Build (or resume, or skip) the SynthSpeech corpus in ``save_folder``.

    Arguments
    ---------
    save_folder : str or pathlib.Path
        Output folder: ``train.csv``, ``valid.csv``, ``test.csv``,
        ``synthspeech_plan.json`` and ``wavs/``.  It is the ``$data_root``
        of the manifests.
    num_train, num_valid, num_test : int
        Utterances per split.
    languages : sequence of str
        Languages to include (keys of
        :data:`~.synthspeech_plan.LANGUAGES`).
    seed : int
        Seed of the plan.
    num_workers : int
        Concurrent synthesis processes.
    en_fraction : float or None
        Share of English utterances (when other languages are included);
        None: every language gets an equal share (the multilingual
        recipes).
    skip_prep : bool
        Do nothing.
    train_speed_range : (int, int), optional
        espeak-ng speeds (words per minute) of the training utterances;
        default :data:`~.synthspeech_plan.SPEED_RANGE`, that of valid and
        test (see :func:`~.synthspeech_plan.make_plan`).
    train_flite_share : float
        Share of the English training utterances spoken by flite instead
        (see :func:`~.synthspeech_plan.make_plan`); needs Debian's
        ``flite``.

    Returns
    -------
    dict
        ``{split: manifest path}`` (empty when ``skip_prep``).

    Example
    -------
    >>> import tempfile
    >>> out = prepare_synthspeech(tempfile.mkdtemp(), 2, 1, 1, ["en"])
    >>> sorted(out)
    ['test', 'train', 'valid']
    """
    if skip_prep:
        return {}
    save_folder = pathlib.Path(save_folder)
    languages = list(languages)
    check_requirements(languages)
    if train_flite_share and shutil.which("flite") is None:
        raise RuntimeError(
            f"train_flite_share {train_flite_share} needs flite: "
            f"{tts.FLITE_APT_HINT}"
        )
    manifests = {s: save_folder / f"{s}.csv" for s in SPLITS}
    plan_path = save_folder / PLAN_FILE
    # what makes the plan (make_plan's arguments, as its options record)
    settings = (num_train, num_valid, num_test, languages, seed, en_fraction)
    engines = dict(
        train_speed_range=train_speed_range,
        train_flite_share=train_flite_share,
    )
    options = plan_options(*settings, **engines)
    # a build killed while writing the plan or a manifest left a temp file
    # beside them (never trusted, but it would stay forever)
    if save_folder.is_dir():
        _remove_stray_tmp(save_folder, recursive=False)
    plan = load_saved_plan(plan_path, options)
    if plan is not None and _manifests_done(save_folder, plan):
        logger.info("SynthSpeech in %s is complete, skipping", save_folder)
        return manifests
    if plan is None and plan_path.is_file():
        _refuse_stale_derived_data(save_folder, plan_path, options)
        logger.info("SynthSpeech options changed: new plan for %s", save_folder)
    if plan is None:
        for path in manifests.values():  # stale manifests of another plan
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        plan = make_plan(*settings, **engines)
        atomic_write_text(
            plan_path, json.dumps(plan, ensure_ascii=False, indent=1)
        )
        _remove_unplanned_wavs(save_folder, plan)
    known = _espeak_variants()
    espeak = [u for u in plan["utterances"] if "engine" not in u]
    unknown = {u["variant"] for u in espeak} - known
    if unknown:
        raise RuntimeError(
            f"espeak-ng lacks the voice variant(s) {sorted(unknown)}; "
            f"reinstall with: {_apt_hint(['espeak-ng', 'espeak-ng-data'])}"
        )
    _remove_stray_tmp(save_folder / "wavs")
    todo = [
        u
        for u in plan["utterances"]
        if not tts.is_complete_wav(save_folder / wav_relpath(u))
    ]
    logger.info(
        "SynthSpeech: %d of %d wavs to synthesise in %s",
        len(todo),
        len(plan["utterances"]),
        save_folder,
    )
    if todo:
        _run_synthesis(todo, save_folder, num_workers)
    _write_manifests(plan, save_folder, manifests)
    return manifests


def _run_synthesis(todo, save_folder, num_workers):
    from tqdm import tqdm

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        futures = [
            pool.submit(synthesise, u, save_folder / wav_relpath(u))
            for u in todo
        ]
        try:
            for fut in tqdm(
                concurrent.futures.as_completed(futures),
                total=len(futures),
                desc="SynthSpeech",
                unit="utt",
            ):
                fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _write_manifests(plan, save_folder, manifests):
    import soundfile as sf

    rows = {s: [] for s in SPLITS}
    for u in plan["utterances"]:
        rel = wav_relpath(u)
        info = sf.info(str(save_folder / rel))
        rows[u["split"]].append(
            dict(
                ID=u["ID"],
                wav=f"$data_root/{rel}",
                duration=round(info.frames / info.samplerate, 4),
                transcript=u["text"],
                language=u["language"],
                speaker=_speaker(u),
            )
        )
    for split in SPLITS:
        write_manifest(manifests[split], rows[split])


def _speaker(utt):
    """The manifest's speaker: ``VOICE+VARIANT`` (espeak-ng), or
    ``ENGINE:VOICE`` (as the piper test set writes it)."""
    if "engine" in utt:
        return f"{utt['engine']}:{utt['voice']}"
    return f"{utt['voice']}+{utt['variant']}"


def _fraction_or_equal(text):
    return None if text == "equal" else float(text)


def main(argv=None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Build the SynthSpeech corpus (espeak-ng + Debian texts)."
    )
    parser.add_argument("save_folder")
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-valid", type=int, default=300)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument(
        "--languages",
        default="en,de,es,fr,it,pt",
        help="comma-separated language codes",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--en-fraction",
        type=_fraction_or_equal,
        default=0.8,
        help="share of English utterances, or 'equal' (every language the "
        "same share)",
    )
    parser.add_argument(
        "--train-speed-range",
        type=lambda text: [int(v) for v in text.split(",")],
        default=None,
        metavar="LOW,HIGH",
        help="espeak-ng speeds (words per minute) of the training "
        "utterances (default: those of valid and test)",
    )
    parser.add_argument(
        "--train-flite-share",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of the English training utterances spoken by flite "
        "instead of espeak-ng (default 0)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        out = prepare_synthspeech(
            args.save_folder,
            num_train=args.num_train,
            num_valid=args.num_valid,
            num_test=args.num_test,
            languages=[x for x in args.languages.split(",") if x],
            seed=args.seed,
            num_workers=args.num_workers,
            en_fraction=args.en_fraction,
            train_speed_range=args.train_speed_range,
            train_flite_share=args.train_flite_share,
        )
    except (RuntimeError, ValueError) as e:
        return report_error(e)
    for split, path in out.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
