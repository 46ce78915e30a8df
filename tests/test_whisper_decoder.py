"""The Whisper decoder pass and the LLM token spans of the token timings
(:mod:`speechbrain_blspkd.nnet.whisper_decoder`,
:mod:`speechbrain_blspkd.nnet.token_alignment`): the decoder states equal
Hugging Face's decoder and do not depend on the batch padding; the LLM
token spans cover the transcript.
"""

import pytest
import torch

from speechbrain_blspkd.nnet.token_alignment import llm_token_spans
from speechbrain_blspkd.nnet.whisper_decoder import WhisperDecoderTeacher
from speechbrain_blspkd.prompt import PromptBuilder
from speechbrain_blspkd.testing import (
    build_test_tokenizer,
    tiny_saved_speech_llm,
)


def test_llm_spans_cover_the_transcript():
    prompts = PromptBuilder(build_test_tokenizer(), transcript_separator=" ")
    transcript = "  the quick brown fox, how are you?"
    ids, spans = llm_token_spans(prompts, transcript)
    assert ids == prompts.transcript_ids(transcript)
    text = transcript.strip()
    # contiguous, from the separator (-1) to the end of the text
    assert spans[0][0] == -1 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert "".join(text[max(a, 0) : b] for a, b in spans) == text


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    tiny_saved_speech_llm(folder)
    return folder


def test_decoder_states_match_hf_and_ignore_padding(bases):
    from transformers import WhisperForConditionalGeneration

    teacher = WhisperDecoderTeacher(bases / "whisper")
    hf = WhisperForConditionalGeneration.from_pretrained(
        str(bases / "whisper")
    ).eval()
    torch.manual_seed(0)
    feats = [torch.randn(9, 64), torch.randn(5, 64)]
    ids = [teacher.prefix_ids("en") + [40, 41, 42], teacher.prefix_ids("de")]
    with torch.no_grad():
        ref = hf.model.decoder(
            input_ids=torch.tensor([ids[0]]),
            encoder_hidden_states=feats[0][None],
        ).last_hidden_state
    one = teacher.states(
        feats[0][None], torch.tensor([9]), torch.tensor([ids[0]])
    )
    torch.testing.assert_close(one, ref, rtol=1e-4, atol=1e-5)
    # a batch with padded frames and ids: each row as on its own
    padded = torch.zeros(2, 9, 64)
    padded[0], padded[1, :5] = feats[0], feats[1]
    padded[1, 5:] = 7.0  # garbage padding must not matter
    batch_ids = torch.tensor([ids[0], ids[1] + [0, 0, 0]])
    both = teacher.states(padded, torch.tensor([9, 5]), batch_ids)
    alone = teacher.states(
        feats[1][None], torch.tensor([5]), torch.tensor([ids[1]])
    )
    torch.testing.assert_close(both[0], one[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1, :4], alone[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no Whisper token"):
        teacher.prefix_ids("xx")
