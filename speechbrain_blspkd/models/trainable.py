"""What a BLSP-KD model learns, saved and loaded without the frozen bases.

The encoder and the LLM are pretrained assets referenced by name; a trained
model is only its adapter, its PLoRA weights and, when the encoder was
unfrozen, the encoder.  :class:`TrainableWeights` wraps a
:class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel` and registers
speechbrain checkpoint hooks, so the same small file is what the recipe's
``Checkpointer`` saves every epoch and what
:class:`~speechbrain_blspkd.inference.SpeechLLM` loads through its
``Pretrainer``.
"""

import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    mark_as_transfer,
    register_checkpoint_hooks,
)

from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.utils.atomic import atomic_path


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model it is loaded into."""


def trainable_state_dict(model):
    """The learned weights of ``model`` as a flat dict of tensors.

    Arguments
    ---------
    model : SpeechLLMModel
        The model.

    Returns
    -------
    dict
        ``adapter.*`` (CFormer), ``plora.*`` (PLoRA A/B matrices) and
        ``encoder.*`` when the encoder is trainable.

    Example
    -------
    >>> from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    >>> sd = trainable_state_dict(SpeechLLMModel.tiny_for_tests())
    >>> sorted({k.split(".")[0] for k in sd})
    ['adapter', 'plora']
    """
    out = {f"adapter.{k}": v for k, v in model.adapter.state_dict().items()}
    if model.has_plora:
        sd = plora_lib.plora_state_dict(model.llm)
        out.update({f"plora.{k}": v for k, v in sd.items()})
    enc = model.encoder
    if enc is not None and not getattr(enc, "freeze", True):
        out.update({f"encoder.{k}": v for k, v in enc.state_dict().items()})
    return {k: v.detach().cpu() for k, v in out.items()}


def load_trainable_state_dict(model, state, source="state dict"):
    """Load what :func:`trainable_state_dict` returned into ``model``.

    Raises :class:`WeightsMismatchError` naming ``source`` when a part is
    missing, unexpected or of the wrong shape.
    """
    parts = {"adapter": {}, "plora": {}, "encoder": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise WeightsMismatchError(f"{source}: unexpected key {key!r}")
        parts[head][rest] = value
    try:
        model.adapter.load_state_dict(parts["adapter"], strict=True)
    except RuntimeError as e:
        raise WeightsMismatchError(
            f"{source}: adapter weights do not fit the configured CFormer "
            f"(check the hyperparameters): {e}"
        ) from None
    if model.has_plora:
        if not parts["plora"]:
            raise WeightsMismatchError(f"{source}: no PLoRA weights")
        try:
            plora_lib.load_plora_state_dict(model.llm, parts["plora"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise WeightsMismatchError(
                f"{source}: PLoRA weights: {e}"
            ) from None
    elif parts["plora"]:
        raise WeightsMismatchError(
            f"{source}: holds PLoRA weights but the model has no PLoRA"
        )
    if parts["encoder"]:
        try:
            model.encoder.load_state_dict(parts["encoder"], strict=True)
        except RuntimeError as e:
            raise WeightsMismatchError(
                f"{source}: encoder weights: {e}"
            ) from None


@register_checkpoint_hooks
class TrainableWeights:
    """Checkpoint hooks for the learned part of a model.

    Arguments
    ---------
    model : SpeechLLMModel
        The model whose adapter / PLoRA / unfrozen encoder are saved.

    Example
    -------
    >>> import tempfile, pathlib
    >>> from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    >>> model = SpeechLLMModel.tiny_for_tests()
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.ckpt"
    >>> TrainableWeights(model).save(path)
    >>> TrainableWeights(model).load(path)
    """

    def __init__(self, model):
        self.model = model

    @mark_as_saver
    def save(self, path):
        """Write the learned weights to ``path`` atomically."""
        with atomic_path(path) as tmp:
            torch.save(trainable_state_dict(self.model), tmp)

    @mark_as_loader
    def load(self, path, end_of_epoch=None):
        """Load learned weights from ``path``."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsMismatchError(
                f"{path}: weights file not found"
            ) from None
        except Exception as e:
            raise WeightsMismatchError(
                f"{path}: cannot read weights ({e})"
            ) from None
        load_trainable_state_dict(self.model, state, source=str(path))

    @mark_as_transfer
    def transfer(self, path):
        """Pretrainer hook: same as :meth:`load`."""
        self.load(path)
