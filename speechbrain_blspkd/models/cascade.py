"""The cascade baseline: an ASR model transcribes, the text LLM answers.

:class:`CascadeModel` has the interface of
:class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel` that
evaluation and inference use (``generate`` on speech, ``generate_text`` on
text, the same prompt builder and chat template), so the cascade is scored
by the same code as every trained speech LLM and loads through the same
inference interface.  It has no adapter and nothing to train: its recipe
YAML declares no stage.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch

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
    >>> from speechbrain_blspkd.utils.testing import tiny_cascade
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

    @torch.no_grad()
    def generate(
        self,
        wavs=None,
        wav_lens=None,
        instructions=None,
        max_new_tokens=64,
        num_beams=1,
        feats=None,
        feat_lens=None,
        return_num_tokens=False,
        return_ids=False,
        names=None,
        source=None,
        item="row",
        return_transcripts=False,
        **generate_kwargs,
    ):
        """Transcribe, then answer the transcripts (batched, KV cache).

        Arguments are those of
        :meth:`SpeechLLMModel.generate`; ``feats`` are refused (the
        recogniser needs the audio: set ``use_feature_cache: False``).
        ``return_num_tokens`` returns the LLM token count of each
        transcript; ``return_transcripts`` also returns the transcripts.

        Returns
        -------
        list of str (then the counts, then the transcripts, when asked)
        """
        if wavs is None or feats is not None:
            raise ValueError(
                "CascadeModel.generate: needs `wavs` (the recogniser reads "
                "audio, not cached encoder features)"
            )
        transcripts = self.transcribe(wavs, wav_lens)
        n = len(transcripts)
        instructions = self._instructions(instructions, n, audio=True)
        # an empty transcript (silence) is answered as a blank one
        texts = [t or " " for t in transcripts]
        self.check_fits(
            instructions,
            max_new_tokens,
            transcripts=texts,
            names=names,
            source=source,
            item=item,
        )
        answers = self.generate_text(
            texts,
            instructions=instructions,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            return_ids=return_ids,
            **generate_kwargs,
        )
        out = [answers]
        if return_num_tokens:
            counts = [len(x) for x in self.transcript_ids(texts)]
            out.append(torch.tensor(counts, dtype=torch.long))
        if return_transcripts:
            out.append(transcripts)
        return out[0] if len(out) == 1 else tuple(out)

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
