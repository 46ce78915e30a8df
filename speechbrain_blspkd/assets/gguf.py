"""GGUF language model -> de-quantised transformers folder.

transformers reads GGUF files itself (``from_pretrained(folder,
gguf_file=...)``, needs the ``gguf`` package) and de-quantises the weights;
this module saves the result as a standard folder (``config.json``,
``model.safetensors``, tokenizer files with the chat template,
``generation_config.json``) that later loads without the GGUF file.

A base (not instruction-tuned) model has no chat template, and the
project's one prompt builder (:class:`speechbrain_blspkd.prompt.
PromptBuilder`) renders every prompt through one.  Such an asset gets
:data:`COMPLETION_TEMPLATE`: plain-text turns (``### Instruction:`` /
``### Response:``, each closed by a blank line) that a base model continues
as a document, with the blank line as its stop token (``stop_text``).  A
model's own turn markers (Gemma's ``<start_of_turn>``) are not used for a
base model: measured on the Gemma-3-270M base asset, they made it repeat
unrelated words, while this layout made it repeat or continue the text in
every recipe language.
"""

import pathlib

#: Chat template for base LLMs (see the module docstring).  A system
#: message is a first paragraph; every turn ends with a blank line, which
#: a base model also writes when it has finished an answer.
COMPLETION_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] ~ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '### Instruction:\\n' ~ message['content'] ~ '\\n\\n' }}"
    "{%- else -%}"
    "{{ '### Response:\\n' ~ message['content'] ~ '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)


def _gguf_chat_template(gguf_path):
    """Read ``tokenizer.chat_template`` from the GGUF metadata (or None)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(
    gguf_path, out_dir, dtype=None, chat_template=None, stop_text=None
):
    """Convert a GGUF causal LM to a transformers folder.

    Arguments
    ---------
    gguf_path : str or pathlib.Path
        The ``.gguf`` file.
    out_dir : str or pathlib.Path
        Destination folder (written in place; the caller handles atomicity).
    dtype : torch.dtype, optional
        Dtype of the saved weights (default float32).
    chat_template : str, optional
        Template for a tokenizer whose GGUF carries none (a base model):
        ``"completion"`` is :data:`COMPLETION_TEMPLATE`, any other string
        a Jinja template.
    stop_text : str, optional
        Text of one token that also ends generation (added to the
        generation config's ``eos_token_id``), e.g. the blank line that
        closes a turn of :data:`COMPLETION_TEMPLATE`.

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
        if not template and chat_template:
            template = (
                COMPLETION_TEMPLATE
                if chat_template == "completion"
                else chat_template
            )
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
    if stop_text:
        stop = tokenizer(stop_text, add_special_tokens=False).input_ids
        if len(stop) != 1:
            raise ValueError(
                f"{gguf_path}: stop text {stop_text!r} is {len(stop)} tokens, "
                "not one"
            )
        eos = gen.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
        gen.eos_token_id = list(dict.fromkeys([*eos, stop[0]]))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
