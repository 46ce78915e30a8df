"""How well the training sentences of an English SynthSpeech plan cover
the vocabulary of its test sentences (text only, no audio).

:func:`plan_coverage` makes the English plans of several ``num_train``
sizes (:func:`~speechbrain_blspkd.dataprep.synthspeech_plan.make_plan`)
and measures the share of the test sentences' tokens that their training
sentences hold; :func:`llm_tokenize` gives the tokenisation of an LLM's
transcripts.  ``python -m speechbrain_blspkd.dataprep.english_text
--coverage LLM`` prints the table.
"""

from speechbrain_blspkd.dataprep.synthspeech_plan import make_plan


def plan_coverage(
    tokenize,
    sizes,
    num_valid=32,
    num_test=96,
    seed=1234,
    sentences=None,
    extra=None,
):
    """Vocabulary coverage of an English plan's test sentences by the
    training sentences of plans of several ``num_train`` sizes.

    No audio is made: the sentences come from
    :func:`~speechbrain_blspkd.dataprep.synthspeech_plan.make_plan`.

    Arguments
    ---------
    tokenize : callable
        ``str -> list of int`` (the LLM's transcript tokenisation).
    sizes : list of int
        The ``num_train`` values.
    num_valid, num_test, seed : int
        The other plan options (English only).
    sentences, extra : dict, optional
        Pools for :func:`~speechbrain_blspkd.dataprep.synthspeech_plan.make_plan`
        (default: this machine's).

    Returns
    -------
    list of dict
        Per size: ``num_train``, ``distinct_train`` (distinct training
        sentences), ``token_coverage``, ``type_coverage``.

    Example
    -------
    >>> core = {"en": [f"Sentence {w} is here." for w in "abcdefgh"]}
    >>> more = {"en": ["Sentence x is there."]}
    >>> vocab = {}
    >>> def tokenize(text):  # one id per word
    ...     return [vocab.setdefault(w, len(vocab)) for w in text.split()]
    >>> out = plan_coverage(tokenize, [4, 20], 1, 2, 0, core, more)
    >>> [(r["distinct_train"], r["token_coverage"]) for r in out]
    [(4, 0.75), (6, 0.75)]
    """
    from speechbrain_blspkd.metrics import vocabulary_coverage

    def texts(plan, split):
        return [u["text"] for u in plan["utterances"] if u["split"] == split]

    out, test = [], None
    for n in sizes:
        plan = make_plan(
            n, num_valid, num_test, ["en"], seed, None, sentences, extra
        )
        if test is None:
            test = texts(plan, "test")
        if texts(plan, "test") != test:
            raise AssertionError("the test split depends on num_train")
        train = sorted(set(texts(plan, "train")))
        cov = vocabulary_coverage(
            [tokenize(t) for t in test], [tokenize(t) for t in train]
        )
        out.append(
            dict(
                num_train=n,
                distinct_train=len(train),
                token_coverage=cov["token_coverage"],
                type_coverage=cov["type_coverage"],
            )
        )
    return out


def llm_tokenize(model):
    """``str -> list of int``: the transcript tokenisation of the LLM
    ``model`` (an asset name or a folder)."""
    from transformers import AutoTokenizer

    from speechbrain_blspkd.assets.paths import resolve_source
    from speechbrain_blspkd.prompt import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(model)))
    return PromptBuilder(tokenizer).transcript_ids
