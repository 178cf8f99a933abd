"""Corrupt samples are skipped and counted; a schema error that hits every sample stops the run."""

import csv

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
