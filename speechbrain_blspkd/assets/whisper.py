"""Whisper weights: CTranslate2 layout <-> transformers layout.

CTranslate2 fuses the attention projections (self-attention ``q,k,v`` in
``linear_0``; cross-attention ``k,v`` in ``linear_1``) and names modules by
position.  :func:`ct2_to_hf` splits them back into the state dict of a
``transformers.WhisperForConditionalGeneration`` and derives its config;
:func:`hf_to_ct2` is the inverse (used to test the conversion and to build
synthetic files).  :func:`convert_whisper` writes a complete transformers
folder (model, processor, generation config) from a CTranslate2 package.
"""

import contextlib
import json
import pathlib
import re

import torch

from speechbrain_blspkd.assets.ctranslate2 import (
    CT2FormatError,
    CT2Model,
    dequantize,
)

# (CT2 suffix, HF suffix) for every Linear / LayerNorm that maps one to one.
_ENCODER_LAYER = [
    ("self_attention/linear_1", "self_attn.out_proj"),
    ("self_attention/layer_norm", "self_attn_layer_norm"),
    ("ffn/linear_0", "fc1"),
    ("ffn/linear_1", "fc2"),
    ("ffn/layer_norm", "final_layer_norm"),
]
_DECODER_LAYER = _ENCODER_LAYER + [
    ("attention/linear_0", "encoder_attn.q_proj"),
    ("attention/linear_2", "encoder_attn.out_proj"),
    ("attention/layer_norm", "encoder_attn_layer_norm"),
]
_TOP = [
    ("encoder/conv1", "model.encoder.conv1"),
    ("encoder/conv2", "model.encoder.conv2"),
    ("encoder/layer_norm", "model.encoder.layer_norm"),
    ("decoder/layer_norm", "model.decoder.layer_norm"),
]
_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_HF_PARAM = {"weight": "weight", "bias": "bias"}


def _count_layers(names, prefix):
    pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    if found != set(range(len(found))):
        raise CT2FormatError(f"non-contiguous {prefix} layer indices {found}")
    return len(found)


def ct2_to_hf(model, dtype=torch.float32):
    """Convert a CTranslate2 Whisper model to a transformers state dict.

    Arguments
    ---------
    model : CT2Model
        A ``WhisperSpec`` model (see :func:`read_ct2`).
    dtype : torch.dtype
        Dtype of the returned weights.

    Returns
    -------
    config : dict
        ``WhisperConfig`` keyword arguments for the architecture (sizes).
    state_dict : dict
        ``WhisperForConditionalGeneration`` state dict (``proj_out`` tied
        to the token embeddings, so it is not included).

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_whisper_model
    >>> config, sd = ct2_to_hf(hf_to_ct2(tiny_whisper_model()))
    >>> config["d_model"], config["decoder_layers"]
    (16, 1)
    """
    names = list(model.variables) + list(model.aliases)
    weights = dequantize(model, dtype)

    def get(name):
        if name in weights:
            return weights[name]
        if name in model.aliases:
            return get(model.aliases[name])
        raise CT2FormatError(f"CTranslate2 Whisper model lacks {name!r}")

    def module(ct2, hf, out):
        for ct2_param, hf_param in _PARAM.items():
            name = f"{ct2}/{ct2_param}"
            if name in weights or name in model.aliases:
                out[f"{hf}.{hf_param}"] = get(name)

    sd = {}
    n_enc = _count_layers(names, "encoder")
    n_dec = _count_layers(names, "decoder")
    for ct2, hf in _TOP:
        module(ct2, hf, sd)
    for i in range(n_enc):
        for ct2, hf in _ENCODER_LAYER:
            module(
                f"encoder/layer_{i}/{ct2}", f"model.encoder.layers.{i}.{hf}", sd
            )
        _split_qkv(get, f"encoder/layer_{i}", f"model.encoder.layers.{i}", sd)
    for i in range(n_dec):
        for ct2, hf in _DECODER_LAYER:
            module(
                f"decoder/layer_{i}/{ct2}", f"model.decoder.layers.{i}.{hf}", sd
            )
        _split_qkv(get, f"decoder/layer_{i}", f"model.decoder.layers.{i}", sd)
        prefix = f"model.decoder.layers.{i}.encoder_attn"
        kv_w = get(f"decoder/layer_{i}/attention/linear_1/weight")
        kv_b = get(f"decoder/layer_{i}/attention/linear_1/bias")
        k_w, v_w = kv_w.chunk(2, dim=0)
        sd[f"{prefix}.k_proj.weight"] = k_w
        sd[f"{prefix}.v_proj.weight"] = v_w
        sd[f"{prefix}.v_proj.bias"] = kv_b.chunk(2)[1]
    sd["model.encoder.embed_positions.weight"] = get(
        "encoder/position_encodings/encodings"
    )
    sd["model.decoder.embed_positions.weight"] = get(
        "decoder/position_encodings/encodings"
    )
    embed = get("decoder/embeddings/weight")
    sd["model.decoder.embed_tokens.weight"] = embed
    conv1 = sd["model.encoder.conv1.weight"]
    fc1 = sd["model.encoder.layers.0.fc1.weight"] if n_enc else None
    config = {
        "vocab_size": embed.shape[0],
        "d_model": embed.shape[1],
        "num_mel_bins": conv1.shape[1],
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": _scalar(weights, "encoder/num_heads", 8),
        "decoder_attention_heads": _scalar(weights, "decoder/num_heads", 8),
        "encoder_ffn_dim": fc1.shape[0]
        if fc1 is not None
        else 4 * embed.shape[1],
        "decoder_ffn_dim": sd["model.decoder.layers.0.fc1.weight"].shape[0]
        if n_dec
        else 4 * embed.shape[1],
        "max_source_positions": sd[
            "model.encoder.embed_positions.weight"
        ].shape[0],
        "max_target_positions": sd[
            "model.decoder.embed_positions.weight"
        ].shape[0],
    }
    return config, sd


def _scalar(weights, name, default):
    if name not in weights:
        return default
    return int(weights[name].reshape(-1)[0])


def _split_qkv(get, ct2, hf, sd):
    w = get(f"{ct2}/self_attention/linear_0/weight")
    b = get(f"{ct2}/self_attention/linear_0/bias")
    if w.shape[0] % 3:
        raise CT2FormatError(
            f"{ct2}/self_attention/linear_0/weight has {w.shape[0]} rows, "
            "not a multiple of 3 (fused q,k,v)"
        )
    q_w, k_w, v_w = w.chunk(3, dim=0)
    q_b, _, v_b = b.chunk(3)
    sd[f"{hf}.self_attn.q_proj.weight"] = q_w
    sd[f"{hf}.self_attn.q_proj.bias"] = q_b
    sd[f"{hf}.self_attn.k_proj.weight"] = k_w
    sd[f"{hf}.self_attn.v_proj.weight"] = v_w
    sd[f"{hf}.self_attn.v_proj.bias"] = v_b


def hf_to_ct2(hf_model, dtype=None):
    """Convert a ``WhisperForConditionalGeneration`` to a CTranslate2 model.

    Arguments
    ---------
    hf_model : transformers.WhisperForConditionalGeneration
    dtype : torch.dtype, optional
        Dtype of the stored weights (default: keep the model's).

    Returns
    -------
    CT2Model

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_whisper_model
    >>> m = hf_to_ct2(tiny_whisper_model())
    >>> tuple(m.get("encoder/layer_0/self_attention/linear_0/weight").shape)
    (48, 16)
    """
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    cfg = hf_model.config
    out = {}

    def module(ct2, hf, layer_norm=False):
        names = ("gamma", "beta") if layer_norm else ("weight", "bias")
        for ct2_param, hf_param in zip(names, ("weight", "bias")):
            key = f"{hf}.{hf_param}"
            if key in sd:
                out[f"{ct2}/{ct2_param}"] = sd[key]

    def flag(name, value, dtype=torch.int8):
        out[name] = torch.tensor(value, dtype=dtype)

    for ct2, hf in _TOP:
        module(ct2, hf, ct2.endswith("layer_norm"))
    for side, n_layers, table in (
        ("encoder", cfg.encoder_layers, _ENCODER_LAYER),
        ("decoder", cfg.decoder_layers, _DECODER_LAYER),
    ):
        for i in range(n_layers):
            hf_prefix = f"model.{side}.layers.{i}"
            ct2_prefix = f"{side}/layer_{i}"
            q = f"{hf_prefix}.self_attn"
            out[f"{ct2_prefix}/self_attention/linear_0/weight"] = torch.cat(
                [sd[f"{q}.{p}_proj.weight"] for p in "qkv"]
            )
            bias_q = sd[f"{q}.q_proj.bias"]
            out[f"{ct2_prefix}/self_attention/linear_0/bias"] = torch.cat(
                [bias_q, torch.zeros_like(bias_q), sd[f"{q}.v_proj.bias"]]
            )
            for ct2, hf in table:
                module(
                    f"{ct2_prefix}/{ct2}",
                    f"{hf_prefix}.{hf}",
                    ct2.endswith("layer_norm"),
                )
            if side == "decoder":
                x = f"{hf_prefix}.encoder_attn"
                out[f"{ct2_prefix}/attention/linear_1/weight"] = torch.cat(
                    [sd[f"{x}.k_proj.weight"], sd[f"{x}.v_proj.weight"]]
                )
                bias_v = sd[f"{x}.v_proj.bias"]
                out[f"{ct2_prefix}/attention/linear_1/bias"] = torch.cat(
                    [torch.zeros_like(bias_v), bias_v]
                )
    out["encoder/position_encodings/encodings"] = sd[
        "model.encoder.embed_positions.weight"
    ]
    out["decoder/position_encodings/encodings"] = sd[
        "model.decoder.embed_positions.weight"
    ]
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    flag("encoder/num_heads", cfg.encoder_attention_heads, torch.int16)
    flag("decoder/num_heads", cfg.decoder_attention_heads, torch.int16)
    flag("decoder/activation", 3)
    flag("decoder/pre_norm", 1)
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    return CT2Model(dict(sorted(out.items())), aliases, "WhisperSpec", 3, 6)


def _special_ids(vocab):
    """Find Whisper's special token ids in a ``token -> id`` mapping."""
    ids = {}
    for key in (
        "endoftext",
        "startoftranscript",
        "translate",
        "transcribe",
        "startoflm",
        "startofprev",
        "notimestamps",
    ):
        token = f"<|{key}|>"
        if token not in vocab:
            raise CT2FormatError(f"Whisper vocabulary lacks {token}")
        ids[key] = vocab[token]
    sot, translate = ids["startoftranscript"], ids["translate"]
    langs = {t: i for t, i in vocab.items() if sot < i < translate}
    ids["languages"] = dict(sorted(langs.items(), key=lambda kv: kv[1]))
    return ids


def whisper_generation_config(vocab, ct2_config, multilingual, max_length):
    """Build the content of ``generation_config.json`` for Whisper.

    Arguments
    ---------
    vocab : dict
        ``token -> id`` for the special tokens (at least).
    ct2_config : dict
        The CTranslate2 ``config.json`` (``suppress_ids``,
        ``suppress_ids_begin``, ``alignment_heads``), may be empty.
    multilingual : bool
        Whether the model handles several languages (adds ``lang_to_id``
        and ``task_to_id``).
    max_length : int
        Longest decoder sequence.

    Returns
    -------
    dict

    Example
    -------
    >>> v = {"<|endoftext|>": 5, "<|startoftranscript|>": 6, "<|en|>": 7,
    ...      "<|translate|>": 8, "<|transcribe|>": 9, "<|startoflm|>": 10,
    ...      "<|startofprev|>": 11, "<|nospeech|>": 12, "<|notimestamps|>": 13}
    >>> g = whisper_generation_config(v, {}, True, 448)
    >>> g["lang_to_id"], g["task_to_id"]["transcribe"], g["no_timestamps_token_id"]
    ({'<|en|>': 7}, 9, 13)
    """
    ids = _special_ids(vocab)
    eot = ids["endoftext"]
    gen = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": ids["startoftranscript"],
        "max_length": max_length,
        "no_timestamps_token_id": ids["notimestamps"],
        "prev_sot_token_id": ids["startofprev"],
        "is_multilingual": bool(multilingual),
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "begin_suppress_tokens": list(
            ct2_config.get("suppress_ids_begin", [220, eot])
        ),
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
    }
    if ct2_config.get("alignment_heads"):
        gen["alignment_heads"] = [
            list(h) for h in ct2_config["alignment_heads"]
        ]
    if multilingual:
        gen["lang_to_id"] = ids["languages"]
        gen["task_to_id"] = {
            "transcribe": ids["transcribe"],
            "translate": ids["translate"],
        }
    return gen


def convert_whisper(model, package_dir, out_dir, multilingual):
    """Write a transformers Whisper folder from a CTranslate2 package.

    Arguments
    ---------
    model : CT2Model
        The parsed ``model.bin``.
    package_dir : str or pathlib.Path
        Folder with the CTranslate2 ``config.json`` and ``tokenizer.json``.
    out_dir : str or pathlib.Path
        Destination folder (written in place; the caller handles atomicity).
    multilingual : bool
        Whether the model is multilingual.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    package_dir = pathlib.Path(package_dir)
    out_dir = pathlib.Path(out_dir)
    cfg_path = package_dir / "config.json"
    ct2_config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    tok_json = json.loads((package_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    arch, sd = ct2_to_hf(model)
    gen = whisper_generation_config(
        specials, ct2_config, multilingual, arch["max_target_positions"]
    )
    config = WhisperConfig(
        **arch,
        activation_function="gelu",
        bos_token_id=gen["bos_token_id"],
        eos_token_id=gen["eos_token_id"],
        pad_token_id=gen["pad_token_id"],
        decoder_start_token_id=gen["decoder_start_token_id"],
        tie_word_embeddings=True,
    )
    # Generation settings live in generation_config.json only.
    config.suppress_tokens = None
    config.begin_suppress_tokens = None
    try:  # every weight is overwritten below: skip the random init
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        hf = WhisperForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise CT2FormatError(
            f"Whisper conversion mismatch: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    hf.tie_weights()
    hf.generation_config = GenerationConfig(**gen)
    hf.save_pretrained(out_dir)

    eot = "<|endoftext|>"
    extra = [t for t in specials if t != eot]
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(package_dir / "tokenizer.json"),
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        extra_special_tokens=extra,
    )
    feature_extractor = WhisperFeatureExtractor(
        feature_size=arch["num_mel_bins"]
    )
    processor = WhisperProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer
    )
    processor.save_pretrained(out_dir)
    return out_dir
