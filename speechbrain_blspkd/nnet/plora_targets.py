"""The linear layers PLoRA wraps by default, importable without torch.

:data:`DEFAULT_TARGETS` is the default ``target_modules`` of
:func:`speechbrain_blspkd.nnet.plora.apply_plora` and of the ``plora``
section of an exported model folder's ``hyperparams.yaml``
(:data:`speechbrain_blspkd.inference.model_folder.DEFAULT_CONFIG`). It sits
outside the ``plora`` package, whose ``__init__`` imports torch, so the
light model-folder module can read it.

Example
-------
>>> "q_proj" in DEFAULT_TARGETS and "down_proj" in DEFAULT_TARGETS
True

Authors
 * speechbrain-blspkd contributors 2026
"""

__all__ = ["DEFAULT_TARGETS"]

#: The attention and MLP projections of a Llama-style decoder layer.
DEFAULT_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
