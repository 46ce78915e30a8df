"""Audio-MLQA: MLQA questions spoken by a TTS voice, for spoken QA tests.

MLQA (SQuAD format) ships one file per context/question language pair::

    <data_folder>/MLQA_V1/<split>/<split>-context-<lang>-question-<lang>.json

with ``data[].paragraphs[].context`` and ``data[].paragraphs[].qas[]``
holding ``id``, ``question`` and ``answers[].text``.  ``data_folder`` may
also be the ``MLQA_V1`` folder itself.  Only same-language pairs are used.

Each question is synthesised with espeak-ng (:data:`VOICES` gives the voice
per language) and converted with sox to 16-kHz mono 16-bit wav, by the
project's TTS wrapper :func:`speechbrain_blspkd.dataprep.tts.synthesise`.

Files go to ``<audio_folder>/<lang>/<voice tag>/<question id>.wav``
(``audio_folder`` defaults to ``<save_folder>/audio`` and is what
``$data_root`` stands for in these manifests).  They are written
atomically, so a finished file is complete: a rerun (or a run with more
questions) reuses them and only synthesises what is missing.  Two workers
synthesise in parallel by default.

One manifest per split goes to ``<save_folder>/<split>.csv`` with every
requested language: ``ID`` ``<lang>-<question id>``, ``transcript`` the
question, ``context`` the paragraph, ``answer`` the reference answers joined
with ``|``, ``instruction`` the QA instruction (:data:`INSTRUCTION`, with
``{context}`` replaced by the paragraph so it is a complete text prompt),
``language`` and ``speaker`` ``espeak-ng:<voice>``.  ``max_questions`` keeps
the first questions of each language's file (in file order).

Command line::

    python -m speechbrain_blspkd.dataprep.audio_mlqa MLQA SAVE \\
        --splits test --languages en de es zh vi --max-questions 500
"""

import concurrent.futures
import logging
import pathlib
import re

from speechbrain_blspkd.dataprep import tts
from speechbrain_blspkd.dataprep.common import (
    PrepareError,
    check_folder,
    check_splits,
    language_code,
    load_json,
    manifest_row,
    normalise_space,
    require_key,
)
from speechbrain_blspkd.dataprep.preparation import (
    prepare_corpus,
    prepare_parser,
    run_cli,
)

logger = logging.getLogger(__name__)

CORPUS = "audio_mlqa"
SPLITS = ("dev", "test")
DEFAULT_LANGUAGES = ("en", "de", "es", "zh", "vi")
#: espeak-ng voice for each MLQA language.
VOICES = {
    "en": "en-us",
    "de": "de",
    "es": "es",
    "zh": "cmn",
    "vi": "vi",
    "ar": "ar",
    "hi": "hi",
}
#: Default instruction; ``{context}`` is replaced by the paragraph.
INSTRUCTION = (
    "Read the passage below, then answer the spoken question with a short "
    "phrase taken from the passage.\n\nPassage: {context}"
)
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def mlqa_file(mlqa_root, split, lang):
    """Path of the MLQA file with ``lang`` contexts and questions.

    Example
    -------
    >>> mlqa_file("/d/MLQA_V1", "test", "de").as_posix()
    '/d/MLQA_V1/test/test-context-de-question-de.json'
    """
    return (
        pathlib.Path(mlqa_root)
        / split
        / f"{split}-context-{lang}-question-{lang}.json"
    )


def read_mlqa(path, max_questions=None):
    """Read the questions of one MLQA (SQuAD-format) file.

    Arguments
    ---------
    path : str or pathlib.Path
        The json file.
    max_questions : int, optional
        Keep the first ones only.

    Returns
    -------
    list of dict
        ``id``, ``question``, ``context``, ``answers`` (list of str) and
        ``where`` (file and JSON location), in file order.

    Example
    -------
    >>> import tempfile, pathlib, json
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.json"
    >>> _ = p.write_text(json.dumps({"data": [{"paragraphs": [{
    ...     "context": "Paris is in France.", "qas": [{"id": "q1",
    ...     "question": "Where is Paris?",
    ...     "answers": [{"text": "France", "answer_start": 12}]}]}]}]}))
    >>> q = read_mlqa(p)[0]
    >>> q["id"], q["answers"]
    ('q1', ['France'])
    """
    path = pathlib.Path(path)
    data = require_key(load_json(path), "data", str(path), list)
    out, seen = [], {}
    for a, article in enumerate(data):
        paragraphs = require_key(
            article, "paragraphs", f"{path} data[{a}]", list
        )
        for p, para in enumerate(paragraphs):
            pwhere = f"{path} data[{a}].paragraphs[{p}]"
            context = normalise_space(require_key(para, "context", pwhere, str))
            if not context:
                raise PrepareError(f"{pwhere}: empty context")
            for q, qa in enumerate(require_key(para, "qas", pwhere, list)):
                where = f"{pwhere}.qas[{q}]"
                qid = require_key(qa, "id", where, str)
                if not _SAFE_ID.fullmatch(qid):
                    raise PrepareError(
                        f"{where}: id {qid!r} cannot name a file"
                    )
                if qid in seen:
                    raise PrepareError(
                        f"{where}: id {qid} already used at {seen[qid]}"
                    )
                seen[qid] = where
                question = normalise_space(
                    require_key(qa, "question", where, str)
                )
                if not question:
                    raise PrepareError(f"{where}: empty question")
                answers = []
                for n, ans in enumerate(
                    require_key(qa, "answers", where, list)
                ):
                    text = normalise_space(
                        require_key(ans, "text", f"{where}.answers[{n}]", str)
                    ).replace("|", "/")
                    if text and text not in answers:
                        answers.append(text)
                if not answers:
                    raise PrepareError(f"{where}: no non-empty answer")
                out.append(
                    dict(
                        id=qid,
                        question=question,
                        context=context,
                        answers=answers,
                        where=where,
                    )
                )
                if max_questions is not None and len(out) >= max_questions:
                    return out
    return out


def _voice_tag(voice, speed):
    tag = re.sub(r"[^A-Za-z0-9_.+-]", "_", voice)
    return tag if speed is None else f"{tag}_s{int(speed)}"


def prepare_audio_mlqa(
    data_folder,
    save_folder,
    splits=("test",),
    skip_prep=False,
    languages=DEFAULT_LANGUAGES,
    max_questions=None,
    voices=None,
    speed=None,
    audio_folder=None,
    instruction=INSTRUCTION,
    num_workers=2,
    espeak="espeak-ng",
    sox="sox",
):
    """Synthesise MLQA questions and write ``<save_folder>/<split>.csv``.

    Arguments
    ---------
    data_folder : str or pathlib.Path
        Folder holding ``MLQA_V1`` (or ``MLQA_V1`` itself).
    save_folder : str or pathlib.Path
        Where the manifests (and the options record) go.
    splits : str or list of str
        ``dev`` and/or ``test``.
    skip_prep : bool
        Do nothing at all (SpeechBrain convention).
    languages : list of str
        MLQA languages (``en de es zh vi ar hi``).
    max_questions : int, optional
        Questions per language and split (the first ones in the file).
    voices : dict, optional
        Language -> espeak-ng voice, overriding :data:`VOICES`.
    speed : int, optional
        espeak-ng words per minute.
    audio_folder : str or pathlib.Path, optional
        Where the wavs go (``$data_root``); default ``<save_folder>/audio``.
    instruction : str
        Instruction template; ``{context}`` is replaced by the paragraph.
    num_workers : int
        Questions synthesised in parallel.
    espeak, sox : str
        The programs to run.

    Returns
    -------
    dict
        Split name -> manifest path (empty when ``skip_prep``).

    Example
    -------
    >>> import tempfile, pathlib, json
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "MLQA_V1" / "test").mkdir(parents=True)
    >>> _ = mlqa_file(root / "MLQA_V1", "test", "en").write_text(json.dumps(
    ...     {"data": [{"paragraphs": [{"context": "Paris is in France.",
    ...     "qas": [{"id": "q1", "question": "Where is Paris?",
    ...     "answers": [{"text": "France"}]}]}]}]}))
    >>> out = prepare_audio_mlqa(root, root / "save", languages=["en"])
    >>> from speechbrain_blspkd.dataio.manifest import read_manifest
    >>> row = read_manifest(out["test"])[0]
    >>> row["ID"], row["transcript"], row["answer"], row["speaker"]
    ('en-q1', 'Where is Paris?', 'France', 'espeak-ng:en-us')
    """
    if skip_prep:
        return {}
    splits = check_splits(splits, SPLITS)
    if isinstance(languages, str):
        languages = [languages]
    languages = [language_code(lang) for lang in languages]
    if not languages or len(set(languages)) != len(languages):
        raise PrepareError(f"languages must be distinct and given: {languages}")
    voices = {**VOICES, **(voices or {})}
    missing = [lang for lang in languages if lang not in voices]
    if missing:
        raise PrepareError(
            f"no espeak-ng voice known for {missing}; pass voices={{...}}"
        )
    voices = {lang: voices[lang] for lang in languages}
    if max_questions is not None and int(max_questions) < 1:
        raise PrepareError(f"max_questions must be >= 1, got {max_questions}")
    data_folder = check_folder(data_folder, "MLQA data folder")
    mlqa_root = data_folder
    if (data_folder / "MLQA_V1").is_dir():
        mlqa_root = data_folder / "MLQA_V1"
    save_folder = pathlib.Path(save_folder)
    audio_folder = pathlib.Path(audio_folder or save_folder / "audio")
    options = {
        "data_folder": mlqa_root,
        "audio_folder": audio_folder,
        "languages": languages,
        "max_questions": None if max_questions is None else int(max_questions),
        "voices": voices,
        "speed": None if speed is None else int(speed),
        "instruction": instruction,
    }

    def check():
        try:
            tts.check_tools(espeak, sox)
        except tts.TTSError as e:
            raise PrepareError(str(e)) from None
        questions = {}
        for split in splits:
            for lang in languages:
                questions[split, lang] = read_mlqa(
                    mlqa_file(mlqa_root, split, lang), max_questions
                )
        return questions

    def walk(questions):
        jobs = []
        for (_split, lang), items in questions.items():
            folder = audio_folder / lang / _voice_tag(voices[lang], speed)
            for item in items:
                item["wav"] = folder / f"{item['id']}.wav"
                if not tts.is_complete_wav(item["wav"]):
                    jobs.append((item, voices[lang]))
        logger.info(
            "Audio-MLQA: %d questions, %d to synthesise",
            sum(len(v) for v in questions.values()),
            len(jobs),
        )
        _synthesize_all(jobs, speed, espeak, sox, num_workers)
        return questions

    def split_rows(split, questions):
        return [
            manifest_row(
                f"{lang}-{item['id']}",
                item["wav"],
                audio_folder,
                item["question"],
                lang,
                f"espeak-ng:{voices[lang]}",
                where=item["where"],
                context=item["context"],
                answer="|".join(item["answers"]),
                instruction=instruction.replace("{context}", item["context"]),
            )
            for lang in languages
            for item in questions[split, lang]
        ]

    return prepare_corpus(
        CORPUS,
        "Audio-MLQA",
        save_folder,
        splits,
        options,
        split_rows,
        check=check,
        walk=walk,
        unit="spoken questions",
        hours=False,
        log=logger,
    )


def _synthesize_all(jobs, speed, espeak, sox, num_workers):
    """Run the TTS jobs, ``num_workers`` at a time; re-raise the first error."""

    def one(job):
        item, voice = job
        try:
            tts.synthesise(
                item["question"],
                item["wav"],
                voice=voice,
                speed=speed,
                espeak=espeak,
                sox=sox,
            )
        except tts.TTSError as e:
            raise PrepareError(f"{item['where']}: {e}") from None

    workers = max(1, int(num_workers))
    if workers == 1:
        for job in jobs:
            one(job)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def main(argv=None):
    """Speak MLQA questions and write their manifests from the command line."""
    parser = prepare_parser(
        "Speak MLQA questions with espeak-ng; write manifests.",
        "folder holding MLQA_V1",
        ["test"],
        choices=SPLITS,
    )
    parser.add_argument(
        "--languages", nargs="+", default=list(DEFAULT_LANGUAGES)
    )
    parser.add_argument(
        "--max-questions",
        type=int,
        help="questions per language and split (default: all)",
    )
    parser.add_argument(
        "--voice",
        action="append",
        default=[],
        metavar="LANG=VOICE",
        help="espeak-ng voice for a language (repeatable)",
    )
    parser.add_argument("--speed", type=int, help="words per minute")
    parser.add_argument("--audio-folder", help="default: SAVE/audio")
    parser.add_argument("--num-workers", type=int, default=2)
    keywords = vars(parser.parse_args(argv))
    voices = {}
    for item in keywords.pop("voice"):
        lang, sep, voice = item.partition("=")
        if not sep or not lang or not voice:
            parser.error(f"--voice wants LANG=VOICE, got {item!r}")
        voices[lang] = voice
    run_cli(prepare_audio_mlqa, voices=voices, **keywords)


if __name__ == "__main__":
    main()
