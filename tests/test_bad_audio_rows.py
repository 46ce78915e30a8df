"""A broken clip in a manifest stops training, feature caching and decoding
with the manifest, the row ID and the file named (not just the file)."""

import numpy as np
import pytest
import soundfile as sf
import torch
from speechbrain.utils.epoch_loop import EpochCounter

from speechbrain_blspkd.dataio.audio import AudioError
from speechbrain_blspkd.dataio.manifest import write_manifest
from speechbrain_blspkd.dataio.pipelines import dataio_prepare
from speechbrain_blspkd.stages import Stage


def _row(uid):
    return dict(
        ID=uid,
        wav=f"$data_root/{uid}.wav",
        duration=1.0,
        transcript="the cat sat",
        language="en",
        speaker="s1",
        continuation="on the mat.",
        truncated="0",
    )


@pytest.fixture
def corpus(tmp_path):
    """good.wav is fine; missing.wav does not exist; corrupt.wav is junk;
    empty.wav has no samples."""
    sf.write(tmp_path / "good.wav", np.zeros(16000, dtype="float32"), 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00junk" * 8)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    paths = {}
    for split in ("train", "kd", "valid", "test"):
        paths[split] = str(tmp_path / f"{split}.csv")
        write_manifest(
            paths[split],
            [_row(u) for u in ("good", "missing", "corrupt", "empty")],
        )
    return tmp_path, paths


BAD = {
    "missing": "audio file not found",
    "corrupt": "cannot read audio",
    "empty": "zero-length audio",
}


def test_training_pipeline_names_manifest_and_row(corpus):
    folder, paths = corpus
    hparams = dict(
        stages=[
            Stage("align", None, paths["train"], EpochCounter(1), {}, 1e-3),
            Stage("kd", None, paths["kd"], EpochCounter(1), {}, 1e-3),
        ],
        valid_csv=paths["valid"],
        test_csv=paths["test"],
        data_root=str(folder),
        sample_rate=16000,
        max_audio_seconds=30,
        sorting="ascending",
    )
    datasets = dataio_prepare(hparams)
    for split, key in (("align", "train"), ("kd", "kd"), ("test", "test")):
        ds = datasets[split]
        ids = list(ds.data_ids)
        good = ds[ids.index("good")]
        assert good["sig"].shape == (16000,)
        for uid, what in BAD.items():
            with pytest.raises(AudioError) as err:
                ds[ids.index(uid)]
            msg = str(err.value)
            assert msg.startswith(f"{paths[key]}, row '{uid}': ")
            assert f"{uid}.wav" in msg and what in msg


def test_feature_cache_build_names_manifest_and_row(corpus, tmp_path):
    from speechbrain_blspkd.dataprep.feature_cache import build_feature_cache

    folder, paths = corpus

    def encode(wavs):
        return [torch.zeros(len(w) // 320, 4) for w in wavs]

    for uid, what in BAD.items():
        manifest = folder / f"only_{uid}.csv"
        write_manifest(manifest, [_row("good"), _row(uid)])
        with pytest.raises(AudioError) as err:
            build_feature_cache(
                manifest,
                tmp_path / f"cache_{uid}",
                encode,
                "sum0",
                batch_size=1,
                data_root=str(folder),
            )
        msg = str(err.value)
        assert msg.startswith(f"{manifest}, row '{uid}': ") and what in msg


def test_decoding_names_manifest_and_row(corpus):
    from speechbrain_blspkd.dataio.manifest import read_manifest
    from speechbrain_blspkd.evaluation import speech_batch

    folder, paths = corpus
    rows = read_manifest(paths["test"], data_root=str(folder))
    speech = speech_batch(rows[:1], None, 16000, "cpu", paths["test"])
    assert speech["wavs"].shape == (1, 16000)
    for i, (uid, what) in enumerate(BAD.items(), start=1):
        with pytest.raises(AudioError) as err:
            speech_batch([rows[0], rows[i]], None, 16000, "cpu", paths["test"])
        msg = str(err.value)
        assert msg.startswith(f"{paths['test']}, row '{uid}': ") and what in msg
