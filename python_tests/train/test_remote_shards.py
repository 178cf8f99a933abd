"""Remote WebDataset shards (``pipe:COMMAND`` and URLs): streamed, retried, skipped when unreadable, resumed
exactly. The only server is a local HTTP server on 127.0.0.1."""

import shlex
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from vlcore.train import data as D

from .helpers import clean_samples, write_shard


class FlakyHandler(SimpleHTTPRequestHandler):
    """Serves the shard directory; ``server.fail[name] = n`` answers the next n requests for it with 503,
    ``server.cut[name] = n`` sends only the first n bytes of the next response (a dropped connection)."""

    def do_GET(self):
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        if self.server.fail.get(name, 0) > 0:
            self.server.fail[name] -= 1
            self.send_error(503, "try again")
            return
        if name in self.server.cut:
            data = (self.server.root / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: self.server.cut.pop(name)])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    for i in range(2):
        write_shard(root / f"shard-{i:04d}.tar", clean_samples(6, start=10 * i))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(FlakyHandler, directory=str(root)))
    httpd.root, httpd.fail, httpd.cut, httpd.requests = root, {}, {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(D, "SHARD_RETRY_DELAY_S", 0.01)


def _members(samples):
    return [(s.key, dict(s.members)) for s in samples]


def _local_members(path):
    samples, complete = D.index_tar(str(path))
    assert complete
    with open(path, "rb") as f:
        out = []
        for s in samples:
            members = {}
            for ext, info in s.members.items():
                f.seek(info.offset_data)
                members[ext] = f.read(info.size)
            out.append((s.key, members))
    return out


def test_stream_detection_and_braces_on_urls():
    assert D.expand_braces("http://h/s-{00..01}.tar::pipe:cat a.tar") == ["http://h/s-00.tar", "http://h/s-01.tar", "pipe:cat a.tar"]
    assert D.is_stream("s3://b/k.tar") and D.is_stream("pipe:cat x") and not D.is_stream("/data/s-0.tar")


def test_http_and_pipe_streams_match_the_local_tar(server):
    local = _local_members(server.root / "shard-0001.tar")
    assert len(local) == 6
    for url in (f"{server.url}/shard-0001.tar", f"pipe:cat {shlex.quote(str(server.root / 'shard-0001.tar'))}"):
        shard = D.StreamShard(url)
        assert _members(shard.samples()) == local and shard.complete and shard.failed is None
        shard = D.StreamShard(url)  # a resume: the first samples are read past, not handed out
        assert _members(shard.samples(skip=4)) == local[4:]


def test_transient_errors_are_retried_and_a_dropped_connection_continues(server):
    server.fail["shard-0000.tar"] = 2
    shard = D.StreamShard(f"{server.url}/shard-0000.tar", retries=3)
    assert _members(shard.samples()) == _local_members(server.root / "shard-0000.tar") and shard.complete
    assert server.requests.count("shard-0000.tar") == 3
    # The connection drops in the middle of the tar: re-opened, no sample repeated or lost.
    server.cut["shard-0001.tar"] = 5000
    shard = D.StreamShard(f"{server.url}/shard-0001.tar", retries=2)
    assert _members(shard.samples()) == _local_members(server.root / "shard-0001.tar") and shard.complete


def test_unreadable_shards_are_skipped_after_their_retries(server, monkeypatch):
    monkeypatch.setenv("VLCORE_SHARD_RETRIES", "2")
    for url in (f"{server.url}/missing.tar", "pipe:exit 3"):
        shard = D.StreamShard(url)
        assert list(shard.samples()) == [] and shard.failed is not None
    assert server.requests.count("missing.tar") == 2
    # A command whose exit status says it failed, even after writing a whole tar.
    path = shlex.quote(str(server.root / "shard-0000.tar"))
    shard = D.StreamShard(f"pipe:cat {path}; exit 1", retries=2)
    list(shard.samples())
    assert shard.failed is not None and "status 1" in shard.failed


def test_truncated_stream_loses_its_last_sample(server):
    data = (server.root / "shard-0000.tar").read_bytes()
    (server.root / "cut.tar").write_bytes(data[: len(data) // 2])
    shard = D.StreamShard(f"{server.url}/cut.tar")
    keys = [s.key for s in shard.samples()]
    assert not shard.complete and shard.failed is None
    local, complete = D.index_tar(str(server.root / "cut.tar"))
    assert not complete and keys == [s.key for s in local]


def _collate(images, captions, rng):
    return {"images": images, "captions": captions}


def _spec(shards):
    reader = D.TarReader(["png"], "txt", "caption")
    transform = D.ImageTransform(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), random_crop=True)
    return D.StreamSpec("tar", shards, 4, 0, 1, 5, transform, _collate, tar_reader=reader, shuffle=True)


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_batches_from_pipe_http_and_resume_are_exact(server):
    root, n = server.root, 7  # 12 samples per epoch: batches cross shard and epoch boundaries
    pipe = [f"pipe:cat {shlex.quote(str(root / f'shard-{i:04d}.tar'))}" for i in range(2)]
    http = D.expand_braces(f"{server.url}/shard-{{0000..0001}}.tar")
    reference = _take(D.BatchStream(_spec(pipe)), n)
    for batch, http_batch in zip(reference, _take(D.BatchStream(_spec(http)), n)):
        assert torch.equal(batch[0]["images"], http_batch[0]["images"]) and batch[0]["captions"] == http_batch[0]["captions"]
    # The connection drops once more: the same batches.
    server.cut["shard-0000.tar"] = 3000
    again = _take(D.BatchStream(_spec(http)), n)
    assert all(torch.equal(a[0]["images"], b[0]["images"]) for a, b in zip(reference, again))
    # Resume after every batch k from its position: the following batches are the uninterrupted ones.
    for k in range(1, n):
        position = reference[k - 1][1]
        resumed = _take(D.BatchStream(_spec(http), start_batch=k, worker_states={0: position}), n - k)
        for (batch, pos), (want, want_pos) in zip(resumed, reference[k:]):
            assert torch.equal(batch["images"], want["images"]) and batch["captions"] == want["captions"]
            assert pos == want_pos


def test_a_missing_remote_shard_is_skipped_and_counted(server, monkeypatch):
    monkeypatch.setenv("VLCORE_SHARD_RETRIES", "2")
    shards = [f"{server.url}/shard-0000.tar", f"{server.url}/missing.tar"]
    batches = _take(D.BatchStream(_spec(shards)), 4)
    position = D.DataPosition(0)
    reported = [p for _, pos in batches for p in position.update(pos)]
    assert reported == [shards[1]] and position.skipped >= 1
    # The eval loader skips it too and reads every sample of the good shard.
    images, captions, skipped = D.load_eval_set([D.TarReader(["png"], "txt", "caption"), shards],
                                                D.ImageTransform(8, (0.5,) * 3, (0.25,) * 3))
    assert images.shape[0] == 6 and skipped == 1


def test_training_over_http_resumes_exactly(server, tmp_path):
    """The trainer reads --train-data over HTTP; a run stopped after a checkpoint and resumed logs the same
    per-step losses as an uninterrupted one (the stream is reopened and read past the consumed samples)."""
    from vlcore.train.cli import main

    from .helpers import TINY, read_metrics

    argv = TINY + ["--data", "wds", "--shuffle", "false", "--batch-size", "4", "--workers", "1",
                   "--train-data", server.url + "/shard-{0000..0001}.tar", "--checkpoint-every", "2"]
    main(argv + ["--steps", "4", "--out-dir", str(tmp_path / "straight")])
    reference = read_metrics(tmp_path / "straight")
    main(argv + ["--steps", "2", "--out-dir", str(tmp_path / "resumed")])
    main(argv + ["--steps", "4", "--out-dir", str(tmp_path / "resumed")])
    losses = read_metrics(tmp_path / "resumed")
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(losses[step] == reference[step] for step in reference)
