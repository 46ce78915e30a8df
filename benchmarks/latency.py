"""Inference latency: speech LLM vs cascade vs text-only LLM.

Per utterance, at batch 1 and 8, from raw 16-kHz audio (no feature cache:
what a user's request costs):

* ``speech_llm``: Whisper-base encoder -> CFormer -> SmolLM2 with PLoRA
  (:meth:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel.generate`);
* ``cascade``: Whisper-base decoding, then the same LLM on the transcript
  (:class:`~speechbrain_blspkd.models.cascade.CascadeModel`; its transcript
  memo is cleared before every call);
* ``aura``: AuRA's encoder-free model: log-mel front end -> audio
  embedding -> the same LLM with PLoRA (no Whisper encoder runs; 25 LLM
  positions per second of audio where the CFormer gives about 3);
* ``text``: the LLM on the transcript alone (a lower bound: no audio).

``params.<system>`` counts the parameters each system runs at inference
(weights shared by two parts counted once; random adapters, trained ones
have the same size).

Each answer is exactly ``answer_tokens`` long (end of turn suppressed until
then), so the three do the same LLM work after the prompt. Time to first
token is the same call with one new token. Real-time factor: seconds per
second of audio. The ratio ``speech_llm_over_cascade`` at batch 1 is the
issue's target (<= 0.6).
"""

import tempfile

from benchmarks.common import (
    INSTRUCTION,
    SENTENCES,
    aura_model,
    compare,
    demo_model,
    encoder_path,
    llm_path,
    parameter_count,
    speech_clip,
)
from speechbrain_blspkd.models.cascade import CascadeModel
from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber


def run(args):
    """Figures per batch: seconds per utterance, TTFT, RTF, ratios."""
    device, dtype = args.device, args.dtype
    speech = demo_model(dtype, device, encoder=True).eval()
    transcriber = WhisperTranscriber(encoder_path(), dtype=dtype, language="en")
    cascade = CascadeModel(
        llm_path(), transcriber, instruction=INSTRUCTION, llm_dtype=dtype
    ).to(device)
    cascade.eval()
    aura = aura_model(dtype, device).eval()
    seconds = args.clip_seconds
    n_new = args.answer_tokens
    out = {"clip_seconds": seconds, "answer_tokens": n_new}
    out["params.speech_llm"] = parameter_count(speech)
    out["params.aura"] = parameter_count(aura)
    out["params.cascade"] = parameter_count(cascade, transcriber)
    out["params.text"] = parameter_count(speech.llm)
    with tempfile.TemporaryDirectory() as tmp:
        clip = speech_clip(seconds, tmp)
    for batch in (1, 8):
        wavs = clip[None].repeat(batch, 1).to(device)
        transcripts = [SENTENCES[0]] * batch

        def calls(tokens, wavs=wavs, transcripts=transcripts):
            gen = dict(max_new_tokens=tokens, min_new_tokens=tokens)

            def cascade_call():
                cascade._transcripts.clear()
                return cascade.generate(wavs, **gen)

            return {
                "speech_llm": lambda: speech.generate(wavs, **gen),
                "aura": lambda: aura.generate(wavs, **gen),
                "cascade": cascade_call,
                "text": lambda: speech.generate_text(transcripts, **gen),
            }

        full = compare(calls(n_new), args.rounds, device)
        first = compare(calls(1), args.rounds, device)
        for name in full:
            key = f"b{batch}.{name}"
            per_utt = full[name].best / batch
            out[f"{key}.seconds_per_utterance"] = per_utt
            out[f"{key}.time_to_first_token"] = first[name].best
            out[f"{key}.rtf"] = per_utt / seconds
        out[f"b{batch}.speech_llm_over_cascade"] = (
            full["speech_llm"].best / full["cascade"].best
        )
        out[f"b{batch}.aura_over_speech_llm"] = (
            full["aura"].best / full["speech_llm"].best
        )
        out[f"b{batch}.aura_over_cascade"] = (
            full["aura"].best / full["cascade"].best
        )
    out["speech_llm_over_cascade"] = out["b1.speech_llm_over_cascade"]
    return out
