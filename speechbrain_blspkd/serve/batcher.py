"""Dynamic batching of concurrent requests on the loaded models.

Requests wait in one queue. A worker thread takes the oldest one and the
queued requests that can share its batch (same model, same input kind,
same generation options), waiting at most ``max_wait_ms`` from the oldest
one's arrival for the batch to fill up to ``max_batch``; then it decodes
them together through the model's batched generation
(:meth:`SpeechLLM.generate_waveforms
<speechbrain_blspkd.inference.speech_llm.SpeechLLM.generate_waveforms>` or
:meth:`~speechbrain_blspkd.inference.speech_llm.SpeechLLM.generate_text`),
whose answers are those of one-by-one decoding. While a batch decodes the
next requests queue up, so batches grow with the load.

Each request has its own token stream out of the shared batch: the
``transformers`` streamer receives a (B,) tensor of new tokens per step and
hands row ``i`` to request ``i``. A request whose client went away is
cancelled: a stopping criterion ends its row at the next step (the batch
ends when every row has), and a cancelled request still in the queue is
dropped. A batch that fails is decoded again request by request, so only
the requests at fault fail.

Nothing here is asynchronous: the app gives each :class:`Job` a callback
that forwards its events to the event loop.
"""

import collections
import itertools
import logging
import threading
import time

import torch

__all__ = ["Batcher", "Job"]

logger = logging.getLogger(__name__)

_ids = itertools.count(1)


class Job:
    """One request: its input, generation options and event callback.

    Arguments
    ---------
    model : str
        Name of the loaded model.
    instruction : str
        The instruction (resolved: never None).
    wav : torch.Tensor, optional
        (samples,) clip at the model's rate (an audio request).
    text : str, optional
        Transcript (a text request: the LLM alone, PLoRA off).
    gen : dict, optional
        Generation options (``max_new_tokens``, sampling ...); requests
        share a batch only when these are equal.
    emit : callable, optional
        ``emit(kind, value)`` with kind ``"delta"`` (new answer text),
        ``"done"`` (the result dict) or ``"error"`` (the exception); called
        from the worker thread.
    stream : bool
        Whether ``"delta"`` events are wanted (decoding text per token).
    """

    def __init__(
        self,
        model,
        instruction,
        wav=None,
        text=None,
        gen=None,
        emit=None,
        stream=False,
    ):
        if (wav is None) == (text is None):
            raise ValueError("Job: give a wav or a text")
        self.id = next(_ids)
        self.model = model
        self.instruction = instruction
        self.wav = wav
        self.text = text
        self.kind = "audio" if wav is not None else "text"
        self.gen = dict(gen or {})
        self.emit = emit or (lambda kind, value: None)
        self.stream = stream
        self.key = (model, self.kind, tuple(sorted(self.gen.items())))
        self.cancelled = threading.Event()
        self.enqueued = time.monotonic()
        self.batch_size = None
        self.ids = []
        self.ended = False  # an end-of-turn token was generated
        self.shown = ""  # answer text already sent as deltas
        self.finished = False

    def cancel(self):
        """The client is gone: drop the request, or end its row."""
        self.cancelled.set()

    # -------------------------------------------------- worker thread side
    def _restart(self):
        self.ids = []
        self.ended = False

    def _token(self, token, tokenizer, stops):
        if self.ended:
            return
        if token in stops:
            self.ended = True
            return
        self.ids.append(token)
        if not self.stream:
            return
        text = tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") or len(text) <= len(self.shown):
            return
        if text.startswith(self.shown):
            self._send("delta", text[len(self.shown) :])
            self.shown = text

    def _finish(self, answer, prompt_tokens, completion_tokens):
        if self.stream and len(answer) > len(self.shown):
            if answer.startswith(self.shown):
                self._send("delta", answer[len(self.shown) :])
                self.shown = answer
            else:  # cannot happen for a prefix-stable tokenizer
                logger.warning(
                    "request %d: streamed text is not a prefix of the answer",
                    self.id,
                )
        max_new = self.gen.get("max_new_tokens")
        length = (
            not self.ended
            and max_new is not None
            and completion_tokens >= max_new
        )
        self.finished = True
        self._send(
            "done",
            {
                "answer": answer,
                "prompt_tokens": int(prompt_tokens),
                "completion_tokens": int(completion_tokens),
                "finish_reason": "length" if length else "stop",
                "batch_size": self.batch_size,
            },
        )

    def _fail(self, err):
        self.finished = True
        self._send("error", err)

    def _send(self, kind, value):
        try:
            self.emit(kind, value)
        except Exception:  # the client's loop is gone: nobody listens
            logger.debug("request %d: %s event dropped", self.id, kind)


class _RowStreamer:
    """``transformers`` streamer that hands row ``i`` of each step to job i."""

    def __init__(self, jobs, tokenizer, stops):
        self.jobs = jobs
        self.tokenizer = tokenizer
        self.stops = stops
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # the prompt (empty: embeddings)
            self._prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        for job, token in zip(self.jobs, tokens):
            job._token(int(token), self.tokenizer, self.stops)

    def end(self):
        pass


def _cancel_criteria(jobs):
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        """Ends the rows of cancelled requests."""

        def __call__(self, input_ids, scores, **kwargs):
            flags = [job.cancelled.is_set() for job in jobs]
            return torch.tensor(
                flags, dtype=torch.bool, device=input_ids.device
            )

    return Cancelled()


class Batcher:
    """Queue + worker thread forming and decoding batches.

    Arguments
    ---------
    models : dict of str to SpeechLLM
        The loaded models by name.
    max_batch : int
        Most requests decoded together.
    max_wait_ms : float
        Longest wait, from the oldest queued request's arrival, for a batch
        to fill.
    history : int
        How many recent batch sizes :meth:`stats` lists.

    Example
    -------
    >>> batcher = Batcher({}, max_batch=4, max_wait_ms=5)
    >>> batcher.start(); batcher.stats()["batches"]
    0
    >>> batcher.stop()
    """

    def __init__(self, models, max_batch=8, max_wait_ms=20.0, history=1000):
        if max_batch < 1:
            raise ValueError("Batcher: max_batch must be >= 1")
        self.models = dict(models)
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self._pending = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = None
        self._sizes = collections.deque(maxlen=history)
        self._histogram = collections.Counter()
        self._counts = collections.Counter()
        self._busy = 0

    # ------------------------------------------------------------- control
    def start(self):
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="blspkd-serve-batcher", daemon=True
            )
            self._thread.start()

    def stop(self, timeout=30.0):
        """Fail the queued requests and stop after the running batch."""
        with self._cond:
            self._closed = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in left:
            job._fail(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job):
        """Queue ``job`` (its events arrive through ``job.emit``)."""
        if job.model not in self.models:
            raise KeyError(job.model)
        job.enqueued = time.monotonic()
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._pending.append(job)
            self._counts["submitted"] += 1
            self._cond.notify_all()
        return job

    def stats(self):
        """Counters and the batch sizes formed (JSON-able).

        ``batch_sizes``: how many batches had each size; ``recent``: the
        last sizes in order; ``cancelled``: requests whose client went away.
        """
        with self._cond:
            return {
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000.0,
                "queued": len(self._pending),
                "running": self._busy,
                "batches": sum(self._histogram.values()),
                "batch_sizes": {
                    str(k): v for k, v in sorted(self._histogram.items())
                },
                "recent": list(self._sizes),
                **{
                    name: self._counts[name]
                    for name in (
                        "submitted",
                        "answered",
                        "failed",
                        "cancelled",
                        "retried_alone",
                    )
                },
            }

    # --------------------------------------------------------------- worker
    def _next_batch(self):
        with self._cond:
            while True:
                for job in [j for j in self._pending if j.cancelled.is_set()]:
                    self._pending.remove(job)
                    self._counts["cancelled"] += 1
                if self._closed:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                head = self._pending[0]
                deadline = head.enqueued + self.max_wait
                same = [j for j in self._pending if j.key == head.key]
                left = deadline - time.monotonic()
                if len(same) < self.max_batch and left > 0:
                    self._cond.wait(left)
                    continue
                batch = same[: self.max_batch]
                for job in batch:
                    self._pending.remove(job)
                self._busy = len(batch)
                self._sizes.append(len(batch))
                self._histogram[len(batch)] += 1
                return batch

    def _loop(self):
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as err:  # never let the worker die
                logger.exception("batch failed outside decoding")
                for job in batch:
                    if not job.finished:
                        job._fail(err)
            finally:
                with self._cond:
                    self._busy = 0

    def _run(self, batch):
        for job in batch:
            job.batch_size = len(batch)
        try:
            self._decode(batch)
        except Exception as err:
            if len(batch) == 1:
                self._failed(batch[0], err)
                return
            logger.info(
                "a batch of %d failed (%s); decoding its requests alone",
                len(batch),
                err,
            )
            for job in batch:
                if job.cancelled.is_set():
                    self._count("cancelled")
                    job._fail(RuntimeError("cancelled"))
                    continue
                self._count("retried_alone")
                try:
                    self._decode([job])
                except Exception as err_alone:
                    self._failed(job, err_alone)

    def _count(self, name):
        with self._cond:
            self._counts[name] += 1

    def _failed(self, job, err):
        self._count("failed")
        job._fail(err)

    def _decode(self, jobs):
        llm = self.models[jobs[0].model]
        model = llm.model
        gen = dict(jobs[0].gen)
        from transformers import StoppingCriteriaList

        gen["stopping_criteria"] = StoppingCriteriaList(
            [_cancel_criteria(jobs)]
        )
        beams = int(gen.get("num_beams", llm.hparams.num_beams))
        tokenizer = model.tokenizer
        streamed = beams == 1  # transformers streams greedy/sampling only
        if streamed:
            stops = set(model.prompts.eot_ids)
            if tokenizer.pad_token_id is not None:
                stops.add(tokenizer.pad_token_id)
            gen["streamer"] = _RowStreamer(jobs, tokenizer, stops)
        for job in jobs:
            job._restart()
        instructions = [job.instruction for job in jobs]
        if jobs[0].kind == "audio":
            answers, counts = llm.generate_waveforms(
                [job.wav for job in jobs],
                instructions,
                names=[f"request {job.id}" for job in jobs],
                return_num_tokens=True,
                **gen,
            )
            prompts = model.prompts.build_batch(
                instructions, n_speech=[int(c) for c in counts]
            )
        else:
            texts = [job.text for job in jobs]
            answers = llm.generate_text(texts, instructions, **gen)
            prompts = model.prompts.build_batch(instructions, transcripts=texts)
        for job, answer, prompt in zip(jobs, answers, prompts):
            if job.cancelled.is_set():
                self._count("cancelled")
                job._fail(RuntimeError("cancelled"))
                continue
            if streamed:
                completion = len(job.ids)
            else:
                completion = len(
                    tokenizer(answer, add_special_tokens=False)["input_ids"]
                )
            self._count("answered")
            job._finish(answer, len(prompt.input_ids), completion)
