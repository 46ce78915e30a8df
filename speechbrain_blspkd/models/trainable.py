"""What a BLSP-KD model learns, saved and loaded without the frozen bases.

The encoder and the LLM are pretrained assets referenced by name; a trained
model is only its adapter, its PLoRA weights and, when the encoder was
unfrozen, the encoder.  :class:`TrainableWeights` wraps a
:class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel` and registers
speechbrain checkpoint hooks, so the same small file is what the recipe's
``Checkpointer`` saves every epoch and what
:class:`~speechbrain_blspkd.inference.SpeechLLM` loads through its
``Pretrainer``.

Under sharded data parallelism (``distributed_strategy: fsdp``, see
:mod:`speechbrain_blspkd.utils.sharding`) the PLoRA matrices are split
across processes: saving gathers them into full tensors (every process takes
part; the main process writes) and loading keeps each process's shard, so
the file has one format whatever the run's layout, and a checkpoint written
by a sharded run resumes in one process and the other way round.
"""

import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    mark_as_transfer,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import if_main_process

from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.utils import sharding
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
        ``adapter.*`` (the speech adapter, if any), ``plora.*`` (PLoRA A/B matrices) and
        ``encoder.*`` when the encoder is trainable; full tensors on CPU.
        A sharded model's PLoRA matrices are all-gathered: every process of
        the group must call this (in the same order).

    Example
    -------
    >>> from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> sd = trainable_state_dict(tiny_speech_llm())
    >>> sorted({k.split(".")[0] for k in sd})
    ['adapter', 'plora']
    """
    out = {}
    if model.adapter is not None:
        out.update(
            {f"adapter.{k}": v for k, v in model.adapter.state_dict().items()}
        )
    if model.has_plora:
        sd = plora_lib.plora_state_dict(model.llm)
        out.update({f"plora.{k}": v for k, v in sd.items()})
    enc = model.encoder
    if enc is not None and not getattr(enc, "freeze", True):
        out.update({f"encoder.{k}": v for k, v in enc.state_dict().items()})
    return sharding.full_state(out)


def load_trainable_state_dict(model, state, source="state dict"):
    """Load what :func:`trainable_state_dict` returned into ``model``.

    Raises :class:`WeightsMismatchError` naming ``source`` when a part is
    missing, unexpected or of the wrong shape.  Into a sharded model each
    process loads its shard of the full tensors of ``state``.
    """
    parts = {"adapter": {}, "plora": {}, "encoder": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise WeightsMismatchError(f"{source}: unexpected key {key!r}")
        parts[head][rest] = value
    if model.adapter is None:
        if parts["adapter"]:
            raise WeightsMismatchError(
                f"{source}: holds adapter weights but the model has no adapter"
            )
    else:
        try:
            model.adapter.load_state_dict(parts["adapter"], strict=True)
        except RuntimeError as e:
            name = type(model.adapter).__name__
            raise WeightsMismatchError(
                f"{source}: adapter weights do not fit the configured {name} "
                f"(check the hyperparameters): {e}"
            ) from None
    if model.has_plora:
        if not parts["plora"]:
            raise WeightsMismatchError(f"{source}: no PLoRA weights")
        try:
            plora_lib.load_plora_state_dict(
                model.llm, _like_params(model.llm, parts["plora"])
            )
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


def _like_params(llm, plora_state):
    """PLoRA values laid out like the model's (sharded) matrices."""
    own = {
        f"{name}.{w}": getattr(m, w)
        for name, m in plora_lib._wrapped(llm)
        for w in ("lora_A", "lora_B")
    }
    if not any(sharding.is_dtensor(p) for p in own.values()):
        return plora_state
    return {
        k: sharding.sharded_like(v.to(own[k].dtype), own[k])
        if k in own and tuple(v.shape) == tuple(own[k].shape)
        else v
        for k, v in plora_state.items()
    }


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
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm()
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.ckpt"
    >>> TrainableWeights(model).save(path)
    >>> TrainableWeights(model).load(path)
    """

    def __init__(self, model):
        self.model = model

    @mark_as_saver
    def save(self, path):
        """Write the learned weights to ``path`` atomically.

        Runs on every process of a distributed run (the checkpointer calls
        it everywhere): a sharded model is gathered, then the main process
        writes.
        """
        state = trainable_state_dict(self.model)
        if not if_main_process():
            return
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

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


# Saving gathers sharded weights, a collective: the checkpointer must call
# the saver on every process (it writes on the main one only).
register_checkpoint_hooks(TrainableWeights, save_on_main_only=False)
