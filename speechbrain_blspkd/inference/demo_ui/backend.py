"""What the demo page does, without the page: :class:`DemoBackend` loads
nothing itself but holds the models and the recogniser, checks a clip,
streams the answers (to the speech, and the cascade's to Whisper's
transcript), draws the CIF weights and answers one request as a sequence
of page states; bad input raises :class:`DemoInputError`, whose message the
page shows.  The server keeps running whatever a request does.
"""

import logging
import pathlib
import tempfile
import threading
import time

import torch

from speechbrain_blspkd.inference.demo_ui import cif
from speechbrain_blspkd.inference.demo_ui.streaming import stream_decode
from speechbrain_blspkd.utils.plotting import plot_cif_over_waveform

logger = logging.getLogger(__name__)

#: Peak level under which a clip counts as silence (full scale = 1.0;
#: 1e-3 is -60 dBFS).
SILENCE_PEAK = 1e-3


class DemoInputError(ValueError):
    """Input the page explains instead of answering (the message is shown)."""


def _peak_dbfs(peak):
    import math

    return 20.0 * math.log10(max(float(peak), 1e-12))


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
        self.has_cif = [cif.fires_tokens(llm) for _, llm in self.models]
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
        yield from stream_decode(decode, llm.model.tokenizer, beams)

    def transcribe(self, wav):
        """Whisper's transcript of the clip ("" without a recogniser)."""
        if self.transcriber is None:
            return ""
        with torch.no_grad():
            return self.transcriber.transcribe(wav[None].float())[0]

    # ------------------------------------------------------------------ CIF
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
        label, llm = self.models[index]
        view = cif.cif_view(llm, wav)
        timings, timing_words = self.token_timings(
            index, view.feats, view.feat_lens, transcript
        )
        self._count += 1
        path = self.plot_dir / f"cif-{index}-{self._count}.png"
        plot_cif_over_waveform(
            wav,
            int(llm.hparams.sample_rate),
            view.alphas,
            view.fires,
            view.words,
            view.frame_rate,
            path,
            title=f"{label}: {view.count} speech tokens, sum(alpha) "
            f"{view.alpha_sum:.1f}",
            token_timings=timings,
            timing_labels=timing_words,
        )
        return path

    # -------------------------------------------------------- token timings
    def timing_teacher(self, index):
        """Whisper's decoder that times transcripts for model ``index``.

        The decoder of the Whisper asset the model's encoder comes from
        (``encoder_source`` of the exported folder), teacher-forced by
        :func:`~speechbrain_blspkd.nnet.token_alignment.utterance_timings`.
        Loaded on first use and kept for the server's life (one per source
        and device); None, also kept, when the model has no Whisper
        encoder, the source has no loadable decoder or no alignment heads,
        or its width differs from the encoder's.

        Returns
        -------
        speechbrain_blspkd.nnet.whisper_decoder.WhisperDecoderTeacher or None
        """
        from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

        llm = self.models[index][1]
        encoder = getattr(llm.model, "encoder", None)
        source = getattr(llm.hparams, "encoder_source", None)
        if not source or not isinstance(encoder, WhisperEncoder):
            return None
        key = (str(source), str(llm.device))
        if key not in self._teachers:
            self._teachers[key] = cif.load_timing_teacher(source, encoder, llm)
        return self._teachers[key]

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
        language = getattr(self.transcriber, "language", None) or "en"
        return cif.transcript_timings(
            self.models[index][1],
            teacher,
            feats,
            feat_lens,
            transcript,
            language,
        )

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
            texts = self.stream_answer(i, wav, instruction)
            status = f"{label}: answering the speech ..."
            yield from _show_stream(state, status, state["answers"], i, texts)
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
            texts = self.stream_text_answer(i, transcript, instruction)
            status = f"{label}: answering the transcript ..."
            yield from _show_stream(state, status, state["cascade"], i, texts)


def _show_stream(state, status, column, i, texts):
    """Yield the page ``state`` with ``status``, then once per growing
    text of ``texts``, put in ``column[i]`` (a list of ``state``)."""
    state["status"] = status
    yield state
    for text in texts:
        column[i] = text
        yield state
