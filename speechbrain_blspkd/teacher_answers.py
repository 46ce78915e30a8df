"""The text teacher's answers, cached beside the evaluation folders.

An evaluation asks the text teacher (the LLM with PLoRA off, given the
transcript) the same questions on every run; its answers are stored in
``teacher_answers.json`` under a key of everything that changes them
(:func:`teacher_keys`: the instruction, ``max_new_tokens``, the prompt
settings, the LLM's configuration and weights, the device type), so a
changed setting or another LLM answers again instead of reusing old
answers.  :func:`fingerprint` is that key's hash of settings and weights.
"""

import hashlib
import json

import torch

from speechbrain_blspkd.utils.atomic import atomic_write_text, read_json
from speechbrain_blspkd.utils.cache_label import tensor_bytes

#: Format of ``teacher_answers.json``: ``{"version": 2, "answers": {key:
#: {utterance ID: [transcript, answer]}}}``.  Version 1 (keyed by task and
#: utterance only) is never reused.
TEACHER_CACHE_VERSION = 2


def fingerprint(*parts):
    """SHA-1 of JSON-able parts and of modules' weights (their bytes).

    A module contributes every tensor of its state dict (name, dtype,
    bytes) except PLoRA's (``lora_`` names), and a PLoRA-wrapped layer's
    ``.base.`` weights count as the plain layer's: the base LLM has one
    fingerprint with and without PLoRA.  Sharded (``DTensor``) weights are
    gathered first, a collective: every rank computes the fingerprint.

    Arguments
    ---------
    *parts : object
        JSON-serialisable values (``str()`` for others) or
        ``torch.nn.Module``.

    Returns
    -------
    str
        The SHA-1 in hexadecimal (40 characters).

    Example
    -------
    >>> lin = torch.nn.Linear(2, 2)
    >>> before = fingerprint("x", lin)
    >>> before == fingerprint("x", lin), before == fingerprint("y", lin)
    (True, False)
    >>> with torch.no_grad():
    ...     lin.bias[0] += 1
    >>> before == fingerprint("x", lin)
    False
    """
    from speechbrain_blspkd.utils.sharding import full_tensor

    digest = hashlib.sha1()
    for part in parts:
        if not isinstance(part, torch.nn.Module):
            digest.update(
                json.dumps(part, sort_keys=True, default=str).encode()
            )
            continue
        for name, tensor in sorted(part.state_dict().items()):
            if "lora_" in name:  # PLoRA is not part of the base model
                continue
            digest.update(name.replace(".base.", ".").encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor_bytes(full_tensor(tensor.detach())))
    return digest.hexdigest()


def teacher_keys(model, tasks, max_new_tokens):
    """The cache key of the teacher's answers for each task.

    A key covers everything the text teacher's greedy answer depends on:
    the task's instruction, ``max_new_tokens``, the system prompt and
    transcript separator, the LLM's configuration and weights (PLoRA
    excluded: the teacher runs without it) and the device type (bf16 GPU
    kernels and CPU kernels may decode differently).  The LLM is hashed
    once for all tasks.

    Arguments
    ---------
    model : SpeechLLMModel
        The model (its ``llm`` and ``prompts``).
    tasks : dict
        ``{task name: instruction}``.
    max_new_tokens : int
        Generation limit.

    Returns
    -------
    dict
        ``{task name: key}``.

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm(whisper=False)
    >>> a = teacher_keys(model, {"repeat": "Repeat:", "echo": "Repeat:"}, 8)
    >>> a["repeat"] == a["echo"]
    True
    >>> a["repeat"] == teacher_keys(model, {"repeat": "Repeat:"}, 9)["repeat"]
    False
    """
    llm = fingerprint(model.llm.config.to_dict(), model.llm)
    settings = [
        TEACHER_CACHE_VERSION,
        model.prompts.system_prompt,
        model.prompts.transcript_separator,
        int(max_new_tokens),
        model.embed_tokens.weight.device.type,
        llm,
    ]
    return {
        name: fingerprint(*settings, instruction)
        for name, instruction in tasks.items()
    }


def load_teacher_answers(path):
    """The answers stored in a ``teacher_answers.json`` (version 2).

    Arguments
    ---------
    path : str or pathlib.Path

    Returns
    -------
    dict
        ``{key: {utterance ID: [transcript, answer]}}``; empty when the
        file is missing, unreadable or of another version.
    """
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != (
        TEACHER_CACHE_VERSION
    ):
        return {}
    return data.get("answers", {})


def cached_teacher_answers(stored, keys, rows, tasks=None):
    """``{(task, ID): answer}`` of the stored answers still valid for
    ``rows``: same key (see :func:`teacher_keys`), same transcript (and,
    for a task of per-row instructions in ``tasks``, same instruction).

    Example
    -------
    >>> stored = {"k1": {"a": ["one", "One."], "b": ["two", "Two."]}}
    >>> rows = [dict(ID="a", transcript="one"), dict(ID="b", transcript="2")]
    >>> cached_teacher_answers(stored, {"repeat": "k1", "qa": "k2"}, rows)
    {('repeat', 'a'): 'One.'}
    """
    out = {}
    tasks = tasks or {}
    for task, key in keys.items():
        answers = stored.get(key, {})
        instruction = tasks.get(task, "")
        for r in rows:
            entry = answers.get(r["ID"])
            if entry is not None and entry[0] == teacher_input(r, instruction):
                out[(task, r["ID"])] = entry[1]
    return out


def teacher_input(row, instruction):
    """What a stored teacher answer must have been given to be reused: the
    transcript, and for a task with per-row instructions the row's
    instruction too."""
    if instruction is None:
        asked = (row.get("instruction") or "").strip()
        return f"{asked}\n{row['transcript']}"
    return row["transcript"]


def store_teacher_answers(path, stored, keys, rows, tasks):
    """Add the teacher's answers of ``rows`` to ``stored`` and write them
    to ``path`` (a ``teacher_answers.json``), atomically.

    Arguments
    ---------
    path : str or pathlib.Path
        The file.
    stored : dict
        What :func:`load_teacher_answers` read; updated in place.
    keys : dict
        ``{task name: key}`` (:func:`teacher_keys`).
    rows : list of dict
        Decoded rows (``task``, ``utt``, ``teacher`` and what
        :func:`teacher_input` reads).
    tasks : dict
        ``{task name: instruction}``.

    Example
    -------
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "teacher_answers.json"
    >>> rows = [dict(task="repeat", utt="a", transcript="one", teacher="One.")]
    >>> store_teacher_answers(path, {}, {"repeat": "k1"}, rows, {"repeat": "R:"})
    >>> load_teacher_answers(path)
    {'k1': {'a': ['one', 'One.']}}
    """
    for r in rows:
        stored.setdefault(keys[r["task"]], {})[r["utt"]] = [
            teacher_input(r, tasks[r["task"]]),
            r["teacher"],
        ]
    atomic_write_text(
        path,
        json.dumps(
            {"version": TEACHER_CACHE_VERSION, "answers": stored},
            ensure_ascii=False,
        ),
    )
