"""The hearing measurement's cache: what does not change between two runs.

The teacher's text answers (keyed by a fingerprint of the LLM weights, the
prompts, the instructions and the generation limit; each answer checked
against its transcript when read back) and the cascade's rows and
transcripts (keyed also by the test rows, with a hash of each audio file)
are stored as JSON files in the measurement's ``--cache-dir``.

Authors
 * speechbrain-blspkd contributors 2026
"""

import hashlib
import json
import pathlib

from speechbrain_blspkd.teacher_answers import fingerprint as _fingerprint
from speechbrain_blspkd.utils.atomic import atomic_write_text, read_json

#: Part of every cache key: changing it misses every older cached file.
CACHE_VERSION = 1


def file_sha1(path):
    """The SHA-1 hex digest of a file's bytes."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_cache(path, key):
    """The cached JSON object at ``path`` when its ``key`` is ``key``, else
    None (also for a missing or unreadable file)."""
    data = read_json(path)
    return data if isinstance(data, dict) and data.get("key") == key else None


def write_cache(path, key, data):
    """Write ``data`` with its ``key`` to ``path``, atomically."""
    text = json.dumps(dict(data, key=key), ensure_ascii=False)
    atomic_write_text(pathlib.Path(path), text)


def teacher_key_of(model, tasks, max_new_tokens):
    """The cache key of the teacher answers of ``model`` (hashes the LLM
    weights)."""
    return _fingerprint(
        CACHE_VERSION,
        "teacher",
        model.llm.config.to_dict(),
        model.prompts.system_prompt,
        model.prompts.transcript_separator,
        tasks,
        int(max_new_tokens),
        model.device.type,
        model.llm,
    )


def load_teacher(path, key, rows):
    """``{(task, ID): answer}`` of the cached answers whose transcript is
    still the row's."""
    data = read_cache(path, key) or {"answers": {}}
    transcripts = {r["ID"]: r["transcript"] for r in rows}
    out = {}
    for k, (transcript, answer) in data["answers"].items():
        task, uid = k.split("\t", 1)
        if transcripts.get(uid, transcript) == transcript:
            out[(task, uid)] = answer
    return out, data["answers"]


def save_teacher(path, key, stored, decoded):
    """Add the teacher answers of the ``decoded`` rows to ``stored`` and
    write them."""
    for r in decoded:
        stored[f"{r['task']}\t{r['utt']}"] = [r["transcript"], r["teacher"]]
    write_cache(path, key, {"answers": stored})


def rows_digest(rows):
    """A fingerprint of the test rows, with a hash of each audio file."""
    return _fingerprint(
        [
            (r["ID"], r["transcript"], r["language"], file_sha1(r["wav"]))
            for r in rows
        ]
    )
