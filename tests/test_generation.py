"""The one generation loop (speechbrain_blspkd.models.generation): the
speech LLM and the cascade answer through it, and it is the text loop."""

import pytest
import torch

from speechbrain_blspkd.models import generation
from speechbrain_blspkd.testing import tiny_cascade, tiny_speech_llm


def test_the_cascade_answers_its_transcripts_as_text():
    """The cascade's generate is the teacher's answer to its transcripts
    (a blank one for silence), with their token counts and the
    transcripts themselves when asked."""
    torch.manual_seed(0)
    cascade = tiny_cascade()
    wavs = torch.randn(2, 8000) * 0.1
    answers, counts, transcripts = cascade.generate(
        wavs,
        instructions="Repeat:",
        max_new_tokens=3,
        return_num_tokens=True,
        return_transcripts=True,
    )
    assert transcripts == cascade.transcribe(wavs)
    texts = [t or " " for t in transcripts]
    want = cascade.generate_text(texts, "Repeat:", max_new_tokens=3)
    assert answers == want
    assert counts.tolist() == [len(x) for x in cascade.transcript_ids(texts)]
    ids = cascade.generate(
        wavs, instructions="Repeat:", max_new_tokens=3, return_ids=True
    )
    assert [cascade.tokenizer.decode(x).strip() for x in ids] == answers
    with pytest.raises(ValueError, match="needs `wavs`"):
        cascade.generate(feats=torch.randn(2, 10, 64))


def test_a_speech_llm_has_no_transcripts_to_return():
    model = tiny_speech_llm()
    with pytest.raises(ValueError, match="no transcripts"):
        model.generate(
            torch.randn(1, 4000), max_new_tokens=2, return_transcripts=True
        )


def test_text_prompts_through_the_loop_are_generate_text():
    """answer() without speech embeddings reads the prompts as text with
    PLoRA off: exactly generate_text."""
    model = tiny_speech_llm(whisper=False)
    transcripts = ["the cat sat", "a dog"]
    prompts = model.prompts.build_batch("Repeat:", transcripts=transcripts)
    options = {"max_new_tokens": 4, "num_beams": 1}
    got = generation.answer(model, prompts, options)
    assert got == model.generate_text(transcripts, "Repeat:", max_new_tokens=4)
