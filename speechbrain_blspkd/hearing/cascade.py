"""The cascade beside the speech LLM: Whisper transcribes, the same LLM
answers the transcript; its rows and transcripts cached between runs.

Authors
 * speechbrain-blspkd contributors 2026
"""

import hashlib
import logging
import pathlib

import torch

from speechbrain_blspkd.dataio.audio import load_row_audio
from speechbrain_blspkd.evaluation import decode_rows
from speechbrain_blspkd.hearing.cache import (
    read_cache,
    rows_digest,
    write_cache,
)
from speechbrain_blspkd.teacher_answers import fingerprint as _fingerprint

logger = logging.getLogger(__name__)


class _RecordingTranscriber(torch.nn.Module):
    """A recogniser that remembers each clip's transcript (by its audio)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = {}

    @staticmethod
    def clip_key(wav):
        data = wav.detach().float().cpu().contiguous()
        return hashlib.sha1(data.numpy().tobytes()).hexdigest()

    def transcribe(self, wavs, wav_lens=None, languages=None):
        texts = self.inner.transcribe(wavs, wav_lens, languages)
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        sizes = torch.round(wav_lens.float().cpu() * wavs.shape[1]).long()
        for wav, size, text in zip(wavs, sizes.tolist(), texts):
            self.seen[self.clip_key(wav[:size])] = text
        return texts


def build_cascade(
    model, asr="whisper-base", asr_max_new_tokens=96, dtype="auto"
):
    """The cascade beside ``model``: Whisper transcribes, the **same** LLM
    (shared, not a copy; PLoRA off) answers with the same prompts.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The speech LLM whose LLM and prompts are used.
    asr : str or pathlib.Path
        Whisper asset name or folder.
    asr_max_new_tokens : int
        Most tokens per transcript.
    dtype : str
        Recogniser weight dtype (``auto``: bf16 only where fast).

    Returns
    -------
    speechbrain_blspkd.models.cascade.CascadeModel
        Its ``transcriber`` remembers every transcript it made.
    """
    from speechbrain_blspkd.models.cascade import CascadeModel
    from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber
    from speechbrain_blspkd.utils.precision import resolve_dtype

    transcriber = WhisperTranscriber(
        asr,
        dtype=resolve_dtype(dtype, model.device),
        max_new_tokens=asr_max_new_tokens,
    ).to(model.device)
    return CascadeModel(
        model.llm,
        _RecordingTranscriber(transcriber),
        tokenizer=model.tokenizer,
        system_prompt=model.prompts.system_prompt,
        instruction=model.instruction,
        audio_instruction=model.audio_instruction,
        transcript_separator=model.prompts.transcript_separator,
    )


def measure_cascade(
    cascade_factory, rows, tasks, options, teacher, cache_dir, source
):
    """Cascade rows and transcripts, from the cache when nothing changed."""
    cascade, key = cascade_factory()
    key = _fingerprint(key, rows_digest(rows), tasks, options)
    path = pathlib.Path(cache_dir) / f"cascade_{key[:20]}.json"
    cached = read_cache(path, key)
    if cached is not None:
        logger.info("cascade: cached rows %s", path)
        return cached["rows"], cached["transcripts"]
    decoded = decode_rows(
        cascade, rows, tasks, teacher_cache=teacher, source=source, **options
    )
    recorder = cascade.transcriber
    transcripts = {}
    for r in rows:
        wav = load_row_audio(r, source, sample_rate=16000)
        transcripts[r["ID"]] = recorder.seen[recorder.clip_key(wav)]
    write_cache(path, key, {"rows": decoded, "transcripts": transcripts})
    return decoded, transcripts
