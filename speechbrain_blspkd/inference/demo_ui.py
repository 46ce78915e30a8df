"""``blspkd-demo-ui``: talk to exported speech LLMs in the browser.

::

    blspkd-demo-ui --model FOLDER [--model FOLDER2 ...] [--host 127.0.0.1] \\
        [--port 7860] [--asr whisper-base|FOLDER|none] [--device cpu|cuda] \\
        [--max-new-tokens N] [--instruction TEXT ...]

A page (gradio, the optional ``demo`` extra: ``pip install
'speechbrain_blspkd[demo]'``) where a person records from the microphone
or uploads a file, chooses or types an instruction, and presses *Answer*:

* each model's answer to the speech streams in token by token (the text
  shown at the end is exactly what :meth:`SpeechLLM.generate_file
  <speechbrain_blspkd.inference.speech_llm.SpeechLLM.generate_file>` gives
  for the same file and instruction);
* beside it, the cascade: Whisper's transcript of the clip (``--asr``:
  an asset name or folder, default the model's own recogniser for an
  exported cascade, else ``whisper-base``; ``none``: no cascade) and what
  the same LLM answers to that transcript as text
  (:meth:`SpeechLLM.generate_text`), so one sees at a glance what the
  speech model heard;
* for a model whose adapter integrates and fires (CIF), the CIF weights
  over the waveform, each fired token marked and labelled with the LLM
  token nearest to its embedding; once Whisper's transcript is there, and
  when the model's encoder is a Whisper whose decoder lists alignment
  heads, thin green lines also mark where each LLM token of the
  transcript starts (:mod:`speechbrain_blspkd.dataprep.token_timings` on
  the model's own encoder features of the clip; the decoder is loaded
  once, on first use), so one sees where the CIF fired against where the
  tokens are.

Several ``--model`` folders are compared side by side, one column each.
Bad input (no audio, silence, a clip longer than the model takes, a file
that is not audio) gets a clear message on the page (``#status``); the
server keeps running whatever a request does.

Authors
 * speechbrain-blspkd contributors 2026
"""

import argparse
import logging
import os
import pathlib
import sys
import tempfile
import threading
import time

import torch

from speechbrain_blspkd.utils.cli import report_error

__all__ = [
    "DemoBackend",
    "DemoInputError",
    "TokenStreamer",
    "build_app",
    "main",
    "plot_cif_over_waveform",
]

logger = logging.getLogger(__name__)

PROG = "blspkd-demo-ui"

#: Peak level under which a clip counts as silence (full scale = 1.0;
#: 1e-3 is -60 dBFS).
SILENCE_PEAK = 1e-3

#: Instructions offered besides the models' own (typing another works too).
EXTRA_INSTRUCTIONS = (
    "Repeat the following text exactly:",
    "Continue the following text in a coherent style:",
    "Answer the question.",
    "Summarise what is said in one sentence.",
)

DEMO_EXTRA_HINT = (
    "the browser demo needs gradio: pip install 'speechbrain_blspkd[demo]'"
)


class DemoInputError(ValueError):
    """Input the page explains instead of answering (the message is shown)."""


def _peak_dbfs(peak):
    import math

    return 20.0 * math.log10(max(float(peak), 1e-12))


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
    >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
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


class DemoBackend:
    """Everything the page does, without the page: loads the models and the
    recogniser, checks a clip, streams answers, draws the CIF weights.

    Arguments
    ---------
    models : list of (str, SpeechLLM)
        Labels and loaded models, in column order.
    transcriber : speechbrain_blspkd.nnet.whisper_asr.WhisperTranscriber, optional
        The cascade's recogniser (None: no cascade).
    max_new_tokens : int, optional
        Generation limit (default: each model's own).
    plot_dir : str or pathlib.Path, optional
        Where the CIF plots are written (default: a new temporary folder).
    """

    def __init__(
        self, models, transcriber=None, max_new_tokens=None, plot_dir=None
    ):
        if not models:
            raise ValueError("DemoBackend: give at least one model")
        self.models = list(models)
        self.transcriber = transcriber
        self.gen = {}
        if max_new_tokens is not None:
            self.gen["max_new_tokens"] = int(max_new_tokens)
        self.plot_dir = pathlib.Path(
            plot_dir or tempfile.mkdtemp(prefix="blspkd-demo-")
        )
        self.plot_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one request at a time on the models
        self._count = 0
        self.has_cif = [self._probe_cif(llm) for _, llm in self.models]
        # Whisper decoders for the token timings, by (source, device):
        # loaded on first use, None when they cannot be had
        self._teachers = {}

    # ---------------------------------------------------------------- input
    @property
    def max_seconds(self):
        """The shortest ``max_audio_seconds`` of the models (None: no limit)."""
        limits = [
            float(llm.hparams.max_audio_seconds)
            for _, llm in self.models
            if llm.hparams.max_audio_seconds is not None
        ]
        return min(limits) if limits else None

    def load_clip(self, path):
        """The clip of ``path`` as the models take it, or a clear refusal.

        Arguments
        ---------
        path : str or None
            What the page received (None: nothing was recorded/uploaded).

        Returns
        -------
        torch.Tensor
            (samples,) float32 at the models' sample rate.

        Raises
        ------
        DemoInputError
            No audio, a file that is not audio, a clip that is too long or
            silent (the message says what to do).
        """
        from speechbrain_blspkd.dataio.audio import AudioError, load_audio

        if path is None or str(path).strip() == "":
            raise DemoInputError(
                "No audio: record from the microphone or upload a file first."
            )
        name = pathlib.Path(str(path)).name
        sample_rate = int(self.models[0][1].hparams.sample_rate)
        try:
            wav = load_audio(path, sample_rate=sample_rate)
        except AudioError as err:
            text = str(err)
            if "zero-length" in text:
                raise DemoInputError(
                    f"The clip {name!r} is empty (no samples): record or "
                    "upload again."
                ) from None
            raise DemoInputError(
                f"{name!r} is not an audio file this demo can read (WAV, "
                "FLAC, OGG or MP3 are): " + text.split(": ", 1)[-1]
            ) from None
        seconds = wav.numel() / sample_rate
        limit = self.max_seconds
        if limit is not None and seconds > limit:
            raise DemoInputError(
                f"The clip is {seconds:.1f} s long; the model takes at most "
                f"{limit:g} s (Whisper's window). Trim it or record a "
                "shorter one."
            )
        peak = float(wav.abs().max()) if wav.numel() else 0.0
        if peak < SILENCE_PEAK:
            level = (
                "no signal"
                if peak == 0
                else f"peak {_peak_dbfs(peak):.0f} dBFS"
            )
            raise DemoInputError(
                f"The clip is silent ({level}): check the microphone, or "
                "upload a clip with speech."
            )
        return wav

    # --------------------------------------------------------------- answers
    def stream_answer(self, index, wav, instruction):
        """Yield the growing answer of model ``index``; the last is exact.

        Decoding runs in a worker thread that feeds a
        ``transformers.TextIteratorStreamer``; the final value yielded is
        the string :meth:`SpeechLLM.generate_waveforms` returns (the same
        as :meth:`SpeechLLM.generate_file` on the same audio).

        Arguments
        ---------
        index : int
            The model's column.
        wav : torch.Tensor
            (samples,) clip.
        instruction : str or None
            Instruction (None: the model's own).

        Yields
        ------
        str
        """
        llm = self.models[index][1]
        yield from self._stream(
            llm,
            lambda **extra: llm.generate_waveforms(
                [wav], instruction, **self.gen, **extra
            )[0],
        )

    def stream_text_answer(self, index, transcript, instruction):
        """Yield the growing answer of model ``index``'s LLM to a transcript
        (the cascade: PLoRA off, text prompt); the last is exact."""
        llm = self.models[index][1]
        yield from self._stream(
            llm,
            lambda **extra: llm.generate_text(
                transcript, instruction, **self.gen, **extra
            ),
        )

    def _stream(self, llm, decode):
        beams = int(self.gen.get("num_beams", llm.hparams.num_beams))
        if beams != 1:  # transformers streams greedy decoding only
            yield decode()
            return
        streamer = TokenStreamer(llm.model.tokenizer)
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

    def transcribe(self, wav):
        """Whisper's transcript of the clip ("" without a recogniser)."""
        if self.transcriber is None:
            return ""
        with torch.no_grad():
            return self.transcriber.transcribe(wav[None].float())[0]

    # ------------------------------------------------------------------ CIF
    @staticmethod
    def _adapter_output(llm, wav):
        model = llm.model
        if getattr(model, "adapter", None) is None:
            return None
        wavs = wav[None].to(llm.device, torch.float32)
        with torch.no_grad():
            return model.encode_speech(wavs, torch.ones(1, device=llm.device))

    def _probe_cif(self, llm):
        try:
            rate = int(llm.hparams.sample_rate)
            out = self._adapter_output(llm, torch.zeros(rate // 2))
        except Exception as err:  # a probe must not stop the demo
            logger.warning("CIF probe failed (%s); no CIF plot", err)
            return False
        return (
            out is not None
            and hasattr(out, "alphas")
            and hasattr(out, "frame_mask")
        )

    def cif_plot(self, index, wav, transcript=None):
        """PNG of model ``index``'s CIF weights over the clip (None when
        its adapter does not fire tokens).

        With a ``transcript`` (Whisper's, on the page) and a model whose
        encoder is a Whisper with a decoder and alignment heads
        (:meth:`timing_teacher`), the plot also marks where each LLM token
        of the transcript starts (:meth:`token_timings`); otherwise it is
        drawn without these marks.

        Returns
        -------
        pathlib.Path or None
        """
        if not self.has_cif[index]:
            return None
        from speechbrain_blspkd.nnet.cif import fire_positions
        from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

        label, llm = self.models[index]
        wavs = wav[None].to(llm.device, torch.float32)
        with torch.no_grad():
            feats, feat_lens = llm.model.speech_features(
                wavs, torch.ones(1, device=llm.device)
            )
            out = llm.model.encode_speech(feats=feats, feat_lens=feat_lens)
        frames = out.frame_mask[0]
        alphas = out.alphas[0][frames].float().cpu()
        count = int(out.token_counts[0])
        threshold = float(getattr(llm.model.adapter, "threshold", 1.0))
        scaled = alphas * (count * threshold) / alphas.sum().clamp(min=1e-6)
        fires = fire_positions(scaled, threshold).tolist()
        tokens = out.tokens[0, :count].float()
        table, _ = llm.model.embedding_table(device=tokens.device)
        nearest = (
            torch.nn.functional.normalize(tokens, dim=-1) @ table.T
        ).argmax(-1)
        words = [
            _printable(llm.model.tokenizer.decode([int(t)]))
            for t in nearest.tolist()
        ]
        stride = float(getattr(llm.model.adapter, "frame_stride", 1) or 1)
        frame_rate = WhisperEncoder.frame_rate() / stride
        timings, timing_words = self.token_timings(
            index, feats, feat_lens, transcript
        )
        self._count += 1
        path = self.plot_dir / f"cif-{index}-{self._count}.png"
        plot_cif_over_waveform(
            wav,
            int(llm.hparams.sample_rate),
            scaled,
            fires,
            words,
            frame_rate,
            path,
            title=f"{label}: {count} speech tokens, sum(alpha) "
            f"{float(alphas.sum()):.1f}",
            token_timings=timings,
            timing_labels=timing_words,
        )
        return path

    # -------------------------------------------------------- token timings
    def timing_teacher(self, index):
        """Whisper's decoder that times transcripts for model ``index``.

        The decoder of the Whisper asset the model's encoder comes from
        (``encoder_source`` of the exported folder), teacher-forced by
        :func:`~speechbrain_blspkd.dataprep.token_timings.utterance_timings`.
        Loaded on first use and kept for the server's life (one per source
        and device); None, also kept, when the model has no Whisper
        encoder, the source has no loadable decoder or no alignment heads,
        or its width differs from the encoder's.

        Returns
        -------
        speechbrain_blspkd.dataprep.token_timings.WhisperDecoderTeacher or None
        """
        from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

        llm = self.models[index][1]
        encoder = getattr(llm.model, "encoder", None)
        source = getattr(llm.hparams, "encoder_source", None)
        if not source or not isinstance(encoder, WhisperEncoder):
            return None
        key = (str(source), str(llm.device))
        if key not in self._teachers:
            self._teachers[key] = self._load_teacher(source, encoder, llm)
        return self._teachers[key]

    @staticmethod
    def _load_teacher(source, encoder, llm):
        from speechbrain_blspkd.dataprep import token_timings

        why = None
        try:
            teacher = token_timings.WhisperDecoderTeacher(source)
        except Exception as err:  # no decoder: the plot goes without marks
            teacher, why = None, f"its decoder cannot be loaded ({err})"
        if teacher is not None and not teacher.alignment_heads:
            teacher, why = None, "it lists no alignment heads"
        if teacher is not None and teacher.width != encoder.output_size:
            teacher, why = None, "its decoder is not the encoder's partner"
        if teacher is None:
            logger.info("CIF plot without token timings: %s: %s", source, why)
            return None
        logger.info("token timings on the CIF plot: Whisper decoder %s", source)
        return teacher.to(llm.device)

    def token_timings(self, index, feats, feat_lens, transcript):
        """Where each LLM token of ``transcript`` starts in the clip.

        Whisper's alignment heads teacher-forced on the transcript over
        model ``index``'s own encoder features of the clip
        (:func:`~speechbrain_blspkd.dataprep.token_timings.
        utterance_timings`); the transcript's language is the recogniser's
        forced one, else English.

        Arguments
        ---------
        index : int
            The model's column.
        feats : torch.Tensor
            (1, T, d) the model's encoder output for the clip.
        feat_lens : torch.Tensor or None
            (1,) its relative length.
        transcript : str or None
            Whisper's transcript of the clip.

        Returns
        -------
        timings : torch.Tensor or None
            (N, 2) seconds, one row per LLM token of the transcript (None
            without a transcript or a :meth:`timing_teacher`, or when the
            transcript cannot be timed).
        labels : list of str or None
            The N tokens, printable.
        """
        if not (transcript or "").strip():
            return None, None
        teacher = self.timing_teacher(index)
        if teacher is None:
            return None, None
        from speechbrain_blspkd.dataprep.token_timings import (
            llm_token_spans,
            utterance_timings,
        )
        from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

        llm = self.models[index][1]
        prompts = llm.model.prompts
        frames = feats.shape[1]
        if feat_lens is not None:
            frames = max(1, min(frames, round(float(feat_lens[0]) * frames)))
        language = getattr(self.transcriber, "language", None) or "en"
        row = {"ID": "clip", "transcript": transcript, "language": language}
        try:
            ids, _ = llm_token_spans(prompts, transcript)
            timings = utterance_timings(
                teacher,
                prompts,
                [feats[0, :frames].detach()],
                [row],
                WhisperEncoder.frame_rate(),
            )[0]
        except Exception as err:  # e.g. a transcript over the positions
            logger.warning("CIF plot without token timings: %s", err)
            return None, None
        labels = [_printable(llm.model.tokenizer.decode([i])) for i in ids]
        return timings, labels

    # ------------------------------------------------------------- a request
    def respond(self, path, instruction):
        """Yield the page's state while one request is answered.

        Arguments
        ---------
        path : str or None
            The recorded or uploaded file.
        instruction : str or None
            Chosen or typed instruction ("" or None: each model's own).

        Yields
        ------
        dict
            ``status`` (str), ``transcript`` (str), and per model
            ``answers``, ``cascade`` (str) and ``plots`` (path or None).
        """
        n = len(self.models)
        state = {
            "status": "",
            "transcript": "",
            "answers": [""] * n,
            "cascade": [""] * n,
            "plots": [None] * n,
        }
        instruction = (instruction or "").strip() or None
        started = time.perf_counter()
        try:
            wav = self.load_clip(path)
        except DemoInputError as err:
            state["status"] = f"**Cannot answer:** {err}"
            yield state
            return
        seconds = wav.numel() / int(self.models[0][1].hparams.sample_rate)
        with self._lock:
            try:
                yield from self._answer_all(state, wav, seconds, instruction)
            except Exception as err:  # shown on the page; the server lives
                logger.exception("request failed")
                state["status"] = f"**Something went wrong:** {err}"
                yield state
                return
        state["status"] = (
            f"**Done** in {time.perf_counter() - started:.1f} s "
            f"({seconds:.1f} s of audio)."
        )
        yield state

    def _answer_all(self, state, wav, seconds, instruction):
        for i, (label, _) in enumerate(self.models):
            state["status"] = f"{label}: answering the speech ..."
            yield state
            for text in self.stream_answer(i, wav, instruction):
                state["answers"][i] = text
                yield state
            state["plots"][i] = self.cif_plot(i, wav)
        if self.transcriber is None:
            return
        state["status"] = "Whisper: transcribing ..."
        yield state
        transcript = self.transcribe(wav)
        state["transcript"] = transcript or "(Whisper heard nothing)"
        yield state
        if not transcript.strip():
            return
        timed = [
            i
            for i in range(len(self.models))
            if self.has_cif[i] and self.timing_teacher(i) is not None
        ]
        if timed:
            state["status"] = "Whisper: timing the transcript's tokens ..."
            yield state
            for i in timed:  # the same plot, with the token timings
                state["plots"][i] = self.cif_plot(i, wav, transcript)
            yield state
        for i, (label, _) in enumerate(self.models):
            state["status"] = f"{label}: answering the transcript ..."
            yield state
            for text in self.stream_text_answer(i, transcript, instruction):
                state["cascade"][i] = text
                yield state


def _printable(text):
    """A token as a plot label: visible characters only ("␣" for blanks)."""
    text = "".join(c if c.isprintable() else "?" for c in text).strip()
    return text or "␣"


def plot_cif_over_waveform(
    wav,
    sample_rate,
    alphas,
    fires,
    labels,
    frame_rate,
    path,
    title=None,
    token_timings=None,
    timing_labels=None,
):
    """PNG: the waveform on top, the CIF weights below, each fired token a
    dashed line across both, labelled.

    With ``token_timings``, a thin solid line in another colour stands
    across both at the start of each token of the transcript (labelled on
    the waveform with ``timing_labels``), and a legend names the two kinds
    of line ("CIF fired", "Whisper timings (transcript)").

    Arguments
    ---------
    wav : torch.Tensor
        (samples,) the clip.
    sample_rate : int
        Its rate.
    alphas : torch.Tensor
        (T,) CIF weights (scaled so that they sum to the token count).
    fires : list of int
        Frame of each fired token.
    labels : list of str
        A label per fired token.
    frame_rate : float
        CIF frames per second.
    path : str or pathlib.Path
        The PNG.
    title : str, optional
        Figure title.
    token_timings : torch.Tensor or sequence of (float, float), optional
        ``(N, 2)`` (start, end) seconds of the transcript's LLM tokens
        (:func:`~speechbrain_blspkd.dataprep.token_timings.
        utterance_timings`); None: no timing marks (the plot as before).
    timing_labels : list of str, optional
        A label per timed token.

    Returns
    -------
    pathlib.Path

    Example
    -------
    >>> import tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "cif.png"
    >>> _ = plot_cif_over_waveform(torch.randn(8000), 16000,
    ...     torch.tensor([0.5, 0.7, 0.8]), [1, 2], ["hi", "yo"], 6.0, out,
    ...     token_timings=[(0.05, 0.2), (0.2, 0.4)], timing_labels=["h", "y"])
    >>> out.read_bytes()[:4] == b"\\x89PNG"
    True
    """
    from speechbrain_blspkd.utils import plotting

    samples = wav.detach().float().cpu()
    step = max(1, samples.numel() // 4000)  # enough points for 9 inches
    shown = samples[::step]
    times = torch.arange(shown.numel()) * (step / sample_rate)
    fig = plotting._new_figure(9.0, 3.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.3])
    top.plot(times.numpy(), shown.numpy(), color="tab:gray", linewidth=0.6)
    top.set_ylabel("waveform")
    top.set_yticks([])
    alphas = alphas.detach().float().cpu()
    frame_times = torch.arange(alphas.numel()) / frame_rate
    bottom.bar(
        frame_times.numpy(),
        alphas.numpy(),
        width=1.0 / frame_rate,
        align="edge",
        color="tab:blue",
        alpha=0.7,
    )
    bottom.set_ylabel("CIF weight")
    bottom.set_xlabel("time (s)")
    peak = max(float(alphas.max()) if alphas.numel() else 0.0, 1e-6)
    bottom.set_ylim(0, peak * 1.45)
    for k, frame in enumerate(fires):
        x = (frame + 1) / frame_rate
        for ax in (bottom, top):
            ax.axvline(
                x,
                color="tab:red",
                linewidth=0.8,
                linestyle="--",
                label="CIF fired" if k == 0 else "_nolegend_",
            )
        label = labels[k] if k < len(labels) else "?"
        bottom.text(
            x,
            peak * 1.05,
            label,
            rotation=60,
            fontsize=8,
            ha="left",
            va="bottom",
            color="tab:red",
        )
    if token_timings is not None and plotting.mark_token_timings(
        [bottom, top], token_timings, labels=timing_labels, label_ax=top
    ):
        bottom.legend(loc="upper right", fontsize=7, framealpha=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return plotting._save_png(fig, path)


# ----------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------
CSS = """
#status {min-height: 2.2em; font-size: 1.05em}
.answer textarea {font-size: 1.05em}
"""


def _labels(folders):
    """Column titles: the folder names (``parent/model`` for a folder named
    ``model``, as recipes export), made unique."""
    names = []
    for folder in folders:
        path = pathlib.Path(folder).resolve()
        name = path.name or str(folder)
        if name in ("model", "export") and path.parent.name:
            name = f"{path.parent.name}/{name}"
        names.append(name)
    out = []
    for i, name in enumerate(names):
        out.append(name if names.count(name) == 1 else f"{name} ({i + 1})")
    return out


def build_app(backend, instructions=()):
    """The gradio page around ``backend``.

    Arguments
    ---------
    backend : DemoBackend
        The models.
    instructions : sequence of str
        Instructions offered first in the list (the models' own are added).

    Returns
    -------
    gradio.Blocks
    """
    import gradio as gr

    choices = []
    for text in (
        list(instructions)
        + [llm.default_instruction() for _, llm in backend.models]
        + list(EXTRA_INSTRUCTIONS)
    ):
        if text and text not in choices:
            choices.append(text)
    limit = backend.max_seconds
    limit_text = f" (at most {limit:g} s)" if limit else ""
    with gr.Blocks(
        title="speechbrain-blspkd: talk to it", analytics_enabled=False
    ) as app:
        gr.Markdown(
            "# Talk to it\n"
            "Record from the microphone or upload a clip" + limit_text + ", "
            "choose or type an instruction, then press **Answer**. Each "
            "speech model answers the audio; beside it, the same LLM "
            "answers Whisper's transcript (the cascade)."
        )
        with gr.Row():
            audio = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label="Speech",
                elem_id="audio",
                scale=3,
            )
            with gr.Column(scale=2):
                instruction = gr.Dropdown(
                    choices=choices,
                    value=choices[0],
                    allow_custom_value=True,
                    label="Instruction (choose or type)",
                    elem_id="instruction",
                )
                button = gr.Button(
                    "Answer", variant="primary", elem_id="answer"
                )
        status = gr.Markdown("Waiting for a clip.", elem_id="status")
        transcript = gr.Textbox(
            label="Whisper transcript (what was said, as Whisper heard it)",
            elem_id="transcript",
            interactive=False,
            visible=backend.transcriber is not None,
        )
        outputs = [status, transcript]
        with gr.Row(equal_height=False):
            for i, (label, _) in enumerate(backend.models):
                with gr.Column():
                    gr.Markdown(f"### {label}")
                    with gr.Row():
                        answer = gr.Textbox(
                            label="Answer to the speech",
                            elem_id=f"answer-{i}",
                            elem_classes=["answer"],
                            interactive=False,
                            lines=4,
                        )
                        cascade = gr.Textbox(
                            label="Same LLM answering Whisper's transcript "
                            "(cascade)",
                            elem_id=f"cascade-{i}",
                            elem_classes=["answer"],
                            interactive=False,
                            lines=4,
                            visible=backend.transcriber is not None,
                        )
                    plot = gr.Image(
                        label="CIF weights over the waveform, fired tokens "
                        "(nearest LLM token)",
                        type="filepath",
                        elem_id=f"cif-{i}",
                        interactive=False,
                        visible=backend.has_cif[i],
                    )
                    outputs += [answer, cascade, plot]

        def respond(path, text):
            for state in backend.respond(path, text):
                values = [state["status"], state["transcript"]]
                for i in range(len(backend.models)):
                    plot = state["plots"][i]
                    values += [
                        state["answers"][i],
                        state["cascade"][i],
                        None if plot is None else str(plot),
                    ]
                yield values

        button.click(respond, inputs=[audio, instruction], outputs=outputs)
    return app


def _theme():
    """The default look without web fonts (the page works offline)."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)


def build_parser():
    """The argument parser of ``blspkd-demo-ui``.

    Example
    -------
    >>> args = build_parser().parse_args(["--model", "a", "--model", "b"])
    >>> args.model, args.host, args.port
    (['a', 'b'], '127.0.0.1', 7860)
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Browser demo: speak to exported speech LLM folders.",
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="FOLDER",
        help="exported model folder (repeat to compare models side by side)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on"
    )
    parser.add_argument("--port", type=int, default=7860, help="port")
    parser.add_argument(
        "--asr",
        default=None,
        help="Whisper of the cascade: asset name or folder, or 'none' "
        "(default: the model's recogniser, else whisper-base)",
    )
    parser.add_argument(
        "--instruction",
        action="append",
        default=[],
        help="an instruction to offer first (repeatable)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="generation limit"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda ... (default: auto)"
    )
    return parser


def _asr_source(args, models):
    if args.asr is not None:
        return None if args.asr.lower() == "none" else args.asr
    for _, llm in models:
        source = getattr(llm.hparams, "transcriber_source", None)
        if source:
            return source
    return "whisper-base"


def load_backend(args):
    """Load the models and the recogniser named on the command line."""
    from speechbrain_blspkd.inference.speech_llm import SpeechLLM

    run_opts = {"device": args.device} if args.device else None
    models = []
    for label, folder in zip(_labels(args.model), args.model):
        logger.info("loading %s", folder)
        models.append(
            (label, SpeechLLM.from_hparams(source=folder, run_opts=run_opts))
        )
    transcriber = None
    source = _asr_source(args, models)
    if source is not None:
        import json

        from speechbrain_blspkd.inference.export import resolve_source
        from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber

        logger.info("loading the cascade's recogniser %s", source)
        folder = resolve_source(source)
        config = json.loads((folder / "config.json").read_text())
        # as long as a 30-s clip needs, within the decoder's positions
        room = int(config.get("max_target_positions", 448)) - 4
        transcriber = WhisperTranscriber(folder, max_new_tokens=min(96, room))
        transcriber.to(models[0][1].device).eval()
    return DemoBackend(models, transcriber, args.max_new_tokens)


def main(argv=None):
    """Run ``blspkd-demo-ui`` (serves until interrupted).

    Returns
    -------
    int
        0 after a normal stop; 2 on bad input (a missing model folder,
        gradio not installed).
    """
    from speechbrain_blspkd.inference.export import (
        ModelFolderError,
        check_model_folder,
    )
    from speechbrain_blspkd.utils.cli import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        return report_error(DEMO_EXTRA_HINT, prog=PROG, status=2)
    try:
        for folder in args.model:
            check_model_folder(folder)
        backend = load_backend(args)
    except (ModelFolderError, FileNotFoundError, ValueError) as err:
        return report_error(err, prog=PROG, status=2)
    app = build_app(backend, args.instruction)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=args.host,
        server_port=args.port,
        theme=_theme(),
        css=CSS,
        allowed_paths=[str(backend.plot_dir)],
        max_file_size="50mb",
        show_error=True,
        quiet=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
