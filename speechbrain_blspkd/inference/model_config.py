"""The ``hyperparams.yaml`` values read off a model object.

:func:`config_from_model` gives the keys of
:data:`~speechbrain_blspkd.inference.model_folder.DEFAULT_CONFIG` that
rebuild a :class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel`'s
structure (adapter class and options, encoder, PLoRA, prompts, ...):
what :func:`~speechbrain_blspkd.inference.export.export_model` writes
unless the caller overrides it.

Authors
 * speechbrain-blspkd contributors 2025
"""

import pathlib

__all__ = ["config_from_model"]


def config_from_model(model):
    """The ``hyperparams.yaml`` values that rebuild ``model``'s structure.

    Sources (``llm_source``, ``encoder_source``) are taken from the folders
    the LLM / encoder were loaded from when they are known; other values
    come from the adapter, the encoder, PLoRA and the prompt builder.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The model.

    Returns
    -------
    dict
        Keys of :data:`DEFAULT_CONFIG` that could be read off the model.

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> config = config_from_model(tiny_speech_llm())
    >>> config["adapter_class"]
    'speechbrain_blspkd.nnet.cformer.CFormer'
    >>> config["adapter_options"]["n_pre"], config["plora"]["r"]
    (1, 4)
    """
    from speechbrain_blspkd.nnet import plora as plora_lib

    config = {}
    name = getattr(model.llm.config, "_name_or_path", "") or ""
    if name and pathlib.Path(name).is_dir():
        config["llm_source"] = name
    enc = model.encoder
    if callable(getattr(enc, "export_hparams", None)):
        # built from its arguments alone (no pretrained weights)
        config.update(
            encoder_source=None,
            encoder_class=_class_path(enc),
            encoder_options=enc.export_hparams(),
        )
    elif enc is not None:
        enc_name = getattr(enc.config, "_name_or_path", "") or ""
        if enc_name and pathlib.Path(enc_name).is_dir():
            config["encoder_source"] = enc_name
        config.update(
            encoder_freeze=bool(enc.freeze),
            encoder_dynamic_length=bool(enc.dynamic_length),
            encoder_mask_padding=bool(enc.mask_padding),
        )
    config["model_class"] = _class_path(model)
    if enc is None:
        config["encoder_source"] = None
    ad = model.adapter
    if ad is None:
        config.update(adapter_class=None, adapter_options={})
    else:
        config["adapter_class"] = _class_path(ad)
        config["adapter_options"] = ad.export_hparams()
    asr = getattr(model, "transcriber", None)
    if asr is not None:
        asr_name = getattr(asr.config, "_name_or_path", "") or ""
        if asr_name and pathlib.Path(asr_name).is_dir():
            config["transcriber_source"] = asr_name
        config["transcriber_options"] = dict(
            language=asr.language,
            max_new_tokens=int(asr.max_new_tokens),
            num_beams=int(asr.num_beams),
        )
    if model.has_plora:
        plora = plora_lib.plora_config(model.llm)
        plora["target_modules"] = _plora_targets(model.llm)
        config["plora"] = plora
    else:
        config["plora"] = None
    config["snap_speech"] = bool(getattr(model, "snap_speech", False))
    config["prompts"] = dict(
        system_prompt=model.prompts.system_prompt,
        instruction=model.instruction,
        audio_instruction=model.audio_instruction,
        transcript_separator=model.prompts.transcript_separator,
    )
    return config


def _class_path(obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _plora_targets(llm):
    """Module-name suffixes that re-wrap exactly the wrapped layers of
    ``llm`` (the full names when suffixes would wrap more)."""
    from torch import nn

    from speechbrain_blspkd.nnet import plora as plora_lib

    names = [n for n, _ in plora_lib._wrapped(llm)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    inner = {f"{n}.base" for n in names}
    for name, module in plora_lib._unwrap(llm).named_modules():
        if not isinstance(module, nn.Linear) or name in inner:
            continue
        if name.rsplit(".", 1)[-1] in suffixes:
            return names
    return suffixes
