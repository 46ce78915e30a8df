"""Tiny random model settings shared by tests, doctests and toy models.

Unit tests build their models from configs (no download): these helpers give
the sizes every tiny model uses, so that one change reaches them all.
"""

#: The logits a ``SpeechLLMModel`` forward output holds.
LOGIT_KEYS = (
    "student_input_logits",
    "teacher_input_logits",
    "student_response_logits",
    "teacher_response_logits",
)


def tiny_llm_config(tokenizer=None, **overrides):
    """Keyword arguments of a tiny decoder-only LLM config (2 layers, 64 wide).

    They suit ``LlamaConfig`` and ``Qwen2Config`` alike.

    Arguments
    ---------
    tokenizer : transformers tokenizer, optional
        When given, ``vocab_size``, ``pad_token_id`` and ``eos_token_id`` come
        from it and ``bos_token_id`` is ``None`` (the test tokenizers have no
        BOS token).
    **overrides
        Config values that replace (or add to) the defaults.

    Returns
    -------
    dict

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(**tiny_llm_config(vocab_size=50, hidden_size=32))
    >>> config.hidden_size, config.num_hidden_layers, config.vocab_size
    (32, 2, 50)
    """
    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if tokenizer is not None:
        config.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    config.update(overrides)
    return config


def tiny_whisper_config(**overrides):
    """A tiny ``WhisperConfig`` (d_model 64, 2 encoder layers, 80 mel bins).

    Arguments
    ---------
    **overrides
        Config values that replace (or add to) the defaults.

    Returns
    -------
    transformers.WhisperConfig

    Example
    -------
    >>> tiny_whisper_config().d_model, tiny_whisper_config(d_model=32).d_model
    (64, 32)
    """
    from transformers import WhisperConfig

    config = dict(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        num_mel_bins=80,
    )
    config.update(overrides)
    return WhisperConfig(**config)


def distillation_loss(out, ce_weight=1.0):
    """Sum of the BLSP-KD terms of a ``SpeechLLMModel`` forward output.

    Input KL + response KL + ``ce_weight`` * response CE + CIF quantity loss,
    each with its default settings (what tests train and check).

    Arguments
    ---------
    out : dict
        What ``SpeechLLMModel.forward`` returns.
    ce_weight : float
        Weight of the response cross-entropy.

    Returns
    -------
    torch.Tensor
        A scalar.

    Example
    -------
    >>> import torch
    >>> from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = SpeechLLMModel.tiny_for_tests()
    >>> out = model(torch.randn(1, 8000) * 0.1, torch.ones(1), ["hi"], ["yo"])
    >>> bool(torch.isfinite(distillation_loss(out)))
    True
    """
    from speechbrain_blspkd.losses import kd_kl, response_ce
    from speechbrain_blspkd.nnet.cif import quantity_loss

    return (
        kd_kl(
            out["student_input_logits"],
            out["teacher_input_logits"],
            out["input_mask"],
        )
        + kd_kl(
            out["student_response_logits"],
            out["teacher_response_logits"],
            out["response_mask"],
        )
        + ce_weight
        * response_ce(
            out["student_response_logits"],
            out["response_targets"],
            out["response_mask"],
        )
        + quantity_loss(out["alphas"], out["frame_mask"], out["num_tokens"])
    )
