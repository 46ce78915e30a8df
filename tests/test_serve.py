"""blspkd-serve: a live uvicorn on loopback, driven by the official openai
client. Answers (plain and streamed) equal SpeechLLM's; every bad input gets
its OpenAI-style error; concurrent clients are batched and answered
correctly; a client killed mid-stream frees its slot and disturbs nobody."""

import asyncio
import base64
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from speechbrain_blspkd.inference.export import export_model  # noqa: E402
from speechbrain_blspkd.prompt import context_limit  # noqa: E402
from speechbrain_blspkd.serve.app import (  # noqa: E402
    BackgroundServer,
    create_app,
)
from speechbrain_blspkd.testing import (  # noqa: E402
    tiny_saved_speech_llm,
    write_speechlike_wav,
)

CPU = {"device": "cpu"}
MAX_NEW = 8
TIMEOUT = 60.0


def _load(folder):
    from speechbrain_blspkd.inference import SpeechLLM

    return SpeechLLM.from_hparams(source=folder, run_opts=CPU)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    # fp32 like the reference (bf16 on an AMX CPU can flip greedy tokens)
    options = {"max_new_tokens": MAX_NEW, "llm_dtype": None}
    options["encoder_dtype"] = None
    folders = {
        "alpha": export_model(
            tiny_saved_speech_llm(tmp / "a", seed=0, instruction="Repeat:"),
            tmp / "a" / "alpha",
            options,
        ),
        "beta": export_model(
            tiny_saved_speech_llm(tmp / "b", seed=1),
            tmp / "b" / "beta",
            options,
        ),
    }
    # the server's models and separate reference copies (no shared state)
    served = {name: _load(f) for name, f in folders.items()}
    refs = {name: _load(f) for name, f in folders.items()}
    clips = [
        write_speechlike_wav(
            tmp / f"clip{i}.wav", 0.5 + 0.2 * i, seed=i, pitch=170 + 40 * i
        )
        for i in range(4)
    ]
    app = create_app(served, max_batch=8, max_wait_ms=150)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(
            base_url=server.url + "/v1",
            api_key="unused",
            timeout=TIMEOUT,
            max_retries=0,
        )
        yield {
            "tmp": tmp,
            "refs": refs,
            "clips": clips,
            "url": server.url,
            "client": client,
        }


def _b64(path):
    return base64.b64encode(open(path, "rb").read()).decode()


def _audio_part(path, fmt="wav"):
    return {
        "type": "input_audio",
        "input_audio": {"data": _b64(path), "format": fmt},
    }


def _messages(path, instruction=None, fmt="wav"):
    content = []
    if instruction is not None:
        content.append({"type": "text", "text": instruction})
    content.append(_audio_part(path, fmt))
    return [{"role": "user", "content": content}]


def _stats(setup):
    return httpx.get(setup["url"] + "/health", timeout=TIMEOUT).json()[
        "batcher"
    ]


def _streamed(stream):
    chunks = list(stream)
    text = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices
    )
    return text, chunks


def test_models_and_health(setup):
    ids = [m.id for m in setup["client"].models.list()]
    assert ids == ["alpha", "beta"]
    health = httpx.get(setup["url"] + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["models"] == ids
    assert health["batcher"]["max_batch"] == 8


def test_answer_equals_generate_file(setup):
    client, ref = setup["client"], setup["refs"]["alpha"]
    clip = setup["clips"][1]
    for instruction in ("Say it again.", None):
        out = client.chat.completions.create(
            model="alpha",
            messages=_messages(clip, instruction),
            temperature=0,
        )
        assert out.choices[0].message.content == ref.generate_file(
            clip, instruction
        )
        assert out.choices[0].message.role == "assistant"
        usage = out.usage
        assert 0 < usage.completion_tokens <= MAX_NEW
        assert usage.prompt_tokens > 0
        assert (
            usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        )
    # a system message is the instruction when the user gives none
    out = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "system", "content": "Say it again."}]
        + _messages(clip),
        temperature=0,
        max_tokens=3,
    )
    assert out.choices[0].message.content == ref.generate_file(
        clip, "Say it again.", max_new_tokens=3
    )
    assert out.usage.completion_tokens <= 3
    # flac and mp3 are read as SpeechLLM reads those files
    wav, rate = sf.read(str(clip), dtype="float32")
    for fmt in ("flac", "mp3"):
        path = setup["tmp"] / f"clip.{fmt}"
        sf.write(str(path), wav, rate, format=fmt.upper())
        out = client.chat.completions.create(
            model="alpha", messages=_messages(path, fmt=fmt), temperature=0
        )
        assert out.choices[0].message.content == ref.generate_file(path)


def test_streamed_answer_equals_generate_file(setup):
    client, ref = setup["client"], setup["refs"]["alpha"]
    for clip, instruction, max_tokens in [
        (setup["clips"][0], None, None),
        (setup["clips"][2], "Tell me more.", 40),
    ]:
        text, chunks = _streamed(
            client.chat.completions.create(
                model="alpha",
                messages=_messages(clip, instruction),
                temperature=0,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        gen = {} if max_tokens is None else {"max_new_tokens": max_tokens}
        assert text == ref.generate_file(clip, instruction, **gen)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [
            c.choices[0].finish_reason
            for c in chunks
            if c.choices and c.choices[0].finish_reason
        ]
        assert len(finishes) == 1 and finishes[0] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens > 0
        if max_tokens:  # several deltas, not one block
            assert len([c for c in chunks if c.choices]) > 3
    # the raw stream ends with [DONE]
    payload = {
        "model": "alpha",
        "messages": _messages(setup["clips"][0]),
        "stream": True,
    }
    with httpx.stream(
        "POST",
        setup["url"] + "/v1/chat/completions",
        json=payload,
        timeout=TIMEOUT,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in response.iter_lines() if x.strip()]
    assert lines[-1] == "data: [DONE]"


def test_text_request_is_answered_by_the_llm(setup):
    client, ref = setup["client"], setup["refs"]["alpha"]
    out = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "the cat sat on the mat"}],
        temperature=0,
    )
    assert out.choices[0].message.content == ref.generate_text(
        "the cat sat on the mat"
    )
    text, _ = _streamed(
        client.chat.completions.create(
            model="alpha",
            messages=[
                {"role": "system", "content": "Answer the question."},
                {"role": "user", "content": "what is it"},
            ],
            stream=True,
        )
    )
    assert text == ref.generate_text("what is it", "Answer the question.")


def test_model_picks_the_folder(setup):
    clip = setup["clips"][3]
    answers = {}
    for name in ("alpha", "beta"):
        out = setup["client"].chat.completions.create(
            model=name, messages=_messages(clip), temperature=0
        )
        answers[name] = out.choices[0].message.content
        assert answers[name] == setup["refs"][name].generate_file(clip)
        assert out.model == name
    assert answers["alpha"] != answers["beta"]


def _refused(client, status, code=None, match=None, **request):
    request.setdefault("model", "alpha")
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    err = info.value
    assert err.status_code == status, (err.status_code, err.message)
    body = err.body if isinstance(err.body, dict) else {}
    body = body.get("error", body)
    if code is not None:
        assert body.get("code") == code, body
    if match is not None:
        assert match in body.get("message", ""), body
    return body


def test_every_bad_input_gets_its_error(setup):
    client, tmp, clip = setup["client"], setup["tmp"], setup["clips"][0]

    def audio(data, fmt="wav"):
        return [
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": data, "format": fmt},
                    }
                ],
            }
        ]

    _refused(
        client, 400, "invalid_base64", "not valid base64", messages=audio("%%")
    )
    note = base64.b64encode(b"this is a note, not audio\n").decode()
    _refused(
        client, 400, "invalid_audio", "not wav audio", messages=audio(note)
    )
    _refused(client, 400, "empty_audio", "empty", messages=audio(""))
    empty = tmp / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1), "float32"), 16000)
    _refused(client, 400, "empty_audio", messages=audio(_b64(empty)))
    silent = tmp / "silent.wav"
    sf.write(str(silent), np.zeros(16000, "float32"), 16000)
    _refused(
        client, 400, "silent_audio", "no signal", messages=audio(_b64(silent))
    )
    long = write_speechlike_wav(tmp / "long.wav", 31, sample_rate=8000)
    body = _refused(
        client, 413, "audio_too_long", "31.0 s", messages=audio(_b64(long))
    )
    assert body["param"] == "messages[0].content[0].data"
    _refused(
        client, 400, "unsupported_format", messages=audio(_b64(clip), "ogg")
    )
    _refused(
        client,
        404,
        "model_not_found",
        "'gamma'",
        model="gamma",
        messages=_messages(clip),
    )
    _refused(
        client,
        400,
        "context_length_exceeded",
        messages=_messages(clip),
        max_tokens=600,
    )
    _refused(
        client,
        400,
        "context_length_exceeded",
        messages=[{"role": "user", "content": "word " * 600}],
    )
    # malformed messages
    _refused(client, 422, "invalid_request", messages=[{"content": "x"}])
    _refused(
        client,
        422,
        "invalid_request",
        messages=[{"role": "user", "content": [{"type": "video"}]}],
    )
    _refused(client, 422, "invalid_request", messages=[])
    _refused(
        client,
        422,
        "invalid_messages",
        "no 'user' message",
        messages=[{"role": "system", "content": "hi"}],
    )
    two = _messages(clip)
    two[0]["content"].append(_audio_part(clip))
    _refused(client, 422, "invalid_messages", "2 input_audio", messages=two)
    _refused(
        client,
        422,
        "invalid_messages",
        messages=[{"role": "user", "content": [{"type": "text", "text": " "}]}],
    )
    # and the server keeps serving
    out = client.chat.completions.create(
        model="alpha", messages=_messages(clip), temperature=0
    )
    assert out.choices[0].message.content == setup["refs"][
        "alpha"
    ].generate_file(clip)


def test_a_failure_in_a_batch_spares_its_batch_mates(setup):
    """A prompt that overflows the context only once its speech is counted
    (past the pre-check) fails its batch; its mates are answered alone."""
    ref = setup["refs"]["alpha"]
    clip = setup["clips"][3]
    limit = context_limit(ref.model.llm)
    long_instruction = "Say it again. " * 25
    _, counts = ref.model.generate(
        ref.load_file(clip)[None],
        instructions=long_instruction,
        max_new_tokens=1,
        return_num_tokens=True,
    )
    bare = len(ref.model.prompts.build(long_instruction, n_speech=0).input_ids)
    assert counts[0] >= 2
    max_tokens = limit - bare - int(counts[0]) // 2
    good = setup["clips"][:3]
    expected = [ref.generate_file(c, max_new_tokens=max_tokens) for c in good]
    before = _stats(setup)

    async def run():
        client = openai.AsyncOpenAI(
            base_url=setup["url"] + "/v1", api_key="x", max_retries=0
        )
        requests = [
            client.chat.completions.create(
                model="alpha",
                messages=_messages(clip, long_instruction),
                max_tokens=max_tokens,
            )
        ] + [
            client.chat.completions.create(
                model="alpha", messages=_messages(c), max_tokens=max_tokens
            )
            for c in good
        ]
        try:
            return await asyncio.gather(*requests, return_exceptions=True)
        finally:
            await client.close()

    bad, *answers = asyncio.run(run())
    assert isinstance(bad, openai.BadRequestError), bad
    assert bad.body["code"] == "context_length_exceeded"
    assert "request" in bad.body["message"]
    assert [a.choices[0].message.content for a in answers] == expected
    after = _stats(setup)
    assert after["retried_alone"] > before["retried_alone"]
    assert after["failed"] == before["failed"] + 1


def test_sixteen_concurrent_clients_are_batched(setup):
    ref = setup["refs"]["alpha"]
    clips = setup["clips"]
    instructions = [None, "Say it again."]
    jobs = [
        (clips[i % 4], instructions[(i // 4) % 2], i % 3 == 0)
        for i in range(16)
    ]
    expected = {(str(c), ins): ref.generate_file(c, ins) for c, ins, _ in jobs}
    before = _stats(setup)

    async def one(client, clip, instruction, stream):
        request = dict(
            model="alpha",
            messages=_messages(clip, instruction),
            temperature=0,
        )
        if not stream:
            raw = await client.chat.completions.with_raw_response.create(
                **request
            )
            size = int(raw.headers["x-blspkd-batch-size"])
            return raw.parse().choices[0].message.content, size
        text = ""
        async for chunk in await client.chat.completions.create(
            stream=True, **request
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text, None

    async def run():
        client = openai.AsyncOpenAI(
            base_url=setup["url"] + "/v1",
            api_key="x",
            max_retries=0,
            timeout=TIMEOUT,
        )
        try:
            return await asyncio.gather(*(one(client, *j) for j in jobs))
        finally:
            await client.close()

    results = asyncio.run(run())
    for (clip, instruction, _), (text, _) in zip(jobs, results):
        assert text == expected[(str(clip), instruction)]
    after = _stats(setup)
    assert after["answered"] - before["answered"] == 16
    formed = {
        int(k): v - before["batch_sizes"].get(k, 0)
        for k, v in after["batch_sizes"].items()
    }
    assert sum(k * v for k, v in formed.items()) == 16
    assert max(k for k, v in formed.items() if v > 0) > 1, formed
    assert all(k <= 8 for k in formed)
    sizes = [s for _, s in results if s is not None]
    assert max(sizes) > 1


VICTIM = """
import json, sys, httpx
url, payload = sys.argv[1], json.loads(sys.stdin.read())
with httpx.stream("POST", url, json=payload, timeout=60) as response:
    for line in response.iter_lines():
        if '"content": "' in line and '"content": ""' not in line:
            print("streaming", flush=True)
            sys.stdin.read()  # wait to be killed
"""


def test_a_client_killed_mid_stream_disturbs_nobody(setup):
    ref = setup["refs"]["alpha"]
    clip = setup["clips"][0]
    limit = context_limit(ref.model.llm)
    long = limit - 100  # room for the prompt: a long answer to cut
    victim_payload = {
        "model": "alpha",
        "messages": _messages(clip),
        "stream": True,
        "max_tokens": long,
    }
    expected = [ref.generate_file(c) for c in setup["clips"]]
    before = _stats(setup)
    import json

    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, setup["url"] + "/v1/chat/completions"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        victim.stdin.write(json.dumps(victim_payload))
        victim.stdin.flush()
        victim.stdin.close()
        assert victim.stdout.readline().strip() == "streaming"

        async def run():
            client = openai.AsyncOpenAI(
                base_url=setup["url"] + "/v1",
                api_key="x",
                max_retries=0,
                timeout=TIMEOUT,
            )
            try:
                tasks = [
                    asyncio.ensure_future(
                        client.chat.completions.create(
                            model="alpha", messages=_messages(c), temperature=0
                        )
                    )
                    for c in setup["clips"]
                ]
                await asyncio.sleep(0.05)
                victim.kill()  # mid-stream, while the others wait
                return await asyncio.gather(*tasks)
            finally:
                await client.close()

        answers = asyncio.run(run())
    finally:
        victim.kill()
        victim.wait(10)
    assert [a.choices[0].message.content for a in answers] == expected
    deadline = time.monotonic() + 10
    while _stats(setup)["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the killed client's row ran on"
        time.sleep(0.1)
    after = _stats(setup)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["queued"] == 0
    # still serving
    out = setup["client"].chat.completions.create(
        model="alpha", messages=_messages(clip), temperature=0
    )
    assert out.choices[0].message.content == expected[0]
