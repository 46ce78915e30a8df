"""The cascade baseline: an ASR model transcribes, the text LLM answers.

:class:`CascadeModel` has the interface of
:class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel` that
evaluation and inference use (``generate`` on speech, ``generate_text`` on
text, the same prompt builder and chat template), so the cascade is scored
by the same code as every trained speech LLM and loads through the same
inference interface: its ``generate`` is the speech LLM's
(:func:`~speechbrain_blspkd.models.generation.generate`, the same
generation loop), with the transcripts in place of speech embeddings
(``return_num_tokens`` gives the LLM token count of each transcript,
``return_transcripts`` the transcripts).  It has no adapter and nothing
to train: its recipe YAML declares no stage.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch

from speechbrain_blspkd.models.generation import Heard
from speechbrain_blspkd.models.speech_llm import SpeechLLMModel

__all__ = ["CascadeModel"]


class CascadeModel(SpeechLLMModel):
    """Whisper transcription, then the LLM on the transcript as text.

    Arguments
    ---------
    llm : transformers.PreTrainedModel or str or pathlib.Path
        The causal LM (or its folder).
    transcriber : speechbrain_blspkd.nnet.whisper_asr.WhisperTranscriber
        Batched speech recognition.
    **kwargs
        Prompt and LLM options of
        :class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel`
        (``tokenizer``, ``system_prompt``, ``instruction``,
        ``audio_instruction``, ``transcript_separator``, ``llm_dtype``).

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_cascade
    >>> cascade = tiny_cascade()
    >>> answers, counts = cascade.generate(torch.randn(2, 8000) * 0.1,
    ...     max_new_tokens=3, return_num_tokens=True)
    >>> len(answers), counts.shape
    (2, torch.Size([2]))
    """

    def __init__(self, llm, transcriber, **kwargs):
        for key in ("adapter", "encoder", "plora"):
            if kwargs.pop(key, None) is not None:
                raise ValueError(f"CascadeModel: takes no `{key}`")
        super().__init__(llm, None, encoder=None, plora=None, **kwargs)
        self.transcriber = transcriber
        self._transcripts = {}

    def forward(self, *args, **kwargs):
        """The cascade trains nothing (its recipe declares no stage)."""
        raise RuntimeError("CascadeModel is for evaluation and inference only")

    @torch.no_grad()
    def transcribe(self, wavs, wav_lens=None):
        """The transcripts the LLM will answer (list of str).

        The transcripts of the last few batches are remembered (keyed by
        the audio itself), so answering the same speech to several
        instructions, as evaluation does, transcribes it once.
        """
        key = _audio_key(wavs, wav_lens)
        if key not in self._transcripts:
            if len(self._transcripts) >= 64:
                self._transcripts.clear()
            self._transcripts[key] = self.transcriber.transcribe(wavs, wav_lens)
        return list(self._transcripts[key])

    def _hear(self, wavs=None, wav_lens=None, feats=None, feat_lens=None):
        """The transcripts stand in the speech span of the prompts (the
        hook of :func:`~speechbrain_blspkd.models.generation.generate`,
        which answers them as text, PLoRA off); ``feats`` are refused
        (the recogniser needs the audio: set ``use_feature_cache:
        False``)."""
        if wavs is None or feats is not None:
            raise ValueError(
                "CascadeModel.generate: needs `wavs` (the recogniser reads "
                "audio, not cached encoder features)"
            )
        transcripts = self.transcribe(wavs, wav_lens)
        # an empty transcript (silence) is answered as a blank one
        texts = [t or " " for t in transcripts]
        return Heard(texts=texts, transcripts=transcripts)

    def trainable_parameters(self):
        """None: the cascade has nothing to train."""
        return []


def _audio_key(wavs, wav_lens):
    import hashlib

    digest = hashlib.sha1()
    digest.update(wavs.detach().float().cpu().numpy().tobytes())
    digest.update(str(tuple(wavs.shape)).encode())
    if wav_lens is not None:
        digest.update(torch.as_tensor(wav_lens).float().cpu().numpy().tobytes())
    return digest.hexdigest()
