"""Tiny random models for tests: the sizes every tiny model uses, the
speech LLM, AuRA, the language-aware Q-Former, the cascade, a CPU Brain,
and a tiny LLM saved to a folder.

Not part of the library's public API (see :mod:`speechbrain_blspkd.utils.
testing`).  Unit tests build their models from configs (no download):
these helpers give the sizes every tiny model uses, so that one change
reaches them all.
"""

from speechbrain_blspkd.testing.tokenizers import (
    build_test_tokenizer,
    build_test_whisper_tokenizer,
    doctest_tokenizer,
    whisper_token_settings,
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


def tiny_whisper_model(**overrides):
    """A tiny random ``WhisperForConditionalGeneration`` (encoder and
    decoder: d_model 16, one layer each, 2 heads, 8 mel bins, vocabulary
    60), e.g. for the CTranslate2 converters' examples.

    Arguments
    ---------
    **overrides
        Config values that replace (or add to) these.

    Returns
    -------
    transformers.WhisperForConditionalGeneration

    Example
    -------
    >>> tiny_whisper_model().config.d_model
    16
    """
    from transformers import WhisperForConditionalGeneration

    sizes = dict(
        vocab_size=60,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=10,
        max_target_positions=12,
        pad_token_id=0,
    )
    config = tiny_whisper_config(**{**sizes, **overrides})
    return WhisperForConditionalGeneration(config)


def tiny_speech_llm(llm_type="llama", whisper=True, init_std=0.3, **kwargs):
    """A tiny random speech LLM (test tokenizer, 2-layer LLM, CFormer).

    Arguments
    ---------
    llm_type : str
        "llama" or "qwen2".
    whisper : bool
        Include a tiny random Whisper encoder (d_model 64, 2 layers).
    init_std : float
        LLM weight init std (large enough for varied greedy outputs).
    **kwargs
        Passed to :class:`~speechbrain_blspkd.models.speech_llm.
        SpeechLLMModel` (``adapter=`` replaces the CFormer, ``encoder=``
        the Whisper encoder).

    Returns
    -------
    speechbrain_blspkd.models.speech_llm.SpeechLLMModel

    Example
    -------
    >>> tiny_speech_llm().llm.config.hidden_size
    64
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.cformer import CFormer
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

    tok = build_test_tokenizer()
    common = tiny_llm_config(
        tok, tie_word_embeddings=True, initializer_range=init_std
    )
    if llm_type == "llama":
        llm = LlamaForCausalLM(LlamaConfig(**common))
    elif llm_type == "qwen2":
        llm = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"tiny_speech_llm: unknown llm_type {llm_type!r}")
    encoder = kwargs.pop("encoder", None)
    if whisper and encoder is None:
        encoder = WhisperEncoder(tiny_whisper_config())
    adapter = kwargs.pop("adapter", None)
    if adapter is None:
        adapter = CFormer(64, 64, n_pre=1, n_post=1, nhead=4, d_ffn=128)
    kwargs.setdefault("plora", dict(r=4, alpha=8, dropout=0.0, scope="audio"))
    return SpeechLLMModel(
        llm, adapter, encoder=encoder, tokenizer=tok, **kwargs
    )


def tiny_saved_speech_llm(folder, seed=0, **kwargs):
    """A tiny random SpeechLLMModel whose bases are saved in ``folder``.

    For tests and doctests: the LLM (+ tokenizer) goes to ``folder/llm``, the
    Whisper model (encoder, 2 decoder layers, a test tokenizer: usable by
    the Q-Former and the cascade's recogniser) to ``folder/whisper``, and
    the model is built from these
    folders, so that an export of it can be loaded with
    :meth:`~speechbrain_blspkd.inference.SpeechLLM.from_hparams`.
    ``encoder=`` replaces the Whisper encoder (e.g. a log-mel front end),
    ``adapter=`` the CFormer.
    """
    import pathlib

    import torch

    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.cformer import CFormer
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

    folder = pathlib.Path(folder)
    torch.manual_seed(seed)
    base = tiny_speech_llm(whisper=False, plora=None)
    base.llm.save_pretrained(folder / "llm")
    base.tokenizer.save_pretrained(folder / "llm")
    from transformers import WhisperForConditionalGeneration

    asr_tokenizer = build_test_whisper_tokenizer()
    whisper = WhisperForConditionalGeneration(
        tiny_whisper_config(
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=64,
            # room for a SynthSpeech transcript (token timings)
            max_target_positions=128,
            **whisper_token_settings(asr_tokenizer),
        )
    )
    # two alignment heads, as a real Whisper asset lists (token timings)
    whisper.generation_config.alignment_heads = [[0, 1], [1, 2]]
    asr_tokenizer.save_pretrained(folder / "whisper")
    whisper.save_pretrained(folder / "whisper")
    adapter = kwargs.pop("adapter", None)
    if adapter is None:
        adapter = CFormer(
            64,
            64,
            n_pre=kwargs.pop("n_pre", 1),
            n_post=kwargs.pop("n_post", 1),
            nhead=4,
            d_ffn=128,
        )
    kwargs.setdefault("plora", dict(r=4, alpha=8, dropout=0.0, scope="audio"))
    encoder = kwargs.pop("encoder", None)
    if encoder is None:
        encoder = WhisperEncoder(str(folder / "whisper"))
    model = SpeechLLMModel(
        str(folder / "llm"), adapter, encoder=encoder, **kwargs
    )
    with torch.no_grad():  # non-zero PLoRA B so that PLoRA changes outputs
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model


def tiny_aura(
    stride=4,
    scope="audio",
    llm_layers=(1, 2),
    teacher_layers=(1, 2),
    weights=None,
    seed=0,
    **kwargs,
):
    """A tiny AuRA model and objective (64 wide, 2-layer LLM and teacher).

    The model: the log-mel front end in the encoder slot, an
    :class:`~speechbrain_blspkd.nnet.audio_embedding.AudioEmbedding` and
    PLoRA (r 4) on a tiny random LLM.  The objective: a tiny random frozen
    Whisper encoder as the teacher and a :class:`~speechbrain_blspkd.
    objectives.aura.LayerMap` of ``llm_layers`` <- ``teacher_layers``.

    Arguments
    ---------
    stride : int
        Mel frames per LLM position.
    scope : str
        PLoRA scope (``"audio"`` or ``"global"``).
    llm_layers, teacher_layers : sequence of int
        The layer map.
    weights : dict, optional
        The objective's weights (default its own).
    seed : int
        Seed of the random weights.
    **kwargs
        More :class:`~speechbrain_blspkd.objectives.aura.AuRAObjective`
        arguments (``time_alignment``, ``eval_kl`` ...).

    Returns
    -------
    (SpeechLLMModel, AuRAObjective)

    Example
    -------
    >>> model, objective = tiny_aura(stride=2)
    >>> type(model.encoder).__name__, objective.layer_map.pairs
    ('WhisperLogMel', [(1, 1), (2, 2)])
    """
    import torch

    from speechbrain_blspkd.nnet.audio_embedding import AudioEmbedding
    from speechbrain_blspkd.nnet.whisper_encoder import (
        WhisperEncoder,
        WhisperLogMel,
    )
    from speechbrain_blspkd.objectives.aura import AuRAObjective, LayerMap

    torch.manual_seed(seed)
    model = tiny_speech_llm(
        whisper=False,
        encoder=WhisperLogMel(),
        adapter=AudioEmbedding(80, 64, stride=stride, out_init_std=0.3),
        plora=dict(r=4, alpha=8, dropout=0.0, scope=scope),
    )
    teacher = WhisperEncoder(tiny_whisper_config())
    objective = AuRAObjective(
        teacher,
        LayerMap(64, teacher.output_size, llm_layers, teacher_layers),
        weights=weights,
        **kwargs,
    )
    return model, objective


def tiny_language_aware_qformer(languages=("en", "de"), **overrides):
    """A tiny :class:`~speechbrain_blspkd.nnet.language_aware_qformer.
    LanguageAwareQFormer` for the 64-wide tiny models (4 queries per
    language, one layer, gate width 16).

    Arguments
    ---------
    languages : sequence of str
        The gate's languages.
    **overrides
        Constructor arguments that replace the defaults (``gating``,
        ``gate``, ``forcing_fraction`` ...).

    Returns
    -------
    LanguageAwareQFormer

    Example
    -------
    >>> tiny_language_aware_qformer(gating="soft").queries.shape
    torch.Size([2, 4, 64])
    """
    from speechbrain_blspkd.nnet.language_aware_qformer import (
        LanguageAwareQFormer,
    )

    args = dict(
        input_size=64,
        output_size=64,
        num_queries=4,
        num_layers=1,
        num_heads=4,
        ffn_size=128,
        gate_size=16,
    )
    args.update(overrides)
    return LanguageAwareQFormer(languages=list(languages), **args)


def tiny_cascade(seed=0, **kwargs):
    """A tiny random cascade (random Whisper ASR + tiny LLM).

    Example
    -------
    >>> tiny_cascade().transcriber.max_new_tokens
    4
    """
    import torch

    from speechbrain_blspkd.models.cascade import CascadeModel
    from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber

    torch.manual_seed(seed)
    text = tiny_speech_llm(whisper=False, plora=None)
    tok = build_test_whisper_tokenizer()
    config = tiny_whisper_config(
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        max_target_positions=32,
        **whisper_token_settings(tok),
    )
    asr = WhisperTranscriber(config, tokenizer=tok, max_new_tokens=4)
    return CascadeModel(text.llm, asr, tokenizer=text.tokenizer, **kwargs)


def tiny_brain(model, stage, step_log, log_every_n_steps=1, **run_opts):
    """A CPU :class:`~speechbrain_blspkd.brain.SpeechLLMBrain` in ``stage``.

    AdamW (lr 1e-3) over the trainable parameters, the stage's optimiser
    built, the evaluation accumulators reset.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The model to train.
    stage : speechbrain_blspkd.stages.Stage
        The current stage.
    step_log : str
        The step-log file (JSONL).
    log_every_n_steps : int
        Step-log period (0: none).
    **run_opts
        speechbrain run options besides ``device="cpu"``.

    Returns
    -------
    speechbrain_blspkd.brain.SpeechLLMBrain
    """
    import torch

    from speechbrain_blspkd.brain import SpeechLLMBrain

    brain = SpeechLLMBrain(
        modules={"model": model},
        opt_class=lambda params: torch.optim.AdamW(params, lr=1e-3),
        hparams=dict(log_every_n_steps=log_every_n_steps, step_log=step_log),
        run_opts={"device": "cpu", **run_opts},
    )
    brain.stage = stage
    brain.init_optimizers()
    brain.on_stage_start(None)
    return brain


def count_llm_calls(model):
    """Context manager counting the forward calls of ``model``'s LLM
    backbone: yields a list that grows by one per call."""
    import contextlib

    @contextlib.contextmanager
    def counting():
        calls = []
        handle = model.llm.base_model.register_forward_hook(
            lambda *args: calls.append(1)
        )
        try:
            yield calls
        finally:
            handle.remove()

    return counting()


def save_toy_llm(folder, tokenizer, seed=0, **overrides):
    """Save a tiny random Llama (32 wide, 2 layers) and ``tokenizer``.

    The folder is a standard transformers causal-LM folder, loadable with
    ``from_pretrained`` (tests and doctests of code that takes a model
    folder, e.g. :mod:`speechbrain_blspkd.dataprep.continuations`).

    Arguments
    ---------
    folder : str or pathlib.Path
        Where to save (created).
    tokenizer : transformers tokenizer
        E.g. :func:`toy_word_tokenizer` or :func:`build_test_tokenizer`.
    seed : int
        Seed of the random weights.
    **overrides
        Config values (see :func:`tiny_llm_config`).

    Returns
    -------
    pathlib.Path
        ``folder``.

    Example
    -------
    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM
    >>> from speechbrain_blspkd.testing import toy_word_tokenizer
    >>> folder = save_toy_llm(tempfile.mkdtemp(), toy_word_tokenizer(["hi"]))
    >>> AutoModelForCausalLM.from_pretrained(folder).config.hidden_size
    32
    """
    import pathlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        hidden_size=32, intermediate_size=64, max_position_embeddings=256
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(**tiny_llm_config(tokenizer, **config))
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return pathlib.Path(folder)


def save_toy_continuation_inputs(folder=None):
    """A toy LLM ``<folder>/lm`` and a manifest ``<folder>/in.csv`` to continue.

    The manifest has one row (``u1``, transcript ``hello world``); the LLM
    is :func:`save_toy_llm` with :func:`doctest_tokenizer` (the setup of the
    examples of :mod:`speechbrain_blspkd.dataprep.continuations`).

    Arguments
    ---------
    folder : str or pathlib.Path, optional
        Where to write them.

    Returns
    -------
    pathlib.Path
        ``folder``, or the new temporary folder used when none was given.

    Example
    -------
    >>> sorted(p.name for p in save_toy_continuation_inputs().iterdir())
    ['in.csv', 'lm']
    """
    import pathlib
    import tempfile

    from speechbrain_blspkd.dataio.manifest import write_manifest

    folder = pathlib.Path(folder or tempfile.mkdtemp())
    row = dict(ID="u1", wav="x.wav", duration=1, transcript="hello world")
    write_manifest(folder / "in.csv", [row | dict(language="en", speaker="s")])
    save_toy_llm(folder / "lm", doctest_tokenizer())
    return folder
