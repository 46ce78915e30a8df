"""Slow test: the speech LLM with the real Whisper-base and SmolLM2 assets."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_real_models_finite_losses_and_steps_reduce_loss(real_asset):
    WHISPER = real_asset("whisper-base")
    SMOLLM2 = real_asset("smollm2-135m-instruct")
    import speechbrain as sb

    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.cformer import CFormer
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
    from speechbrain_blspkd.objectives import BLSPKDObjective

    torch.manual_seed(0)
    encoder = WhisperEncoder(WHISPER, dtype="auto")
    model = SpeechLLMModel(
        SMOLLM2,
        CFormer(
            512,
            576,
            n_pre=1,
            n_post=1,
            nhead=8,
            d_ffn=1024,
            dropout=0.0,
            out_init_std=0.136,
        ),
        encoder=encoder,
        instruction="Continue the following text in a coherent style:",
        plora=dict(r=8, alpha=16, dropout=0.0),
        llm_dtype="auto",
    )
    model.train()
    g = torch.Generator().manual_seed(0)
    wavs = torch.randn(2, 32000, generator=g) * 0.05
    lens = torch.tensor([1.0, 0.6])
    transcripts = ["he was not an ill disposed young man", "the birch canoe"]
    continuations = ["He lived in a small town.", "slid on the planks"]
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    objective = BLSPKDObjective(
        {"input_kl": 1.0, "response_kl": 1.0, "response_ce": 1.0, "cif": 1.0}
    )
    losses = []
    for _ in range(3):
        out = model(
            transcripts,
            continuations,
            wavs=wavs,
            wav_lens=lens,
            request=objective.request(sb.Stage.TRAIN),
        )
        for passed in (out.teacher, out.student):
            for span, logits in passed.logits.items():
                assert torch.isfinite(logits).all(), span
        assert out.student.logits["input"].shape[-1] == 49152
        loss, _ = objective(out, model, sb.Stage.TRAIN)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    # the teacher answers the transcript as text (SmolLM2 chat template)
    answers = model.generate_text(transcripts[:1], max_new_tokens=8)
    assert isinstance(answers[0], str) and answers[0]
