"""Whisper speech recognition: the ASR half of the cascade baseline.

The cascade baseline answers a spoken instruction in two steps: Whisper
transcribes the audio, then the text LLM answers the transcript.  This
module is the first step.  :class:`WhisperTranscriber` wraps a HF
``WhisperForConditionalGeneration`` and turns batches of 16-kHz waveforms
(or audio files) into text.

Why it is written here rather than taken from a pipeline:

* **batched decoding with SpeechBrain relative lengths** -- the evaluation
  feeds padded ``(B, S)`` batches with relative lengths, as everywhere in
  the project; samples beyond a clip's length are zeroed, so the padding
  (even garbage) never changes a transcript, and a batch gives the same
  text as the same clips one by one (tested);
* **one language per row** -- multilingual test sets mix languages in a
  batch; each row's language is forced (ISO codes such as ``"en"``,
  ``"de"``), rows without one are left to Whisper's language detection,
  and an English-only model (``*.en``) is never given a language token;
* **offline assets** -- the model and tokenizer are read from a local
  folder or a project asset (resolved by
  :func:`speechbrain_blspkd.assets.paths.resolve_source`); no hub is
  contacted;
* **the project's features** -- the log-mel spectrogram is
  :func:`speechbrain_blspkd.nnet.whisper_features.whisper_log_mel`, computed
  in torch on the model's device for the whole batch, padded to 30 s (3000
  frames) as Whisper's decoder expects (the dynamic-length path of
  :class:`~speechbrain_blspkd.nnet.whisper_encoder.WhisperEncoder` is for the
  speech LLM's frozen encoder, not for Whisper's own decoder).

The decoding itself (greedy or beam search, the Whisper prompt tokens,
token suppression) is transformers' Whisper ``generate``; nothing of it is
re-implemented here.  Timestamps are off and the task is always
``transcribe``.

A randomly initialised model (unit tests, doctests) is built from a
``WhisperConfig`` with a tokenizer passed explicitly: its generation
settings (start-of-transcript, language, task and no-timestamps tokens) are
read from the tokenizer's special tokens;
:func:`speechbrain_blspkd.testing.build_test_whisper_tokenizer` makes a
tiny one.

Authors
 * speechbrain-blspkd contributors 2026
"""

import copy
import logging
import pathlib

import torch
from torch import nn

from speechbrain_blspkd.nnet.whisper_features import (
    HOP,
    SAMPLE_RATE,
    _mel_filters,
    whisper_log_mel,
)
from speechbrain_blspkd.utils.precision import resolve_dtype

__all__ = ["WhisperTranscriber"]

logger = logging.getLogger(__name__)

#: Prompt tokens Whisper may put before the text (start of transcript,
#: language, task, no-timestamps): ``max_new_tokens`` must leave room.
PROMPT_TOKENS = 4

_SOT = "<|startoftranscript|>"
_NO_TIMESTAMPS = "<|notimestamps|>"
_TASKS = ("transcribe", "translate")


def _config_token_settings(generation):
    """The token settings a ``WhisperConfig`` shares with ``generation``.

    ``generation`` is the ``GenerationConfig`` of
    :func:`_generation_config_from_tokenizer`; a random model's config gets
    these values so that it refers to its tokenizer's ids (Whisper's
    defaults are ids of its 51865-token vocabulary).
    """
    return dict(
        decoder_start_token_id=generation.decoder_start_token_id,
        bos_token_id=generation.bos_token_id,
        eos_token_id=generation.eos_token_id,
        pad_token_id=generation.pad_token_id,
        begin_suppress_tokens=list(generation.begin_suppress_tokens),
        suppress_tokens=list(generation.suppress_tokens),
    )


def _generation_config_from_tokenizer(tokenizer, config):
    """Whisper generation settings of a random model, from its tokenizer."""
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab = tokenizer.get_vocab()
    missing = [t for t in (_SOT, _NO_TIMESTAMPS) if t not in vocab]
    missing += [f"<|{t}|>" for t in _TASKS if f"<|{t}|>" not in vocab]
    if tokenizer.eos_token_id is None:
        missing.append("an eos token")
    if missing:
        raise ValueError(
            "WhisperTranscriber: the tokenizer of a model built from a "
            f"config needs Whisper's special tokens (missing: "
            f"{', '.join(missing)}); see speechbrain_blspkd.utils."
            "testing.build_test_whisper_tokenizer"
        )
    if vocab[_NO_TIMESTAMPS] != max(vocab.values()):
        raise ValueError(
            "WhisperTranscriber: <|notimestamps|> must be the tokenizer's "
            "last token (Whisper's generation reads every later id as a "
            "timestamp); see speechbrain_blspkd.utils."
            "testing.build_test_whisper_tokenizer"
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    specials = set(tokenizer.all_special_ids)
    specials |= {vocab[_SOT], vocab[_NO_TIMESTAMPS]}
    specials |= {vocab[f"<|{t}|>"] for t in _TASKS}
    lang_to_id = {
        f"<|{code}|>": vocab[f"<|{code}|>"]
        for code in LANGUAGES
        if f"<|{code}|>" in vocab
    }
    max_length = None if config is None else config.max_target_positions
    specials |= set(lang_to_id.values())
    settings = dict(
        decoder_start_token_id=vocab[_SOT],
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        max_length=max_length,
        task_to_id={t: vocab[f"<|{t}|>"] for t in _TASKS},
        no_timestamps_token_id=vocab[_NO_TIMESTAMPS],
        is_multilingual=bool(lang_to_id),
        return_timestamps=False,
        # like Whisper's own settings: no special token inside the text
        suppress_tokens=sorted(specials - {eos}),
        begin_suppress_tokens=[eos],
    )
    if lang_to_id:  # an English-only model has none (as whisper-*.en)
        settings["lang_to_id"] = lang_to_id
    return GenerationConfig(**settings)


def _language_code(language):
    """``"de"``, ``"DE"``, ``"de-AT"``, ``"<|de|>"``, ``"german"`` -> ``"de"``.

    Unknown values are returned lowercased (the model check names them).
    """
    from transformers.models.whisper.tokenization_whisper import (
        TO_LANGUAGE_CODE,
    )

    code = str(language).strip().lower()
    if code.startswith("<|") and code.endswith("|>"):
        code = code[2:-2]
    if code in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[code]
    for sep in ("-", "_"):
        head = code.split(sep)[0]
        if head != code and head in TO_LANGUAGE_CODE.values():
            return head
    return code


class WhisperTranscriber(nn.Module):
    """Batched Whisper transcription of 16-kHz speech (inference only).

    Arguments
    ---------
    source : str, pathlib.Path or transformers.WhisperConfig
        A local transformers Whisper folder, a project asset name (e.g.
        ``"whisper-base"``, ``"whisper-tiny.en"``; resolved with
        :func:`speechbrain_blspkd.assets.paths.resolve_source`), or a
        config for a randomly initialised model (tests; needs
        ``tokenizer``).
    dtype : torch.dtype or str, optional
        Weight dtype: a dtype or name, or ``"auto"`` (bfloat16 where the
        run's device computes it fast, else float32;
        :mod:`speechbrain_blspkd.utils.precision`).  None: float32.
    language : str, optional
        Default language of every row (ISO code such as ``"en"``); None lets
        a multilingual model detect it.  An English-only model accepts only
        None or ``"en"`` and is never given a language token.
    max_new_tokens : int
        Most text tokens per transcript (at most the model's
        ``max_target_positions`` minus 4 prompt tokens: 444 for Whisper).
    num_beams : int
        1: greedy decoding; more: beam search.
    tokenizer : transformers tokenizer or str or pathlib.Path, optional
        The tokenizer (or its folder).  Default: the one in ``source``'s
        folder.  Required with a config; it must then hold Whisper's special
        tokens (e.g.
        :func:`speechbrain_blspkd.testing.build_test_whisper_tokenizer`),
        which set the
        generation settings, and ``config.vocab_size`` must cover it.

    Example
    -------
    >>> from speechbrain_blspkd.testing import (
    ...     build_test_whisper_tokenizer, tiny_whisper_config,
    ...     whisper_token_settings)
    >>> tok = build_test_whisper_tokenizer()
    >>> config = tiny_whisper_config(decoder_layers=1,
    ...     decoder_attention_heads=4, decoder_ffn_dim=128,
    ...     max_target_positions=32, **whisper_token_settings(tok))
    >>> asr = WhisperTranscriber(config, tokenizer=tok, max_new_tokens=4)
    >>> wavs = torch.randn(3, 16000) * 0.1
    >>> texts = asr.transcribe(wavs, torch.tensor([1.0, 0.5, 0.0]),
    ...     languages=["en", "de", None])
    >>> len(texts), texts[2]  # a random model says nonsense; empty -> ""
    (3, '')
    >>> texts[1] == asr.transcribe(wavs[1:2, :8000], languages=["de"])[0]
    True
    """

    def __init__(
        self,
        source,
        dtype=None,
        language=None,
        max_new_tokens=128,
        num_beams=1,
        tokenizer=None,
    ):
        super().__init__()
        from transformers import (
            AutoTokenizer,
            WhisperConfig,
            WhisperForConditionalGeneration,
        )

        dtype = resolve_dtype(dtype) or torch.float32
        if isinstance(tokenizer, (str, pathlib.Path)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if isinstance(source, WhisperConfig):
            if tokenizer is None:
                raise ValueError(
                    "WhisperTranscriber: a model built from a WhisperConfig "
                    "needs `tokenizer=` (e.g. speechbrain_blspkd.utils."
                    "testing.build_test_whisper_tokenizer())"
                )
            config = copy.deepcopy(source)
            if config.vocab_size < len(tokenizer):
                raise ValueError(
                    f"WhisperTranscriber: config.vocab_size "
                    f"{config.vocab_size} < the tokenizer's {len(tokenizer)} "
                    "tokens"
                )
            generation_config = _generation_config_from_tokenizer(
                tokenizer, config
            )
            for key, value in _config_token_settings(generation_config).items():
                setattr(config, key, value)
            model = WhisperForConditionalGeneration(config).to(dtype)
            model.generation_config = generation_config
        else:
            from speechbrain_blspkd.assets.paths import resolve_source

            folder = resolve_source(source)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"WhisperTranscriber: {folder} is not a transformers "
                    "Whisper folder (no config.json); fetch it with "
                    "`python -m speechbrain_blspkd.assets fetch whisper-base`"
                )
            model = WhisperForConditionalGeneration.from_pretrained(
                str(folder), dtype=dtype
            )
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.n_mels = self.config.num_mel_bins
        # Whisper's decoder is trained on 30-s windows: 2 mel frames per
        # encoder position (3000 frames for every released model)
        self.num_mel_frames = 2 * self.config.max_source_positions
        self.max_samples = self.num_mel_frames * HOP
        generation = model.generation_config
        multilingual = getattr(generation, "is_multilingual", None)
        if multilingual is None:
            multilingual = bool(getattr(generation, "lang_to_id", None))
        self.is_multilingual = bool(multilingual)
        limit = self.config.max_target_positions - PROMPT_TOKENS
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(
                f"WhisperTranscriber: max_new_tokens={max_new_tokens} must be "
                f"in 1..{limit} (the decoder holds "
                f"{self.config.max_target_positions} positions, "
                f"{PROMPT_TOKENS} of them for the prompt)"
            )
        if num_beams < 1:
            raise ValueError(f"WhisperTranscriber: num_beams={num_beams} < 1")
        self.max_new_tokens = int(max_new_tokens)
        self.num_beams = int(num_beams)
        self.language = self._check_language(language)
        self.register_buffer(
            "mel_filters", _mel_filters(self.n_mels, "cpu"), persistent=False
        )
        logger.info(
            "WhisperTranscriber: %s model, %s, %s decoding",
            "multilingual" if self.is_multilingual else "English-only",
            str(dtype).replace("torch.", ""),
            "greedy" if self.num_beams == 1 else f"{self.num_beams}-beam",
        )

    def train(self, mode=True):
        """Sets train mode; the Whisper model always stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self):
        """The device of the model's weights."""
        return self.model.model.decoder.embed_tokens.weight.device

    def _check_language(self, language):
        """A language code the model accepts, or None (not forced)."""
        if language is None:
            return None
        code = _language_code(language)
        if not self.is_multilingual:
            if code == "en":
                return None
            raise ValueError(
                f"WhisperTranscriber: language {language!r} requested, but "
                "the model is English-only (use a multilingual Whisper)"
            )
        known = getattr(self.model.generation_config, "lang_to_id", {}) or {}
        if f"<|{code}|>" not in known:
            raise ValueError(
                f"WhisperTranscriber: language {language!r} is not one of "
                f"the model's ({', '.join(sorted(t[2:-2] for t in known))})"
            )
        return code

    @torch.no_grad()
    def transcribe(self, wavs, wav_lens=None, languages=None):
        """Transcribes a batch of 16-kHz waveforms.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, S) waveforms, zero-padded on the right, at most 30 s each.
        wav_lens : torch.Tensor, optional
            (B,) relative lengths (SpeechBrain style); None = all full.
            Samples beyond a clip's length are ignored.
        languages : list of (str or None), optional
            One language per row (ISO codes such as ``"en"``, ``"de"``);
            None entries (or None for all) use the constructor's
            ``language``.  Rows are decoded in groups of one language.

        Returns
        -------
        list of str
            One stripped transcript per row; ``""`` for an empty clip.
        """
        if wavs.dim() != 2:
            raise ValueError(
                f"WhisperTranscriber: `wavs` must be (B, samples), got "
                f"{tuple(wavs.shape)}"
            )
        batch, samples = wavs.shape
        if languages is None:
            languages = [None] * batch
        languages = list(languages)
        if len(languages) != batch:
            raise ValueError(
                f"WhisperTranscriber: {len(languages)} languages for a batch "
                f"of {batch}"
            )
        codes = [
            self.language if lang is None else self._check_language(lang)
            for lang in languages
        ]
        if batch == 0:
            return []
        device = self.device
        wavs = wavs.to(device=device, dtype=torch.float32)
        if wav_lens is None:
            wav_lens = torch.ones(batch, device=device)
        num_samples = torch.round(wav_lens.to(device).float() * samples).long()
        num_samples = num_samples.clamp(min=0, max=samples)
        longest = int(num_samples.max())
        if longest > self.max_samples:
            raise ValueError(
                f"WhisperTranscriber: a clip of {longest / SAMPLE_RATE:.1f} s "
                f"exceeds Whisper's {self.max_samples / SAMPLE_RATE:g} s "
                "window; split it first"
            )
        # zero the samples beyond each clip's length (padding may be garbage)
        positions = torch.arange(samples, device=device)
        wavs = wavs * (positions[None] < num_samples[:, None])
        wavs = wavs[:, : max(longest, 1)]
        texts = [""] * batch
        groups = {}
        for row, code in enumerate(codes):
            if int(num_samples[row]) > 0:
                groups.setdefault(code, []).append(row)
        for code, rows in groups.items():
            for row, text in zip(rows, self._generate(wavs[rows], code)):
                texts[row] = text
        return texts

    def _generate(self, wavs, language):
        """Texts of (b, s) clean waveforms that share one language."""
        mel = whisper_log_mel(
            wavs, self.num_mel_frames, self.n_mels, self.mel_filters
        )
        dtype = self.model.model.encoder.conv1.weight.dtype
        kwargs = dict(
            return_timestamps=False,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
            # short-form: one window per row, one call of generate
            force_unique_generate_call=True,
            # every row is a full 30-s window (silence is real input)
            attention_mask=torch.ones(
                mel.shape[0], mel.shape[2], dtype=torch.long, device=mel.device
            ),
        )
        if self.is_multilingual:
            kwargs.update(task="transcribe", language=language)
        tokens = self.model.generate(mel.to(dtype), **kwargs)
        if not torch.is_tensor(tokens):  # a generate output object
            tokens = tokens["sequences"]
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def transcribe_files(self, paths, languages=None, batch_size=8):
        """Transcribes audio files, in length-sorted batches.

        Files are read with :func:`speechbrain_blspkd.dataio.audio.load_audio`
        (any libsndfile format; resampled to 16 kHz, downmixed to mono); a
        missing, unreadable, empty or too long file raises
        :class:`~speechbrain_blspkd.dataio.audio.AudioError` naming it
        before anything is decoded.

        Arguments
        ---------
        paths : list of (str or pathlib.Path)
            Audio files.
        languages : list of (str or None), optional
            One language per file (see :meth:`transcribe`).
        batch_size : int
            Files decoded together.

        Returns
        -------
        list of str
            Transcripts in the order of ``paths``.
        """
        paths = [pathlib.Path(p) for p in paths]
        if languages is None:
            languages = [None] * len(paths)
        languages = list(languages)
        if len(languages) != len(paths):
            raise ValueError(
                f"WhisperTranscriber: {len(languages)} languages for "
                f"{len(paths)} files"
            )
        if batch_size < 1:
            raise ValueError(f"WhisperTranscriber: batch_size={batch_size}")
        durations = [self._duration(p) for p in paths]
        order = sorted(range(len(paths)), key=lambda i: -durations[i])
        texts = [None] * len(paths)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            wavs, wav_lens = self._load_batch([paths[i] for i in rows])
            out = self.transcribe(wavs, wav_lens, [languages[i] for i in rows])
            for i, text in zip(rows, out):
                texts[i] = text
        return texts

    def _duration(self, path):
        """Seconds of audio in ``path``; an unusable file raises here."""
        import soundfile as sf

        from speechbrain_blspkd.dataio.audio import load_audio

        limit = self.max_samples / SAMPLE_RATE
        try:
            info = sf.info(str(path))
            seconds = info.frames / info.samplerate
        except Exception:
            seconds = None
        if seconds is None or seconds == 0 or seconds > limit:
            # missing, unreadable, empty or too long: load_audio raises its
            # AudioError naming the file
            wav = load_audio(path, SAMPLE_RATE, max_seconds=limit)
            seconds = wav.numel() / SAMPLE_RATE
        return seconds

    def _load_batch(self, paths):
        """(B, S) zero-padded waveforms and their relative lengths."""
        from speechbrain_blspkd.dataio.audio import load_audio

        limit = self.max_samples / SAMPLE_RATE
        clips = [load_audio(p, SAMPLE_RATE, max_seconds=limit) for p in paths]
        longest = max(clip.numel() for clip in clips)
        wavs = torch.zeros(len(clips), longest)
        for row, clip in enumerate(clips):
            wavs[row, : clip.numel()] = clip
        wav_lens = torch.tensor([c.numel() / longest for c in clips])
        return wavs, wav_lens
