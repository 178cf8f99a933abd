"""Corrupt samples are skipped and counted; a schema error that hits every sample stops the run."""

import csv
import json

import pytest

from vlcore.train.data import DataSchemaError, expand_braces, index_tar, worker_shards
from vlcore.train.cli import main

from .helpers import TINY, clean_samples, png_bytes, write_shard

WDS = ["--data", "wds", "--wds-caption-key", "json", "--shuffle", "false", "--batch-size", "4", "--workers", "1"]


def _shards(root):
    """A truncated tar (4 good samples, then the damage) and a shard whose first two samples are corrupt (a
    truncated PNG, a caption that is not JSON), then 12 good ones: 16 good samples, 3 skips."""
    import tarfile

    truncated = write_shard(root / "part-0.tar", clean_samples(6, caption_ext="json"))
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("s00004.png")
    with open(truncated, "r+b") as f:
        f.truncate(cut.offset_data + cut.size // 2)
    bad = [("bad0", png_bytes(1)[:40], "json", b'{"caption": "a truncated image"}'),
           ("bad1", png_bytes(2), "json", b'{"caption": "no closing brace"')]
    write_shard(root / "part-1.tar", bad + clean_samples(12, start=100, caption_ext="json"))
    return str(root / "part-{0..1}.tar")


def test_each_rank_and_worker_reads_distinct_shards():
    shards = expand_braces("s-{000..010}.tar")
    parts = [worker_shards(shards, rank, 2, worker, 3) for rank in range(2) for worker in range(3)]
    assert all(parts) and sorted(sum(parts, [])) == shards  # a partition: every shard exactly once


def test_expand_braces_and_truncated_tar_index(tmp_path):
    assert expand_braces("a-{08..10}.tar::b-{x,y}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "b-x.tar", "b-y.tar"]
    pattern = _shards(tmp_path)
    samples, complete = index_tar(expand_braces(pattern)[0])
    assert not complete and [s.key for s in samples] == ["s00000", "s00001", "s00002", "s00003"]


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    pattern = _shards(tmp_path)
    # 4 steps x 4 = 16 good samples: exactly one pass over both shards in order (shuffle off).
    summary = main(TINY + WDS + ["--train-data", pattern, "--steps", "4", "--out-dir", str(tmp_path / "run")])
    assert summary["steps"] == 4
    assert summary["skipped_samples"] == 3  # the truncated tar's tail, the truncated PNG, the bad JSON


def test_wrong_caption_key_fails_fast_with_the_key(tmp_path):
    pattern = _shards(tmp_path)
    with pytest.raises(DataSchemaError, match=r"data does not match the configuration.*no caption member '\.txt' \(wds_caption_key\)"):
        main(TINY + WDS + ["--wds-caption-key", "txt", "--train-data", pattern, "--steps", "2",
                           "--out-dir", str(tmp_path / "run")])
    with pytest.raises(DataSchemaError, match=r"no field 'text' \(json_caption_field\)"):
        main(TINY + WDS + ["--json-caption-field", "text", "--train-data", pattern, "--steps", "2",
                           "--out-dir", str(tmp_path / "run2")])


def test_csv_skips_missing_images_and_empty_captions(tmp_path):
    rows = []
    for i in range(10):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
        rows.append({"filepath": f"{i}.png", "title": f"caption {i}"})
    rows[1]["filepath"] = "missing.png"
    rows[5]["title"] = " "
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    argv = TINY + ["--data", "csv", "--train-data", str(tmp_path / "data.csv"), "--shuffle", "false",
                   "--batch-size", "4", "--steps", "2", "--val-data", str(tmp_path / "data.csv")]
    summary = main(argv + ["--out-dir", str(tmp_path / "run")])
    assert summary["skipped_samples"] == 2  # rows 1 and 5, each replaced by the next row
    assert summary["eval_images"] == 8
    with pytest.raises(DataSchemaError, match=r"no column 'caption' \(csv_caption_key\); the columns are \['filepath', 'title'\]"):
        main(argv + ["--csv-caption-key", "caption", "--out-dir", str(tmp_path / "run2")])


def _member_boundaries(path):
    """Byte offsets where a tar can be cut between blocks without tarfile noticing: every header start and
    every member's padded end."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    cuts = set()
    for m in members:
        cuts.add(m.offset)
        cuts.add(m.offset_data + -(-m.size // 512) * 512)
    return sorted(cuts)


def test_tar_cut_at_a_header_or_member_boundary_is_truncated(tmp_path):
    path = write_shard(tmp_path / "s.tar", clean_samples(5))
    full, complete = index_tar(str(path))
    assert complete and len(full) == 5
    data = path.read_bytes()
    for cut in _member_boundaries(path):
        cut_path = tmp_path / f"cut-{cut}.tar"
        cut_path.write_bytes(data[:cut])
        samples, complete = index_tar(str(cut_path))
        assert not complete, cut  # tarfile alone reads these as complete archives
        # Only whole samples before the cut survive, and never the last one indexed (it may lack members).
        assert len(samples) < 5 and [s.key for s in samples] == [s.key for s in full[: len(samples)]]
    # One zero block of the two-block end marker is not enough either.
    end = _member_boundaries(path)[-1]
    (tmp_path / "half-marker.tar").write_bytes(data[: end + 512])
    assert not index_tar(str(tmp_path / "half-marker.tar"))[1]
    assert index_tar(str(path))[1]  # untouched: complete


def test_truncated_shard_is_counted_and_reported_in_the_log(tmp_path, capsys):
    """A shard cut at a member boundary (5 samples, cut after the third sample's caption): the lost tail is
    counted as a skip and the shard is named in the log and the summary."""
    whole = write_shard(tmp_path / "part-0.tar", clean_samples(5, caption_ext="json"))
    import tarfile

    with tarfile.open(whole) as tar:
        cut = tar.getmember("s00003.png").offset  # the header of sample 3: samples 0-2 complete
    data = whole.read_bytes()
    whole.write_bytes(data[:cut])
    write_shard(tmp_path / "part-1.tar", clean_samples(8, start=100, caption_ext="json"))
    summary = main(TINY + WDS + ["--train-data", str(tmp_path / "part-{0..1}.tar"), "--steps", "2",
                                 "--out-dir", str(tmp_path / "run")])
    # Read: samples 0, 1 of part-0 (2 is dropped as possibly incomplete) and 6 of part-1 in 2 steps x 4.
    assert summary["skipped_samples"] == 1 and summary["truncated_shards"] == 1
    out = capsys.readouterr().out
    assert f"data: {tmp_path / 'part-0.tar'} is truncated (no end-of-archive marker)" in out
    assert "truncated_shards: 1" in (tmp_path / "run" / "report.txt").read_text()


def _write_csv_bytes(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_malformed_csv_rows_are_skipped_and_counted(tmp_path):
    """A short row and a row with bytes that are not UTF-8 are skipped and counted like a missing image."""
    lines = [b"filepath,title"]
    for i in range(10):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
        lines.append(f"{i}.png,caption {i}".encode())
    lines[2] = b"1.png"  # row 1: too few fields
    lines[5] = b"4.png,caption \xff\xfe not utf-8"  # row 4
    _write_csv_bytes(tmp_path / "data.csv", lines)
    argv = TINY + ["--data", "csv", "--train-data", str(tmp_path / "data.csv"), "--shuffle", "false",
                   "--batch-size", "4", "--steps", "2", "--val-data", str(tmp_path / "data.csv")]
    summary = main(argv + ["--out-dir", str(tmp_path / "run")])
    assert summary["skipped_samples"] == 2
    assert summary["eval_images"] == 8 and summary["eval_skipped"] == 2


def test_csv_where_every_row_is_malformed_stops_with_the_error(tmp_path):
    lines = [b"filepath,title"] + [f"{i}.png".encode() for i in range(20)]  # every row lacks its caption
    _write_csv_bytes(tmp_path / "data.csv", lines)
    with pytest.raises(DataSchemaError, match=r"samples all failed.*malformed \(too few fields"):
        main(TINY + ["--data", "csv", "--train-data", str(tmp_path / "data.csv"), "--batch-size", "4",
                     "--steps", "1", "--out-dir", str(tmp_path / "run")])


def test_skipped_evaluation_samples_are_reported(tmp_path, capsys):
    """Unreadable evaluation samples appear in the start-up log, every eval line, metrics.jsonl, report.txt."""
    pattern = _shards(tmp_path)  # 3 unreadable: a truncated tar's tail, a truncated PNG, bad JSON
    summary = main(TINY + WDS + ["--train-data", pattern, "--val-data", pattern, "--val-data-type", "wds",
                                 "--steps", "2", "--eval-every", "1", "--out-dir", str(tmp_path / "run")])
    assert summary["eval_skipped"] == 3 and summary["eval_images"] == 16
    out = capsys.readouterr().out
    assert "evaluation set: 16 images; 3 unreadable samples skipped" in out
    assert "step 1: eval" in out and "(16 images, 3 unreadable skipped)" in out
    report = (tmp_path / "run" / "report.txt").read_text()
    assert "eval_skipped: 3" in report
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_skipped"] for r in records if "eval_images" in r] == [3, 3]
