"""GGUF language model -> de-quantised transformers folder.

transformers reads GGUF files itself (``from_pretrained(folder,
gguf_file=...)``, needs the ``gguf`` package) and de-quantises the weights;
this module saves the result as a standard folder (``config.json``,
``model.safetensors``, tokenizer files with the chat template,
``generation_config.json``) that later loads without the GGUF file.
"""

import pathlib


def _gguf_chat_template(gguf_path):
    """Read ``tokenizer.chat_template`` from the GGUF metadata (or None)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(gguf_path, out_dir, dtype=None):
    """Convert a GGUF causal LM to a transformers folder.

    Arguments
    ---------
    gguf_path : str or pathlib.Path
        The ``.gguf`` file.
    out_dir : str or pathlib.Path
        Destination folder (written in place; the caller handles atomicity).
    dtype : torch.dtype, optional
        Dtype of the saved weights (default float32).

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = pathlib.Path(gguf_path)
    out_dir = pathlib.Path(out_dir)
    dtype = dtype or torch.float32
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        template = _gguf_chat_template(gguf_path)
        if template:
            tokenizer.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype
    )
    # The weights are already plain floats: forget the GGUF quantizer.
    model.hf_quantizer = None
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    gen = model.generation_config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None:
            setattr(gen, key, getattr(tokenizer, key, None))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
