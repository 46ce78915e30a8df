"""Test tokenizers: a tiny byte-level BPE with a ChatML template, a
word-level one, and one with Whisper's special tokens.

Not part of the library's public API (see :mod:`speechbrain_blspkd.utils.
testing`).
"""

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
