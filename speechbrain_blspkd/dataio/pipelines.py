"""The data pipelines of training: one dataset per stage, valid and test.

:func:`dataio_prepare` reads the manifests into speechbrain
``DynamicItemDataset``s and adds what a batch carries: the waveform
(``sig``) or the cached encoder features (``feats``), the transcript, the
teacher continuation and whether it was truncated, the language index for
an adapter that declares its languages, the token timings when the recipe
stores them, and the items each stage's objective asks for
(:meth:`~speechbrain_blspkd.objectives.Objective.data_items`).  Rows are
checked before any training (languages, context length).
"""

import speechbrain as sb

from speechbrain_blspkd.dataio.audio import load_row_audio
from speechbrain_blspkd.dataio.manifest import (
    language_index,
    manifest_to_dataset,
)

__all__ = ["dataio_prepare"]


def dataio_prepare(hparams, feature_cache=None, row_items=()):
    """Datasets of every training stage, validation and test.

    Arguments
    ---------
    hparams : dict
        Needs ``stages`` (each stage's ``train_manifest``), ``valid_csv``,
        ``test_csv`` (with teacher continuations), ``data_root``,
        ``sample_rate``, ``max_audio_seconds``, ``sorting``.
    feature_cache : FeatureCache, optional
        When given, items carry cached encoder features (``feats``) instead
        of waveforms (``sig``).
    row_items : sequence of (callable, str)
        More dynamic items for every split, each with the key it provides
        (the recipe runner passes the stored token timings,
        :func:`speechbrain_blspkd.dataprep.token_timings.timing_items`, as
        ``token_spans``).

    Returns
    -------
    dict of DynamicItemDataset
        One per stage name, plus ``valid`` and ``test``.  When the model's
        adapter declares its languages
        (:meth:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter.
        language_codes`), items also carry ``language_id``, the row's
        language as an index into that list.

    Raises
    ------
    ValueError
        Before any training, when a row's language is not one of the
        adapter's languages (the message names the manifest, the code and
        the row).
    speechbrain_blspkd.prompt.ContextLengthError
        Before any training, when a row of a manifest with continuations
        (the LLM passes: teacher and student sequences with the
        continuation) is longer than the LLM context (``hparams["model"]``,
        when given); the message names the manifest and the row.
    """
    sources = {s.name: s.train_manifest for s in hparams["stages"]}
    sources.update(valid=hparams["valid_csv"], test=hparams["test_csv"])
    training = {s.name: s for s in hparams["stages"]}
    datasets = {}
    for name, path in sources.items():
        ds = manifest_to_dataset(path, hparams["data_root"], ["id"])
        if name in training:
            ds = training[name].select_rows(ds, source=path)
        if name in training and hparams["sorting"] != "random":
            ds = ds.filtered_sorted(
                sort_key="duration",
                reverse=hparams["sorting"] == "descending",
            )
        datasets[name] = ds
    model = hparams.get("model")
    language_ids = _language_ids(model, datasets, sources)
    if model is not None:  # every LLM pass must fit in the LLM context
        from speechbrain_blspkd.prompt import context_limit

        limit = context_limit(model.llm)
        for name, ds in datasets.items():
            rows = [dict(ds.data[uid], ID=uid) for uid in ds.data_ids]
            if not any(r.get("continuation") for r in rows):
                continue  # no LLM pass reads this manifest
            model.prompts.check_rows(
                limit,
                rows,
                model.instruction,
                audio_instruction=model.audio_instruction,
                source=sources[name],
            )
    all_sets = list(datasets.values())
    sr = hparams["sample_rate"]
    max_s = hparams["max_audio_seconds"]

    if feature_cache is None:

        def audio_pipeline_for(source):
            @sb.utils.data_pipeline.takes("id", "wav")
            @sb.utils.data_pipeline.provides("sig")
            def audio_pipeline(uid, wav):
                row = {"ID": uid, "wav": wav}
                return load_row_audio(
                    row, source, sample_rate=sr, max_seconds=max_s
                )

            return audio_pipeline

        for name, ds in datasets.items():
            ds.add_dynamic_item(audio_pipeline_for(sources[name]))
        audio_pipeline = None
        speech_key = "sig"
    else:

        @sb.utils.data_pipeline.takes("id")
        @sb.utils.data_pipeline.provides("feats")
        def audio_pipeline(uid):
            feats = feature_cache.get(uid)
            if feats is None:
                raise KeyError(
                    f"utterance {uid!r} is not in the feature cache "
                    f"{feature_cache.folder}; rebuild it"
                )
            return feats

        speech_key = "feats"

    @sb.utils.data_pipeline.takes("truncated")
    @sb.utils.data_pipeline.provides("truncated_flag")
    def flag_pipeline(truncated):
        return truncated == "1"

    if audio_pipeline is not None:
        sb.dataio.dataset.add_dynamic_item(all_sets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(all_sets, flag_pipeline)
    keys = ["id", speech_key, "transcript", "continuation", "truncated_flag"]
    if language_ids is not None:

        @sb.utils.data_pipeline.takes("language")
        @sb.utils.data_pipeline.provides("language_id")
        def language_pipeline(language):
            return language_ids[language]

        sb.dataio.dataset.add_dynamic_item(all_sets, language_pipeline)
        keys.append("language_id")
    for item, key in row_items:  # e.g. where each transcript token is
        sb.dataio.dataset.add_dynamic_item(all_sets, item)
        keys.append(key)
    sb.dataio.dataset.set_output_keys(all_sets, keys)
    for stage in hparams["stages"]:  # what each objective reads per row
        objective, ds = stage.objective, datasets[stage.name]
        items = getattr(objective, "data_items", None)
        items = items(model, ds, sources[stage.name]) if items else []
        for item in items:
            ds.add_dynamic_item(item)
        if items:
            ds.set_output_keys(keys + list(objective.data_keys()))
    return datasets


def _language_ids(model, datasets, sources):
    """``{code: index}`` for an adapter that declares its languages.

    None when the model has no adapter or its adapter uses no language;
    every row of every dataset is checked (ValueError naming the manifest,
    the unknown code and a row that has it).
    """
    adapter = getattr(model, "adapter", None)
    codes = None if adapter is None else adapter.language_codes()
    if codes is None:
        return None
    index = None
    for name, ds in datasets.items():
        rows = [dict(ds.data[uid], ID=uid) for uid in ds.data_ids]
        index = language_index(codes, rows, source=sources[name])
    return index
