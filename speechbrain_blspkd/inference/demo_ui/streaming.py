"""The growing answer of a speech LLM, one generated token at a time: the
``streamer`` that ``transformers`` ``generate`` feeds, iterated by the demo
page while a worker thread decodes.
"""

import threading


class TokenStreamer:
    """The growing answer, one generated token at a time.

    ``transformers`` ``generate(streamer=...)`` calls :meth:`put` with the
    prompt first (skipped; empty for a prompt of embeddings), then with each
    new token, and :meth:`end` at the end. Iterating yields the decoded text
    so far after each token, except while the last tokens are an incomplete
    UTF-8 character (the text would end with U+FFFD).

    Arguments
    ---------
    tokenizer : transformers tokenizer
        Decodes the ids (special tokens skipped).
    timeout : float
        Longest wait for the next token, in seconds.

    Example
    -------
    >>> import torch
    >>> from speechbrain_blspkd.testing import doctest_tokenizer
    >>> tok = doctest_tokenizer()
    >>> streamer = TokenStreamer(tok)
    >>> streamer.put(torch.zeros(1, 0, dtype=torch.long))  # the prompt
    >>> for i in tok("hello world")["input_ids"]:
    ...     streamer.put(torch.tensor([i]))
    >>> streamer.end()
    >>> list(streamer)[-1] == tok.decode(tok("hello world")["input_ids"],
    ...     skip_special_tokens=True)
    True
    """

    _END = object()

    def __init__(self, tokenizer, timeout=600.0):
        import queue

        self.tokenizer = tokenizer
        self.timeout = timeout
        self._queue = queue.Queue()
        self._ids = []
        self._prompt_seen = False
        self._shown = ""

    def put(self, value):
        """Receive the prompt (first call) or the next token(s)."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else value
        self._ids += [int(i) for i in ids]
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text != self._shown and not text.endswith("\ufffd"):
            self._shown = text
            self._queue.put(text)

    def end(self):
        """Generation is over (also after an error): the rest is shown."""
        if self._ids:
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            if text != self._shown:
                self._shown = text
                self._queue.put(text)
        self._queue.put(self._END)

    def __iter__(self):
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is self._END:
                return
            yield item


def stream_decode(decode, tokenizer, num_beams=1):
    """Yield the growing text of ``decode`` run in a worker thread; the
    last value is what ``decode`` returns.

    Arguments
    ---------
    decode : callable
        ``decode(streamer=None)``: generates, feeding ``streamer`` (a
        :class:`TokenStreamer`) when given one, and returns the answer.
    tokenizer : transformers tokenizer
        Decodes the streamed ids.
    num_beams : int
        Beams of the generation: with more than one nothing streams
        (``transformers`` streams greedy decoding only), the answer comes
        at once.

    Yields
    ------
    str
    """
    if num_beams != 1:  # transformers streams greedy decoding only
        yield decode()
        return
    streamer = TokenStreamer(tokenizer)
    result = {}

    def work():
        try:
            result["answer"] = decode(streamer=streamer)
        except BaseException as err:  # re-raised in the caller
            result["error"] = err
        finally:
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    for text in streamer:
        if text.strip():
            yield text
    worker.join()
    if "error" in result:
        raise result["error"]
    yield result["answer"]
