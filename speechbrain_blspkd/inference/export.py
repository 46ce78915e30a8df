"""Export a trained speech LLM as a self-contained inference folder.

:func:`export_model` writes, atomically, the folder laid out in
:mod:`speechbrain_blspkd.inference.model_folder` (``hyperparams.yaml``,
``model.ckpt``, ``export.json`` and the ``README.md`` model card); the
frozen bases are referenced by asset name or folder path, never copied.

How ``hyperparams.yaml`` is generated
-------------------------------------
:data:`~speechbrain_blspkd.inference.model_folder.DEFAULT_CONFIG`
(:mod:`speechbrain_blspkd.inference.model_folder`, the folder's layout)
holds the values (plain YAML keys a user may edit) and :data:`WIRING`, in
this module, the fixed HyperPyYAML that builds the model from them with the
``build_*`` functions below. :func:`render_hparams` writes the values
first, then the wiring. The repository file ``hparams/speech_llm.yaml`` is
``render_hparams(DEFAULT_CONFIG)`` (regenerate it with
``python -m speechbrain_blspkd.inference.export TEMPLATE``; a test checks
that it is up to date), so the installed package never needs a template
file at run time. The values read off a model object come from
:func:`speechbrain_blspkd.inference.model_config.config_from_model`.

The wiring of folders already exported names
``speechbrain_blspkd.inference.export.build_*`` and
``speechbrain_blspkd.inference.export.resolve_source``
(:mod:`speechbrain_blspkd.assets.paths`); this module keeps those names,
and those of the folder layout it used to hold (``DEFAULT_CONFIG``,
``ModelFolderError``, ``check_model_folder``), importable from here.

How a folder is loaded
----------------------
``SpeechLLM.from_hparams(source=FOLDER)`` reads ``FOLDER/hyperparams.yaml``;
its ``pretrainer`` has one loadable, ``model`` (the
:class:`~speechbrain_blspkd.models.trainable.TrainableWeights` hooks) and no
``paths``, so speechbrain's ``Pretrainer.collect_files`` looks for
``<source>/model.ckpt`` (the default source). With a local folder and
``savedir=None`` speechbrain's ``fetch`` returns the files where they are
(no copy, no symlink, no hub access).

Authors
 * speechbrain-blspkd contributors 2025
"""

import datetime
import json
import os
import pathlib
import shutil
import tempfile
import textwrap

import yaml

from speechbrain_blspkd.assets.paths import resolve_source
from speechbrain_blspkd.inference.model_config import config_from_model
from speechbrain_blspkd.inference.model_folder import (
    CONFIG_SECTIONS,
    DEFAULT_CONFIG,
    FORMAT,
    FORMAT_VERSION,
    HPARAMS_FILE,
    INFO_FILE,
    WEIGHTS_FILE,
    ModelFolderError,
    check_model_folder,
    file_sha256,
    merge_config,
)

__all__ = [
    "DEFAULT_CONFIG",
    "WIRING",
    "ModelFolderError",
    "check_model_folder",
    "config_from_model",
    "export_model",
    "build_adapter",
    "build_encoder",
    "build_model",
    "build_transcriber",
    "render_hparams",
    "resolve_source",
]

#: The fixed HyperPyYAML that builds the model from the values.
WIRING = """\
# ----------------------------------------------------------------------------
# Wiring (fixed; edit the values above). Loaded by
# speechbrain_blspkd.inference.SpeechLLM.from_hparams(source=FOLDER), which
# reads FOLDER/model.ckpt (the learned weights) through the pretrainer.
# ----------------------------------------------------------------------------
encoder: !apply:speechbrain_blspkd.inference.export.build_encoder
    source: !ref <encoder_source>
    freeze: !ref <encoder_freeze>
    dynamic_length: !ref <encoder_dynamic_length>
    mask_padding: !ref <encoder_mask_padding>
    dtype: !ref <encoder_dtype>
    encoder_class: !ref <encoder_class>
    encoder_options: !ref <encoder_options>

adapter: !apply:speechbrain_blspkd.inference.export.build_adapter
    - !ref <adapter_class>
    - !ref <adapter_options>

transcriber: !apply:speechbrain_blspkd.inference.export.build_transcriber
    - !ref <transcriber_source>
    - !ref <transcriber_options>

model: !apply:speechbrain_blspkd.inference.export.build_model
    class_path: !ref <model_class>
    llm: !apply:speechbrain_blspkd.inference.export.resolve_source
        - !ref <llm_source>
    adapter: !ref <adapter>
    encoder: !ref <encoder>
    transcriber: !ref <transcriber>
    system_prompt: !apply:operator.getitem [!ref <prompts>, system_prompt]
    instruction: !apply:operator.getitem [!ref <prompts>, instruction]
    audio_instruction: !apply:operator.getitem
        - !ref <prompts>
        - audio_instruction
    transcript_separator: !apply:operator.getitem
        - !ref <prompts>
        - transcript_separator
    plora: !ref <plora>
    llm_dtype: !ref <llm_dtype>
    snap_speech: !ref <snap_speech>

modules:
    model: !ref <model>

weights: !new:speechbrain_blspkd.models.trainable.TrainableWeights
    - !ref <model>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <weights>
"""


def build_encoder(source, encoder_class=None, encoder_options=None, **options):
    """The speech encoder of an exported model, or None without one.

    Arguments
    ---------
    source : str or None
        Asset name or Whisper folder of a pretrained encoder.
    encoder_class : str, optional
        With ``source`` None: the dotted class of an encoder built from
        its constructor arguments alone (no pretrained weights; e.g.
        :class:`~speechbrain_blspkd.nnet.whisper_encoder.WhisperLogMel`).
    encoder_options : dict, optional
        That class's constructor arguments (its ``export_hparams()``).
    **options
        ``freeze``, ``dynamic_length``, ``mask_padding``, ``dtype`` of
        :class:`~speechbrain_blspkd.nnet.whisper_encoder.WhisperEncoder`
        (ignored without ``source``).

    Returns
    -------
    torch.nn.Module or None

    Example
    -------
    >>> build_encoder(None) is None
    True
    >>> build_encoder(None, "speechbrain_blspkd.nnet.whisper_encoder."
    ...     "WhisperLogMel", {"n_mels": 80}).n_mels
    80
    """
    if source is not None and encoder_class is not None:
        raise ValueError(
            "build_encoder: give encoder_source (a pretrained encoder) or "
            f"encoder_class, not both (got {source!r} and {encoder_class!r})"
        )
    if source is None:
        if encoder_class is None:
            return None
        cls = _import_class(encoder_class, "encoder_class")
        return cls(**dict(encoder_options or {}))
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

    return WhisperEncoder(resolve_source(source), **options)


def build_transcriber(source, options):
    """The recogniser of an exported cascade, or None.

    Example
    -------
    >>> build_transcriber(None, {}) is None
    True
    """
    if source is None:
        return None
    from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber

    return WhisperTranscriber(resolve_source(source), **dict(options or {}))


def build_model(class_path, transcriber=None, **kwargs):
    """The exported model from its class path and parts.

    Arguments
    ---------
    class_path : str
        A :class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel`
        (sub)class.
    transcriber : WhisperTranscriber, optional
        For the cascade (passed only when given).
    **kwargs
        The constructor arguments (``adapter``/``encoder``/``plora`` None
        are dropped for the cascade, which takes none of them).

    Returns
    -------
    SpeechLLMModel
    """
    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel

    cls = _import_class(class_path, "model_class")
    if not issubclass(cls, SpeechLLMModel):
        raise TypeError(f"model_class {class_path} is not a SpeechLLMModel")
    if transcriber is not None:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if not kwargs.get("snap_speech"):  # no speech embeddings to snap
            kwargs.pop("snap_speech", None)
        return cls(kwargs.pop("llm"), transcriber, **kwargs)
    return cls(**kwargs)


def _import_class(class_path, what):
    import importlib

    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what} {class_path!r}: {err}") from err
    if not isinstance(cls, type):
        raise TypeError(f"{what} {class_path} is not a class")
    return cls


def build_adapter(class_path, options):
    """An adapter from its dotted class path and constructor arguments.

    Arguments
    ---------
    class_path : str
        E.g. ``"speechbrain_blspkd.nnet.cformer.CFormer"``; the class must
        be a :class:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter`.
    options : dict
        Constructor arguments (what ``export_hparams()`` returned).

    Returns
    -------
    speechbrain_blspkd.nnet.adapter.SpeechAdapter

    Example
    -------
    >>> ad = build_adapter("speechbrain_blspkd.nnet.cformer.CFormer",
    ...     {"input_size": 16, "output_size": 8, "n_pre": 1, "n_post": 1,
    ...      "nhead": 2, "d_ffn": 32})
    >>> ad.output_size()
    8
    >>> build_adapter("torch.nn.Linear", {})
    Traceback (most recent call last):
    ...
    TypeError: adapter_class torch.nn.Linear is not a SpeechAdapter
    """
    from speechbrain_blspkd.nnet.adapter import SpeechAdapter

    if class_path is None:
        return None
    cls = _import_class(class_path, "adapter_class")
    if not issubclass(cls, SpeechAdapter):
        raise TypeError(f"adapter_class {class_path} is not a SpeechAdapter")
    return cls(**dict(options or {}))


def render_hparams(config=None):
    """The text of ``hyperparams.yaml``: the values, then :data:`WIRING`.

    Arguments
    ---------
    config : dict, optional
        Values overriding :data:`DEFAULT_CONFIG` (unknown keys are an
        error).

    Returns
    -------
    str

    Example
    -------
    >>> from hyperpyyaml import load_hyperpyyaml
    >>> text = render_hparams({"adapter_options": {"n_post": 2}})
    >>> "n_post: 2" in text and "pretrainer: !new:" in text
    True
    >>> render_hparams({"n_posts": 2})
    Traceback (most recent call last):
    ...
    ValueError: render_hparams: unknown key(s) n_posts; known: model_class, ...
    """
    config = merge_config(DEFAULT_CONFIG, config or {}, "render_hparams")
    lines = [
        "# ############################################################",
        "# Speech LLM inference hyperparameters",
        "# Generated by speechbrain_blspkd.inference.export.render_hparams;",
        "# load with speechbrain_blspkd.inference.SpeechLLM.from_hparams.",
        "# ############################################################",
    ]
    for comment, values in CONFIG_SECTIONS:
        lines.append("")
        lines += [f"# {line}" for line in textwrap.wrap(comment, 76)]
        for key in values:
            value = config[key]
            if isinstance(value, pathlib.PurePath):
                value = str(value)
            lines.append(
                yaml.safe_dump(
                    {key: value},
                    sort_keys=False,
                    default_flow_style=False,
                    allow_unicode=True,
                    width=78,
                ).rstrip("\n")
            )
    return "\n".join(lines) + "\n\n" + WIRING


def export_model(model, folder, config=None, overwrite=False):
    """Write ``model`` as an inference folder, atomically.

    The folder is built beside its destination under a hidden temporary
    name and renamed into place only when complete, so an interrupted
    export never leaves a folder that looks complete.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The trained model (its encoder is required).
    folder : str or pathlib.Path
        The destination.
    config : dict, optional
        ``hyperparams.yaml`` values (keys of :data:`DEFAULT_CONFIG`) that
        override those read off the model (:func:`config_from_model`):
        typically ``llm_source`` / ``encoder_source`` as asset names, the
        generation defaults and ``prompts`` (a dict merged key by key).
    overwrite : bool
        Replace an existing folder (otherwise ``FileExistsError``).

    Returns
    -------
    pathlib.Path
        The folder, complete in its final place.

    Example
    -------
    >>> import tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> from speechbrain_blspkd.testing import tiny_saved_speech_llm
    >>> model = tiny_saved_speech_llm(tmp)
    >>> folder = export_model(model, tmp / "exported")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'export.json', 'hyperparams.yaml', 'model.ckpt']
    """
    from speechbrain_blspkd.models.trainable import TrainableWeights
    from speechbrain_blspkd.version import __version__

    folder = pathlib.Path(folder)
    values = merge_config(
        config_from_model(model), config or {}, "export_model"
    )
    needed = ["llm_source"]
    if model.encoder is not None:
        if not values.get("encoder_class"):
            needed.append("encoder_source")
        elif values.get("encoder_source"):
            raise ValueError(
                "export_model: the model's encoder is built from its "
                f"arguments ({values['encoder_class']}); drop "
                f"encoder_source {values['encoder_source']!r}"
            )
    if getattr(model, "transcriber", None) is not None:
        needed.append("transcriber_source")
    for key in needed:
        if not values.get(key):
            raise ValueError(
                f"export_model: give config[{key!r}] (an asset name or a "
                "folder); it cannot be read off the model"
            )
    for key in needed:
        if isinstance(values[key], pathlib.PurePath) or os.sep in str(
            values[key]
        ):
            values[key] = str(pathlib.Path(values[key]).expanduser().resolve())
    text = render_hparams(values)
    if folder.exists() and not overwrite:
        raise FileExistsError(
            f"export_model: {folder} exists (pass overwrite=True)"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{folder.name}.part-", dir=folder.parent)
    )
    try:
        (tmp / HPARAMS_FILE).write_text(text, encoding="utf-8")
        TrainableWeights(model).save(tmp / WEIGHTS_FILE)
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "speechbrain_blspkd_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "what": "speech LLM: learned weights (adapter, PLoRA, "
            "unfrozen encoder) + hyperparameters; bases by reference",
            "files": {
                name: {
                    "sha256": file_sha256(tmp / name),
                    "bytes": (tmp / name).stat().st_size,
                }
                for name in (HPARAMS_FILE, WEIGHTS_FILE)
            },
            "config": values,
        }
        (tmp / INFO_FILE).write_text(
            json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8"
        )
        _write_card(tmp, values, folder)
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = pathlib.Path(
                tempfile.mkdtemp(
                    prefix=f".{folder.name}.old-", dir=folder.parent
                )
            )
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_card(tmp, values, folder):
    """The model card (``README.md``, :mod:`.model_card`); a failure to
    write it is logged and never stops an export."""
    import logging

    from speechbrain_blspkd.inference.model_card import write_model_card

    try:
        write_model_card(tmp, values, destination=folder)
    except Exception as err:  # the card is documentation, not the model
        logging.getLogger(__name__).warning(
            "export_model: no model card written (%s)", err
        )


def main(argv=None):
    """Write ``render_hparams(DEFAULT_CONFIG)`` to a file (the template).

    Arguments
    ---------
    argv : list of str, optional
        ``[PATH]`` (default ``hparams/speech_llm.yaml``).

    Returns
    -------
    int

    Example
    -------
    >>> import tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "speech_llm.yaml"
    >>> main([str(path)])
    0
    >>> path.read_text() == render_hparams()
    True
    """
    import sys

    from speechbrain_blspkd.utils.atomic import atomic_write_text

    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "hparams/speech_llm.yaml"
    atomic_write_text(path, render_hparams())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
