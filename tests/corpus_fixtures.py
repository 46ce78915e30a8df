"""Miniature copies of the corpus layouts the preparation scripts read.

Each builder writes a few short generated audio files (sine tones, so every
file's length is known exactly) where the real corpus keeps them, plus the
listing files, and returns what a correct manifest must contain.
"""

import json

import numpy as np
import soundfile as sf

SR = 16000


def tone(seconds, freq=220.0, sample_rate=SR, amp=0.3):
    """A sine tone of exactly ``round(seconds * sample_rate)`` samples."""
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype("float32")


def write_audio(path, seconds, sample_rate=SR, freq=220.0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, freq, sample_rate), sample_rate, **kw)
    return path


def mp3_supported():
    """Whether this libsndfile writes (and so reads) MP3."""
    return "MP3" in sf.available_formats()


# --------------------------------------------------------------- LibriSpeech
LIBRI = {
    "dev-clean": {
        ("84", "121123"): [
            ("0000", 0.5, "GO DO YOU HEAR"),
            ("0001", 0.73, "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE"),
        ],
        ("174", "50561"): [("0002", 0.31, "FOREVER IT'S NOT SO")],
    },
    "test-clean": {("1089", "134686"): [("0000", 0.42, "HE HOPED THERE")]},
}


def make_librispeech(root, layout=LIBRI):
    """Write ``<root>/<split>/<spk>/<chapter>/`` flac files and transcripts.

    Returns ``{split: {utt_id: (relative path, seconds, TEXT)}}``.
    """
    expected = {}
    for split, chapters in layout.items():
        expected[split] = {}
        for (spk, chap), utts in chapters.items():
            folder = root / split / spk / chap
            lines = []
            for num, seconds, text in utts:
                uid = f"{spk}-{chap}-{num}"
                write_audio(folder / f"{uid}.flac", seconds, format="FLAC")
                lines.append(f"{uid} {text}")
                rel = f"{split}/{spk}/{chap}/{uid}.flac"
                expected[split][uid] = (rel, seconds, text)
            (folder / f"{spk}-{chap}.trans.txt").write_text(
                "\n".join(lines) + "\n"
            )
    return expected


# --------------------------------------------------------------- CommonVoice
CV_HEADER = (
    "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\t"
    "down_votes\tage\tgender\taccents\tvariant\tlocale\tsegment"
)
CV = {
    "train": [
        ("spkA", "common_voice_de_1", 0.61, "Guten Morgen, wie geht's?"),
        ("spkB", "common_voice_de_2", 0.37, "Das  ist \u201cschön\u201d."),
    ],
    "dev": [("spkA", "common_voice_de_3", 0.45, "Ja.")],
    "test": [("spkC", "common_voice_de_4", 0.52, "Nein, danke!")],
}


def cv_extension():
    return ".mp3" if mp3_supported() else ".wav"


def make_commonvoice(lang_root, layout=CV, lang="de"):
    """Write a Common Voice language folder: tsv files and ``clips/``.

    Returns ``{split: {clip_id: (relative path, seconds, sentence, client)}}``.
    """
    ext = cv_extension()
    fmt = "MP3" if ext == ".mp3" else "WAV"
    expected = {}
    for split, clips in layout.items():
        expected[split] = {}
        lines = [CV_HEADER]
        for i, (client, clip, seconds, sentence) in enumerate(clips):
            write_audio(
                lang_root / "clips" / f"{clip}{ext}",
                seconds,
                freq=300 + i,
                format=fmt,
            )
            lines.append(
                f"{client}\t{clip}{ext}\tsid{i}\t{sentence}\t\t2\t0\t\t\t\t\t"
                f"{lang}\t"
            )
            expected[split][clip] = (
                f"clips/{clip}{ext}",
                seconds,
                sentence,
                client,
            )
        (lang_root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return expected


# ---------------------------------------------------------------- CoVoST 2
COVOST = [
    # clip, seconds, sentence, translation, client, split
    (
        "common_voice_fr_10",
        0.4,
        "Bonjour à tous.",
        "Hello everyone.",
        "c1",
        "train",
    ),
    (
        "common_voice_fr_11",
        0.55,
        "Merci beaucoup.",
        "Thank you very much.",
        "c2",
        "train_covost",
    ),
    (
        "common_voice_fr_12",
        0.33,
        "Où est la gare ?",
        "Where is the station?",
        "c1",
        "dev",
    ),
    ("common_voice_fr_13", 0.47, "Il pleut.", "It is raining.", "c3", "test"),
]


def make_covost(cv_root, rows=COVOST, src="fr", tgt="en", released=False):
    """Write Common Voice clips for ``src`` and ``covost_v2.<src>_<tgt>.tsv``.

    With ``released=True`` the CoVoST file has only path, translation and
    split (as released) and sentence/client_id live in ``validated.tsv``.
    Returns ``{clip_id: (relative path, seconds, sentence, translation,
    split)}``.
    """
    ext = cv_extension()
    fmt = "MP3" if ext == ".mp3" else "WAV"
    validated = ["client_id\tpath\tsentence\tup_votes\tdown_votes"]
    if released:
        covost = ["path\ttranslation\tsplit"]
    else:
        covost = ["path\tsentence\ttranslation\tclient_id\tsplit"]
    expected = {}
    for i, (clip, seconds, sentence, translation, client, split) in enumerate(
        rows
    ):
        name = f"{clip}{ext}"
        write_audio(cv_root / "clips" / name, seconds, freq=400 + i, format=fmt)
        validated.append(f"{client}\t{name}\t{sentence}\t2\t0")
        if released:
            covost.append(f"{name}\t{translation}\t{split}")
        else:
            covost.append(
                f"{name}\t{sentence}\t{translation}\t{client}\t{split}"
            )
        expected[clip] = (
            f"clips/{name}",
            seconds,
            sentence,
            translation,
            split,
        )
    (cv_root / "validated.tsv").write_text("\n".join(validated) + "\n")
    (cv_root / f"covost_v2.{src}_{tgt}.tsv").write_text(
        "\n".join(covost) + "\n"
    )
    return expected


# ---------------------------------------------------------------- GigaSpeech
def make_gigaspeech(root, fmt="wav", sample_rate=SR):
    """Write two recordings and ``GigaSpeech.json`` describing segments.

    The first recording is 2 s at 220 Hz then 2 s at 880 Hz, so a segment's
    content tells where it was cut.  Returns the metadata dict.
    """
    ext = {"wav": ".wav", "opus": ".opus", "flac": ".flac"}[fmt]
    kw = {"opus": dict(format="OGG", subtype="OPUS")}.get(fmt, {})
    first = np.concatenate(
        [tone(2.0, 220, sample_rate), tone(2.0, 880, sample_rate)]
    )
    rec1 = root / "audio" / "podcast" / "P0000" / f"POD0000000001{ext}"
    rec2 = root / "audio" / "youtube" / "P0001" / f"YOU0000000002{ext}"
    rec1.parent.mkdir(parents=True)
    sf.write(str(rec1), first, sample_rate, **kw)
    write_audio(rec2, 3.0, sample_rate, freq=500, **kw)
    meta = {
        "dataset": "GigaSpeech",
        "audios": [
            {
                "aid": "POD0000000001",
                "path": rec1.relative_to(root).as_posix(),
                "duration": 4.0,
                "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                "segments": [
                    {
                        "sid": "POD0000000001_S0000000",
                        "speaker": "N/A",
                        "begin_time": 0.5,
                        "end_time": 1.75,
                        "text_tn": "HELLO <COMMA> WORLD <PERIOD>",
                        "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                    },
                    {
                        "sid": "POD0000000001_S0000001",
                        "speaker": "N/A",
                        "begin_time": 2.25,
                        "end_time": 3.5,
                        "text_tn": "IS IT <QUESTIONMARK> <NOISE>",
                        "subsets": ["{XL}", "{L}", "{M}", "{S}"],
                    },
                    {
                        "sid": "POD0000000001_S0000002",
                        "begin_time": 3.5,
                        "end_time": 3.9,
                        "text_tn": "<MUSIC>",
                        "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                    },
                ],
            },
            {
                "aid": "YOU0000000002",
                "path": rec2.relative_to(root).as_posix(),
                "duration": 3.0,
                "subsets": ["{DEV}"],
                "segments": [
                    {
                        "sid": "YOU0000000002_S0000000",
                        "speaker": "S1",
                        "begin_time": 0.0,
                        "end_time": 1.2,
                        "text_tn": "GOOD MORNING <EXCLAMATIONPOINT>",
                        "subsets": ["{DEV}"],
                    },
                    {
                        "sid": "YOU0000000002_S0000001",
                        "speaker": "S1",
                        "begin_time": 1.2,
                        "end_time": 3.0,
                        "text_tn": "<SIL> SEE YOU <PERIOD>",
                        "subsets": ["{DEV}"],
                    },
                ],
            },
        ],
    }
    (root / "GigaSpeech.json").write_text(json.dumps(meta, indent=1))
    return meta


# ----------------------------------------------------------------- MLQA
MLQA = {
    "en": [
        (
            "Paris is the capital of France.",
            [
                ("q1en", "What is the capital of France?", ["Paris", "Paris"]),
                ("q2en", "Which country is Paris in?", ["France"]),
            ],
        ),
    ],
    "de": [
        (
            "Berlin ist die Hauptstadt von Deutschland.",
            [
                ("q1de", "Was ist die Hauptstadt von Deutschland?", ["Berlin"]),
                (
                    "q2de",
                    "Wovon ist Berlin die Hauptstadt?",
                    ["Deutschland", "von Deutschland"],
                ),
            ],
        ),
    ],
    "zh": [
        (
            "北京是中国的首都。",
            [
                ("q1zh", "中国的首都是哪里？", ["北京"]),
                ("q2zh", "北京是哪个国家的首都？", ["中国"]),
            ],
        ),
    ],
}


def make_mlqa(root, split="test", layout=MLQA):
    """Write ``<root>/MLQA_V1/<split>/<split>-context-<l>-question-<l>.json``.

    Returns ``{lang: [(qid, question, context, answers)]}``.
    """
    expected = {}
    folder = root / "MLQA_V1" / split
    folder.mkdir(parents=True, exist_ok=True)
    for lang, paragraphs in layout.items():
        expected[lang] = []
        data = {"version": 1.0, "data": [{"title": "t", "paragraphs": []}]}
        for context, qas in paragraphs:
            para = {"context": context, "qas": []}
            for qid, question, answers in qas:
                para["qas"].append(
                    {
                        "id": qid,
                        "question": question,
                        "answers": [
                            {"text": a, "answer_start": context.find(a)}
                            for a in answers
                        ],
                    }
                )
                expected[lang].append((qid, question, context, answers))
            data["data"][0]["paragraphs"].append(para)
        path = folder / f"{split}-context-{lang}-question-{lang}.json"
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1))
    return expected
