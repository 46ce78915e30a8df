"""The layout of an exported model folder, and its ``hyperparams.yaml`` values.

An exported folder (written by
:func:`speechbrain_blspkd.inference.export.export_model`) holds four small
files; the frozen bases (Whisper encoder, LLM) are referenced by asset name
or folder path, never copied:

* ``hyperparams.yaml`` (:data:`HPARAMS_FILE`): the HyperPyYAML that
  :meth:`speechbrain_blspkd.inference.SpeechLLM.from_hparams` builds the
  model from: the values of :data:`DEFAULT_CONFIG` (plain YAML keys,
  grouped as in :data:`CONFIG_SECTIONS`), then the fixed wiring;
* ``model.ckpt`` (:data:`WEIGHTS_FILE`): the learned weights only (adapter,
  PLoRA, unfrozen encoder), written by
  :class:`~speechbrain_blspkd.models.trainable.TrainableWeights`;
* ``export.json`` (:data:`INFO_FILE`): what was exported, when, and the
  sha256 of each file (format :data:`FORMAT`, :data:`FORMAT_VERSION`);
* ``README.md``: the model card (method, base models and licences, the
  training run and its evaluation when found, intended use and limits, the
  commands that load it), :mod:`speechbrain_blspkd.inference.model_card`.

:func:`check_model_folder` tells whether a folder is complete (raising
:class:`ModelFolderError`); :func:`merge_config` checks and merges
``hyperparams.yaml`` values. This module imports nothing heavy: loading,
exporting and describing a folder all start from it.

Authors
 * speechbrain-blspkd contributors 2025
"""

import hashlib
import json
import pathlib

from speechbrain_blspkd.nnet.plora_targets import DEFAULT_TARGETS

__all__ = [
    "CONFIG_SECTIONS",
    "DEFAULT_CONFIG",
    "FORMAT",
    "FORMAT_VERSION",
    "HPARAMS_FILE",
    "INFO_FILE",
    "WEIGHTS_FILE",
    "ModelFolderError",
    "check_model_folder",
    "file_sha256",
    "merge_config",
]

HPARAMS_FILE = "hyperparams.yaml"
WEIGHTS_FILE = "model.ckpt"
INFO_FILE = "export.json"
FORMAT = "speechbrain-blspkd/speech-llm"
FORMAT_VERSION = 1


class ModelFolderError(FileNotFoundError):
    """A model folder is missing a file or a file does not match."""


#: The values of ``hyperparams.yaml``: (section comment, {key: default}).
CONFIG_SECTIONS = (
    (
        "The model class (speechbrain_blspkd.models.speech_llm.SpeechLLMModel"
        ", or speechbrain_blspkd.models.cascade.CascadeModel)",
        {"model_class": "speechbrain_blspkd.models.speech_llm.SpeechLLMModel"},
    ),
    (
        "Pretrained bases: an asset name (python -m speechbrain_blspkd."
        "assets list) or a local transformers folder; encoder_source null: "
        "no pretrained speech encoder (see encoder_class below)",
        {
            "llm_source": "smollm2-135m-instruct",
            "encoder_source": "whisper-base",
        },
    ),
    (
        "Speech encoder (speechbrain_blspkd.nnet.whisper_encoder."
        "WhisperEncoder). *_dtype: auto (bf16 where this machine computes "
        "it fast, else fp32), a dtype name, or null (fp32)",
        {
            "encoder_freeze": True,
            "encoder_dynamic_length": True,
            "encoder_mask_padding": True,
            "encoder_dtype": "auto",
        },
    ),
    (
        "Speech encoder built from its constructor arguments alone, used "
        "when encoder_source is null: a class and its options (e.g. the "
        "log-mel front end speechbrain_blspkd.nnet.whisper_encoder."
        "WhisperLogMel of an encoder-free model); null: none",
        {"encoder_class": None, "encoder_options": {}},
    ),
    (
        "Speech adapter: a speechbrain_blspkd.nnet.adapter.SpeechAdapter "
        "class and its constructor arguments (SpeechAdapter.export_hparams)",
        {
            "adapter_class": "speechbrain_blspkd.nnet.cformer.CFormer",
            "adapter_options": {
                "input_size": 512,
                "output_size": 576,
                "n_pre": 4,
                "n_post": 4,
                "nhead": 8,
                "d_ffn": 2048,
                "dropout": 0.1,
                "out_init_std": None,
                "weight_norm": True,
                "pre_dropout": 0.0,
                "activation": "gelu",
                "threshold": 1.0,
                "weight_bias_init": 0.0,
                "frame_stride": 1,
            },
        },
    ),
    (
        "Partial LoRA in the LLM (speechbrain_blspkd.nnet.plora.apply_plora);"
        " null: none",
        {
            "plora": {
                "r": 16,
                "alpha": 16.0,
                "dropout": 0.05,
                "scope": "audio",
                "target_modules": list(DEFAULT_TARGETS),
            },
            "llm_dtype": "auto",
            "snap_speech": False,
        },
    ),
    (
        "Prompts (speechbrain_blspkd.prompt.PromptBuilder); a mapping, so "
        "that HyperPyYAML never interpolates <...> inside these strings",
        {
            "prompts": {
                "system_prompt": None,
                "instruction": (
                    "Continue the following text in a coherent style:"
                ),
                "audio_instruction": None,
                "transcript_separator": " ",
            },
        },
    ),
    (
        "Speech recogniser of a cascade (speechbrain_blspkd.nnet.whisper_asr"
        ".WhisperTranscriber); null: none",
        {"transcriber_source": None, "transcriber_options": {}},
    ),
    (
        "Audio input and generation defaults",
        {
            "sample_rate": 16000,
            "max_audio_seconds": 30.0,
            "max_new_tokens": 64,
            "num_beams": 1,
        },
    ),
)

#: Every value key of ``hyperparams.yaml`` and its default.
DEFAULT_CONFIG = {
    key: value for _, values in CONFIG_SECTIONS for key, value in values.items()
}


def merge_config(base, update, where):
    """``base`` updated by ``update``; ``prompts`` is merged key by key.

    ``adapter_options`` are merged key by key too, unless ``update`` also
    names another ``adapter_class``.

    Arguments
    ---------
    base : dict
        ``hyperparams.yaml`` values.
    update : dict
        Values overriding them (keys of :data:`DEFAULT_CONFIG`).
    where : str
        Who asks, named in the errors.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        An unknown key (or an unknown ``prompts`` key) in ``update``.

    Example
    -------
    >>> merged = merge_config(DEFAULT_CONFIG,
    ...     {"prompts": {"instruction": "Repeat:"}}, "example")
    >>> merged["prompts"]["instruction"], merged["prompts"]["system_prompt"]
    ('Repeat:', None)
    """
    unknown = sorted(set(update) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: "
            f"{', '.join(DEFAULT_CONFIG)}"
        )
    out = {**base, **update}
    if "adapter_options" in update and "adapter_class" not in update:
        out["adapter_options"] = {
            **base.get("adapter_options", {}),
            **(update["adapter_options"] or {}),
        }
    if "prompts" in update:
        prompts = update["prompts"] or {}
        known = DEFAULT_CONFIG["prompts"]
        bad = sorted(set(prompts) - set(known))
        if bad:
            raise ValueError(
                f"{where}: unknown prompts key(s) {', '.join(bad)}; known: "
                f"{', '.join(known)}"
            )
        out["prompts"] = {**known, **base.get("prompts", {}), **prompts}
    return out


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_model_folder(folder, hparams_file=HPARAMS_FILE):
    """Check that ``folder`` holds a complete exported model.

    Raises :class:`ModelFolderError` naming the missing file, or the file
    whose sha256 differs from the one recorded in ``export.json`` (when
    that file exists: a folder assembled by hand needs only
    ``hyperparams.yaml`` and ``model.ckpt``).

    Arguments
    ---------
    folder : str or pathlib.Path
        The model folder.
    hparams_file : str
        Name of the hyperparameter file in it.

    Returns
    -------
    pathlib.Path
        ``folder``, checked.

    Example
    -------
    >>> import tempfile
    >>> check_model_folder(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.inference.model_folder.ModelFolderError: .../hyperparams.yaml: missing; not an exported model folder (see speechbrain_blspkd.inference.export)
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder not found")
    for name in (hparams_file, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ModelFolderError(
                f"{folder / name}: missing; not an exported model folder "
                "(see speechbrain_blspkd.inference.export)"
            )
    info_path = folder / INFO_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            files = info["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFolderError(f"{info_path}: unreadable ({e})") from None
        entry = files.get(WEIGHTS_FILE)
        if entry and file_sha256(folder / WEIGHTS_FILE) != entry.get("sha256"):
            raise ModelFolderError(
                f"{folder / WEIGHTS_FILE}: sha256 differs from the one "
                f"recorded in {info_path} (corrupted or replaced weights)"
            )
    return folder
