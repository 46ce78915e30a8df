"""The shared manifest schema: one writer, one reader, clear errors."""

import pytest

from speechbrain_blspkd.dataio.manifest import (
    COLUMNS,
    ManifestError,
    manifest_to_dataset,
    read_manifest,
    write_manifest,
)


def _row(uid="u1", **kw):
    row = dict(
        ID=uid,
        wav=f"$data_root/{uid}.wav",
        duration=1.25,
        transcript="hello there",
        language="en",
        speaker="spk1",
    )
    row.update(kw)
    return row


def test_round_trip_fills_optional_columns(tmp_path):
    path = tmp_path / "m.csv"
    write_manifest(
        path, [_row("a", truncated=True), _row("b", translation="hola")]
    )
    rows = read_manifest(path, data_root="/data")
    assert [r["ID"] for r in rows] == ["a", "b"]
    assert rows[0]["wav"] == "/data/a.wav"
    assert rows[0]["truncated"] == "1"
    assert rows[1]["translation"] == "hola"
    assert rows[0]["duration"] == pytest.approx(1.25)
    assert set(COLUMNS) <= set(rows[0])
    header = path.read_text().splitlines()[0].split(",")
    assert tuple(header) == COLUMNS


def test_writer_refuses_duplicates_and_unknown_columns(tmp_path):
    with pytest.raises(ManifestError, match="duplicate ID 'a'"):
        write_manifest(tmp_path / "m.csv", [_row("a"), _row("a")])
    with pytest.raises(ManifestError, match="unknown column"):
        write_manifest(tmp_path / "m.csv", [_row("a", foo=1)])
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("ID,wav,duration\nx,y,1\n", "missing required column"),
        (
            "ID,wav,duration,transcript,language,speaker\n"
            "a,w,1,hi,en,s\na,w,1,hi,en,s\n",
            "row 2 .*duplicate ID 'a'",
        ),
        (
            "ID,wav,duration,transcript,language,speaker\na,w,1,  ,en,s\n",
            "row 1 .*empty or whitespace transcript",
        ),
        (
            "ID,wav,duration,transcript,language,speaker\na,w,abc,hi,en,s\n",
            "duration 'abc' is not a number",
        ),
        (
            "ID,wav,duration,transcript,language,speaker\na,w,0,hi,en,s\n",
            "duration must be > 0",
        ),
    ],
)
def test_reader_errors_name_file_and_row(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(path)
    assert "bad.csv" in str(err.value)


def test_reader_rejects_non_utf8_with_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        b"ID,wav,duration,transcript,language,speaker\n"
        b"a,w,1,hi,en,s\nb,w,1,caf\xe9,fr,s\n"
    )
    with pytest.raises(ManifestError, match="line 3: not valid UTF-8"):
        read_manifest(path)


def test_dataset_replaces_data_root(tmp_path):
    path = tmp_path / "m.csv"
    write_manifest(path, [_row("a"), _row("b")])
    ds = manifest_to_dataset(path, "/root", ["id", "wav", "duration"])
    assert [d["wav"] for d in ds] == ["/root/a.wav", "/root/b.wav"]
    assert ds[1]["duration"] == pytest.approx(1.25)
