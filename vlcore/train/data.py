"""Data: the embedded synthetic dataset, WebDataset tar shards and CSV/TSV files, batched in worker processes.

Every source is read by :class:`BatchStream`, an ``IterableDataset`` whose worker processes produce whole
batches (decode, augment, tokenize, collate) and attach to each batch the *position* reached after it. The
training loop keeps the position of the last batch it consumed from every worker and stores them in the
checkpoint; resuming hands them back, so the batches after a resume are exactly those an uninterrupted run
would have seen (the exact-resume test checks this step by step).

How work is split:

- **Map-style sources** (synthetic, CSV): every epoch is a permutation of the sample indices seeded by
  ``(seed, epoch)``. Global batch ``j`` of the run is the slice ``[j*B, (j+1)*B)`` of that order; rank ``r`` takes
  its ``B / world_size`` part; dataloader worker ``w`` builds the batches ``j`` with ``j % workers == w``.
- **WebDataset shards**: rank ``r`` reads shards ``r, r + world_size, ...``, its worker ``w`` every
  ``workers``-th of those. Each worker loops over its shards forever, epoch after epoch, in an order shuffled
  per epoch, and reads each shard's samples in a per-epoch shuffled order (the tar's member index is scanned
  once, then samples are read by offset). Position = (epoch, shard, sample) per worker. Remote shards
  (``pipe:COMMAND``, URLs) are streamed: their samples come in file order, and a resume re-opens the stream
  and reads past the samples already consumed (:class:`StreamShard`; docs/data.md, 'Remote shards').

The DataLoader takes batches from its workers round robin; after a resume at global batch ``n`` the worker
numbering is rotated by ``n % workers`` so that the round robin continues where it stopped.

Corrupt samples (undecodable or truncated images, bad JSON, a missing caption, a truncated tar) are skipped
and counted. If a worker's first samples *all* fail, the data does not match the configuration (a wrong
caption key, a wrong image column): the run stops with the error instead of skipping everything.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from http.client import HTTPException
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlcore.train import synthetic

#: consecutive failures, with no success yet, after which a worker declares a schema error
SCHEMA_FAILURES = 16

#: attempts to read a remote shard (``pipe:`` or URL) before it is skipped; VLCORE_SHARD_RETRIES overrides
SHARD_RETRIES = 3
#: first wait between attempts in seconds, doubled after every failure up to SHARD_RETRY_MAX_S
SHARD_RETRY_DELAY_S = 0.5
SHARD_RETRY_MAX_S = 8.0


class DataSchemaError(RuntimeError):
    """Every sample fails the same way: the data does not match the configuration."""


class CorruptSample(Exception):
    """One unreadable sample; skipped and counted."""


# ---------------------------------------------------------------------------------------------------------
# Preprocessing (Pillow + numpy, in the worker processes)


@dataclass
class ImageTransform:
    """Resize + centre crop (evaluation) or random resized crop (training), then normalise to ``[3, S, S]``."""

    size: int
    mean: Sequence[float]
    std: Sequence[float]
    random_crop: bool = False
    scale: tuple[float, float] = (0.9, 1.0)

    def __call__(self, image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        w, h = image.size
        if self.random_crop and rng is not None:
            area = w * h * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw = int(round(min(w, np.sqrt(area * aspect))))
            ch = int(round(min(h, np.sqrt(area / aspect))))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.resize((self.size, self.size), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        else:
            short = min(w, h)
            x0, y0 = (w - short) // 2, (h - short) // 2
            if (w, h) != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.BICUBIC, box=(x0, y0, x0 + short, y0 + short))
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def decode_image(data: bytes):
    """Bytes -> a fully decoded PIL image; a truncated or unknown file raises :class:`CorruptSample`."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not later in the transform
        return image
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... depending on the format
        raise CorruptSample(f"image: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Sources


def expand_braces(pattern: str) -> list[str]:
    """``"a-{000..002}.tar::b.tar"`` -> ``["a-000.tar", "a-001.tar", "a-002.tar", "b.tar"]``: numeric ranges
    keep their zero padding, ``{x,y}`` lists are alternatives, ``::`` separates patterns."""
    out = []
    for part in pattern.split("::"):
        m = re.search(r"\{([^{}]*)\}", part)
        if not m:
            out.append(part)
            continue
        body, head, tail = m.group(1), part[: m.start()], part[m.end():]
        r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if r:
            lo, hi = r.group(1), r.group(2)
            width = len(lo) if lo.startswith("0") else 0
            options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            options = body.split(",")
        for option in options:
            out.extend(expand_braces(head + option + tail))
    return out


class SyntheticSource:
    """Map-style: sample ``i`` of the embedded dataset. Training picks one of the captions at random."""

    def __init__(self, seed: int, split: int, size: int, image_size: int):
        self.seed, self.split, self.size, self.image_size = seed, split, size, image_size

    def __len__(self) -> int:
        return self.size

    def load(self, index: int, rng: np.random.Generator):
        image, captions = synthetic.generate(self.seed, self.split, index, self.image_size)
        return image, captions


class CsvSource:
    """Map-style: rows of a CSV (``,``) or TSV (``.tsv``: tab) file with an image path and a caption column.

    The file is read once, up front; a malformed row (too few fields, bytes that are not UTF-8, a quoting
    error) is kept as a placeholder that fails when loaded, so that it is skipped and counted like any other
    corrupt sample rather than stopping the run. A header without the configured columns is a schema error.
    """

    def __init__(self, path: str, image_key: str, caption_key: str):
        self.root = os.path.dirname(os.path.abspath(path))
        delimiter = "\t" if path.endswith((".tsv", ".tsv.gz")) else ","
        opener = gzip.open if path.endswith(".gz") else open
        # surrogateescape: a non-UTF-8 byte becomes a marker character instead of an exception for the file.
        with opener(path, "rt", newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            for key, what in ((image_key, "csv_image_key"), (caption_key, "csv_caption_key")):
                if key not in header:  # a schema error: fail before any worker starts
                    raise DataSchemaError(f"{path}: no column {key!r} ({what}); the columns are {header}")
            self.rows: list[tuple] = []
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    self.rows.append((None, None, f"line {reader.line_num}: {e}"))
                    continue
                self.rows.append((row.get(image_key), row.get(caption_key), f"line {reader.line_num}"))
        if not self.rows:
            raise DataSchemaError(f"{path}: no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, rng: np.random.Generator):
        path, caption, where = self.rows[index]
        if path is None or caption is None:  # DictReader fills the fields a short row lacks with None
            raise CorruptSample(f"row {index} ({where}): malformed (too few fields or a quoting error)")
        if _has_undecodable(path) or _has_undecodable(caption):
            raise CorruptSample(f"row {index} ({where}): not UTF-8")
        if not caption.strip():
            raise CorruptSample(f"row {index}: empty caption")
        path = path if os.path.isabs(path) else os.path.join(self.root, path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CorruptSample(f"row {index}: {e}") from None
        return decode_image(data), [caption]


def _has_undecodable(text: str) -> bool:
    """Whether surrogateescape decoding met a byte that is not UTF-8 (it maps them to U+DC80..U+DCFF)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


@dataclass
class TarSample:
    key: str
    members: dict  # extension -> tarfile.TarInfo (a local tar, read by offset) or bytes (a streamed shard)


def _sample_members(tar: tarfile.TarFile) -> Iterator[tuple]:
    """``(member, sample key, lower-case extension)`` of the tar's files that belong to a sample: the key is
    the path up to the first dot of the file name (WebDataset's rule)."""
    for info in tar:
        if not info.isfile():
            continue
        directory, base = os.path.split(info.name)
        if "." not in base:
            continue
        stem, ext = base.split(".", 1)
        yield info, os.path.join(directory, stem), ext.lower()


def index_tar(path: str) -> tuple[list[TarSample], bool]:
    """The samples of one tar (members grouped by key = basename up to its first dot, WebDataset's rule) and
    whether the tar was complete. A truncated tar keeps the samples indexed before the damage.

    A tar ends with two zero 512-byte blocks. Python's tarfile treats a file that simply stops at a header
    or member boundary as a normal end, so a shard cut there (an interrupted copy, a full disk) would look
    complete; the end-of-archive marker is therefore checked here explicitly.
    """
    samples = []
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            current = None
            for info, key, ext in _sample_members(tar):
                if current is None or current.key != key:
                    current = TarSample(key, {})
                    samples.append(current)
                current.members[ext] = info
            # tar.offset is where the end-of-archive header was looked for.
            raw.seek(tar.offset)
            marker = raw.read(2 * tarfile.BLOCKSIZE)
        complete = len(marker) == 2 * tarfile.BLOCKSIZE and not any(marker)
    except (tarfile.ReadError, EOFError, OSError):
        complete = False
    if not complete:
        # The damage may have cut the last indexed sample (a member's data or a whole member): drop it. The
        # caller counts the truncated tar as one skipped sample and reports the shard.
        samples = samples[:-1]
    return samples, complete


# ---------------------------------------------------------------------------------------------------------
# Remote shards: ``pipe:COMMAND`` and URLs, read as a stream


def is_stream(path: str) -> bool:
    """Whether a shard is read as a stream (``pipe:COMMAND`` or a URL such as ``https://``, ``s3://``, ``gs://``)
    rather than indexed as a local file."""
    return path.startswith("pipe:") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def shard_retries() -> int:
    value = os.environ.get("VLCORE_SHARD_RETRIES")
    if value is None:
        return SHARD_RETRIES
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"VLCORE_SHARD_RETRIES must be a positive integer, not {value!r}")
    return int(value)


class ShardReadError(OSError):
    """The transport failed (a connection error, a ``pipe:`` command exiting non-zero): worth another try."""


#: errors of the transport, as opposed to damage inside the tar (tarfile.ReadError, EOFError)
TRANSIENT_ERRORS = (OSError, HTTPException)


class _TailReader:
    """A read-only stream that remembers how many bytes went through it and the last ones, so that the
    end-of-archive marker can be checked after tarfile's stream mode has consumed it."""

    KEEP = 1 << 16  # tarfile reads records of 10 KiB: the marker is always within the kept tail

    def __init__(self, raw):
        self.raw, self.pos, self.tail = raw, 0, bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.pos += len(data)
        self.tail += data
        del self.tail[: max(0, len(self.tail) - self.KEEP)]
        return data

    def ends_with_marker(self, offset: int) -> bool:
        """Whether the two zero blocks of the end-of-archive marker start at byte ``offset``."""
        while self.pos - offset < 2 * tarfile.BLOCKSIZE and self.read(2 * tarfile.BLOCKSIZE):
            pass
        after = self.pos - offset
        if after < 2 * tarfile.BLOCKSIZE or after > len(self.tail):
            return False
        marker = self.tail[len(self.tail) - after:][: 2 * tarfile.BLOCKSIZE]
        return not any(marker)


def _open_stream(url: str):
    """``(file object, finish)``: ``finish(read_to_end)`` releases the stream and raises ShardReadError when
    the transport failed (only a command read to its end is judged by its exit status: one stopped early
    dies of a broken pipe)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)

        def finish(read_to_end: bool):
            if read_to_end:
                proc.stdout.read()  # drain, so the command is not stopped by a full pipe
            proc.stdout.close()
            if not read_to_end:
                proc.kill()
            status = proc.wait()
            if read_to_end and status != 0:
                raise ShardReadError(f"{url}: the command exited with status {status}")
        return proc.stdout, finish
    if url.startswith(("http://", "https://")):
        # urllib rather than fsspec here: fsspec's HTTP file system needs aiohttp, which torch does not bring.
        response = urllib.request.urlopen(url, timeout=60)

        def finish(read_to_end: bool):
            # http.client ends a body cut short by a dropped connection like a complete one; the bytes still
            # owed by the Content-Length tell the two apart.
            while read_to_end and response.read(1 << 16):
                pass
            owed = response.length
            response.close()
            if read_to_end and owed:
                raise ShardReadError(f"{url}: the connection closed {owed} bytes before the end")
        return response, finish
    import fsspec  # s3://, gs://, ...: whatever fsspec and its installed backends support

    handle = fsspec.open(url, "rb").open()
    return handle, lambda read_to_end: handle.close()


class StreamShard:
    """The samples of one remote tar, read front to back without a local copy.

    A stream cannot seek: samples come in file order, and resuming at sample ``k`` re-opens the stream and
    reads past the first ``k``. Transport errors are retried with exponential backoff; a stream that breaks
    after some samples is re-opened and continues after the last sample handed out. Afterwards ``complete``
    says whether the tar ended with its end-of-archive marker, ``failed`` holds the error that exhausted the
    retries (the caller skips the shard and counts it).
    """

    def __init__(self, url: str, retries: Optional[int] = None):
        self.url, self.retries = url, retries or shard_retries()
        self.complete, self.failed = False, None

    def samples(self, skip: int = 0) -> Iterator[TarSample]:
        handed_out, failures, delay = skip, 0, SHARD_RETRY_DELAY_S
        while True:
            before = handed_out
            try:
                for sample in self._attempt(skip=handed_out):
                    handed_out += 1
                    yield sample
                return
            except TRANSIENT_ERRORS as e:
                failures = 1 if handed_out > before else failures + 1  # progress restarts the count
                if failures >= self.retries:
                    self.failed = f"{type(e).__name__}: {e}"
                    return
                time.sleep(delay)
                delay = min(2 * delay, SHARD_RETRY_MAX_S)

    def _attempt(self, skip: int) -> Iterator[TarSample]:
        """One pass over the stream, yielding the samples after the first ``skip``; sets ``complete``."""
        raw, finish = _open_stream(self.url)
        stream, read_to_end, index, current = _TailReader(raw), False, 0, None
        try:
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for info, key, ext in _sample_members(tar):
                        if current is not None and current.key != key:
                            if index >= skip:
                                yield current
                            index += 1
                            current = None
                        if current is None:
                            current = TarSample(key, {})
                        # The stream moves on: read the member now (a sample cut here is lost, as in a local tar).
                        current.members[ext] = tar.extractfile(info).read()
                    self.complete = stream.ends_with_marker(tar.offset)
            except (tarfile.ReadError, EOFError):
                self.complete = False
            read_to_end = True
            finish(True)  # a failed transport (a command's exit status) outranks what the tar looked like
        finally:
            if not read_to_end:
                finish(False)
        # The last sample is complete only if the tar is: a truncated stream loses it, as a local tar does.
        if self.complete and current is not None and index >= skip:
            yield current


class TarReader:
    """Decodes one sample of a tar by its member offsets."""

    def __init__(self, image_keys: Sequence[str], caption_key: str, json_field: str):
        self.image_keys, self.caption_key, self.json_field = tuple(image_keys), caption_key, json_field

    def load(self, handle, sample: TarSample):
        def read(info) -> bytes:
            if isinstance(info, bytes):  # a streamed shard: the member was read in passing
                return info
            handle.seek(info.offset_data)
            data = handle.read(info.size)
            if len(data) != info.size:
                raise CorruptSample(f"{sample.key}.{info.name.rsplit('.', 1)[-1]}: truncated")
            return data

        image_ext = next((k for k in self.image_keys if k in sample.members), None)
        if image_ext is None:
            raise CorruptSample(f"{sample.key}: no image member with an extension in {list(self.image_keys)} "
                                f"(wds_image_keys); it has {sorted(sample.members)}")
        if self.caption_key not in sample.members:
            raise CorruptSample(f"{sample.key}: no caption member '.{self.caption_key}' (wds_caption_key); "
                                f"it has {sorted(sample.members)}")
        raw = read(sample.members[self.caption_key])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptSample(f"{sample.key}.{self.caption_key}: not UTF-8") from None
        if self.caption_key == "json":
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise CorruptSample(f"{sample.key}.json: bad JSON ({e})") from None
            if not isinstance(record, dict) or self.json_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CorruptSample(f"{sample.key}.json: no field {self.json_field!r} (json_caption_field); it has {keys}")
            captions = record[self.json_field]
            captions = [captions] if isinstance(captions, str) else list(captions)
        else:
            captions = [text.strip()]
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise CorruptSample(f"{sample.key}: empty caption")
        return decode_image(read(sample.members[image_ext])), captions


# ---------------------------------------------------------------------------------------------------------
# Batching in worker processes


@dataclass
class StreamSpec:
    """Everything a worker needs to build batches; picklable."""

    kind: str  # "map" or "tar"
    source: object  # SyntheticSource / CsvSource (map) or a list of shard paths (tar)
    local_batch: int  # samples per batch on this rank
    rank: int
    world_size: int
    seed: int
    transform: ImageTransform
    collate: Callable  # (images [B,3,S,S], caption lists, rng) -> batch dict
    tar_reader: Optional[TarReader] = None
    train: bool = True  # training: random crops, one random caption per image
    shuffle: bool = True  # per-epoch shuffled order (else file / index order)


def worker_shards(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one dataloader worker of one rank reads: disjoint across all ranks and workers."""
    return shards[rank::world_size][worker::num_workers]


class BatchStream(IterableDataset):
    """Infinite stream of ``(batch, position)``; see the module docstring for the split of the work."""

    def __init__(self, spec: StreamSpec, start_batch: int = 0, worker_states: Optional[dict] = None,
                 num_workers: int = 0):
        self.spec, self.start_batch, self.num_workers = spec, start_batch, max(num_workers, 1)
        self.worker_states = worker_states or {}

    def _worker(self) -> int:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return (physical + self.start_batch) % self.num_workers  # rotated: see the module docstring

    def __iter__(self) -> Iterator:
        worker = self._worker()
        state = dict(self.worker_states.get(worker, {}))
        state.setdefault("skipped", 0)
        if self.spec.kind == "map":
            return self._map_batches(worker, state)
        return self._tar_batches(worker, state)

    # -- map-style: global batch j of the run, this rank's slice ----------------------------------------
    def _map_batches(self, worker: int, state: dict):
        spec, n = self.spec, len(self.spec.source)
        global_batch = spec.local_batch * spec.world_size
        per_epoch = n // global_batch
        if per_epoch == 0:
            raise ValueError(f"the dataset has {n} samples, fewer than one global batch of {global_batch}")
        order_epoch, order = -1, None
        first = self.start_batch + (worker - self.start_batch) % self.num_workers
        failures = {"since_success": 0, "any_success": False}
        for j in itertools.count(first, self.num_workers):
            epoch, b = divmod(j, per_epoch)
            if epoch != order_epoch:
                order_epoch = epoch
                order = np.random.default_rng([spec.seed, 7, epoch]).permutation(n) if spec.shuffle else np.arange(n)
            start = b * global_batch + spec.rank * spec.local_batch
            images, captions = [], []
            for slot in range(spec.local_batch):
                index = int(order[start + slot])
                # Seeded by the sample's place in the epoch's order: any world size and any number of
                # accumulation steps draw the same crops and captions for it.
                rng = np.random.default_rng([spec.seed, 11, epoch, start + slot])
                # A corrupt sample is replaced by the next index (wrapping): batches keep their size, which
                # the distributed contrastive loss needs (all ranks gather equal shapes).
                for attempt in range(n):
                    try:
                        image, caps = spec.source.load((index + attempt) % n, rng)
                        images.append(spec.transform(image, rng if spec.train else None))
                        failures["since_success"], failures["any_success"] = 0, True
                        break
                    except CorruptSample as e:
                        state["skipped"] += 1
                        self._check_schema(failures, e)
                else:
                    raise DataSchemaError(f"none of the {n} samples could be read; the last error: "
                                          f"{failures['last_error']}")
                captions.append(self._pick_caption(caps, rng))
            batch = spec.collate(torch.stack(images), captions, np.random.default_rng([spec.seed, 13, j, spec.rank]))
            yield batch, {"worker": worker, "batch": j, "skipped": state["skipped"]}

    def _pick_caption(self, captions: list, rng: np.random.Generator) -> list:
        """Training uses one caption per image, drawn with the sample's own generator."""
        return [captions[int(rng.integers(len(captions)))]] if self.spec.train else captions

    @staticmethod
    def _check_schema(failures: dict, error: Exception) -> None:
        failures["since_success"] += 1
        failures["last_error"] = error
        if not failures["any_success"] and failures["since_success"] >= SCHEMA_FAILURES:
            raise DataSchemaError(f"the first {SCHEMA_FAILURES} samples all failed, so the data does not match the "
                                  f"configuration; the last error: {error}")

    # -- WebDataset tars: this worker's shards, forever --------------------------------------------------
    def _tar_batches(self, worker: int, state: dict):
        spec = self.spec
        shards = worker_shards(spec.source, spec.rank, spec.world_size, worker, self.num_workers)
        if not shards:
            raise ValueError(f"rank {spec.rank} worker {worker} has no shard: {len(spec.source)} shards for "
                             f"{spec.world_size} ranks x {self.num_workers} workers; use fewer workers or more shards")
        epoch, shard_pos, sample_pos = state.get("epoch", 0), state.get("shard", 0), state.get("sample", 0)
        state["truncated"] = list(state.get("truncated", []))
        failures = {"since_success": 0, "any_success": False}
        images, captions, produced = [], [], state.get("produced", 0)
        while True:
            shard_order = (np.random.default_rng([spec.seed, 17, epoch, spec.rank, worker]).permutation(len(shards))
                           if spec.shuffle else np.arange(len(shards)))
            while shard_pos < len(shards):
                path = shards[int(shard_order[shard_pos])]
                samples, handle = self._shard_samples(path, epoch, int(shard_order[shard_pos]), sample_pos, state)
                with handle:
                    for sample in samples:
                        sample_pos += 1
                        rng = np.random.default_rng([spec.seed, 23, epoch, int(shard_order[shard_pos]), sample_pos])
                        try:
                            image, caps = spec.tar_reader.load(handle, sample)
                            images.append(spec.transform(image, rng if spec.train else None))
                            captions.append(self._pick_caption(caps, rng))
                            failures["since_success"], failures["any_success"] = 0, True
                        except CorruptSample as e:
                            state["skipped"] += 1
                            self._check_schema(failures, e)
                            continue
                        if len(images) == spec.local_batch:
                            position = {"worker": worker, "epoch": epoch, "shard": shard_pos, "sample": sample_pos,
                                        "skipped": state["skipped"], "produced": produced + 1,
                                        "truncated": list(state["truncated"])}
                            rng = np.random.default_rng([spec.seed, 29, spec.rank, worker, produced])
                            yield spec.collate(torch.stack(images), captions, rng), position
                            produced += 1
                            images, captions = [], []
                shard_pos, sample_pos = shard_pos + 1, 0
            if not failures["any_success"] and failures["since_success"] > 0:
                raise DataSchemaError(f"no sample of {shards} could be read, so the data does not match the "
                                      f"configuration; the last error: {failures.get('last_error')}")
            # Partial batches are carried over into the next epoch: no sample is dropped, batches stay full.
            epoch, shard_pos = epoch + 1, 0

    def _shard_samples(self, path: str, epoch: int, shard_index: int, sample_pos: int, state: dict):
        """``(samples after the first sample_pos, handle for TarReader.load)`` of one shard. A damaged shard
        (truncated, or a remote one unreadable after its retries) counts as one skipped sample and is reported
        once: a local tar when its index is read at the start, a stream when it ends."""
        def damaged():
            state["skipped"] += 1
            if path not in state["truncated"]:
                state["truncated"].append(path)  # reported once by the loop (DataPosition.update)

        if is_stream(path):
            # No random access: file order, and a resume reads past the samples already consumed.
            shard = StreamShard(path)

            def samples():
                yield from shard.samples(skip=sample_pos)
                if shard.failed is not None:
                    print(f"data: {path} skipped: unreadable after {shard.retries} tries ({shard.failed})",
                          file=sys.stderr, flush=True)
                if shard.failed is not None or not shard.complete:
                    damaged()
            return samples(), nullcontext(None)
        samples, complete = index_tar(path)
        if not complete and sample_pos == 0:
            damaged()
        order = (np.random.default_rng([self.spec.seed, 19, epoch, shard_index]).permutation(len(samples))
                 if self.spec.shuffle else np.arange(len(samples)))
        return (samples[int(i)] for i in order[sample_pos:]), open(path, "rb")


def make_loader(spec: StreamSpec, workers: int, data_state: Optional[dict] = None) -> DataLoader:
    """A DataLoader over :class:`BatchStream` resuming at ``data_state`` (from a checkpoint, or None)."""
    data_state = data_state or {}
    if data_state and spec.kind == "tar" and data_state.get("workers") not in (None, max(workers, 1)):
        raise ValueError(f"the checkpoint's data position was taken with {data_state['workers']} dataloader workers; "
                         f"resuming WebDataset shards exactly needs the same number (workers={workers})")
    stream = BatchStream(spec, start_batch=data_state.get("batches", 0),
                         worker_states={int(k): v for k, v in data_state.get("per_worker", {}).items()},
                         num_workers=workers)
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None, pin_memory=torch.cuda.is_available())


class DataPosition:
    """What the loop consumed: global batch count and the last position of every worker."""

    def __init__(self, workers: int, state: Optional[dict] = None):
        state = state or {}
        self.workers = max(workers, 1)
        self.batches = state.get("batches", 0)
        self.per_worker = {int(k): v for k, v in state.get("per_worker", {}).items()}

    def update(self, position: dict) -> list[str]:
        """Record a consumed batch's position; returns the shards first found truncated with it."""
        known = self.truncated_shards
        self.batches += 1
        self.per_worker[position["worker"]] = position
        return [p for p in position.get("truncated", ()) if p not in known]

    @property
    def skipped(self) -> int:
        return sum(p.get("skipped", 0) for p in self.per_worker.values())

    @property
    def truncated_shards(self) -> set[str]:
        return {path for p in self.per_worker.values() for path in p.get("truncated", ())}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "workers": self.workers, "per_worker": dict(self.per_worker)}


# ---------------------------------------------------------------------------------------------------------
# Evaluation sets: every image once, with all its captions


def _raise(error: Exception):
    raise error


def _eval_loaders(source) -> Iterator[Callable]:
    """One zero-argument loader per sample (called before the next is drawn); a truncated tar adds one that
    raises, so that it is counted like the training stream counts it."""
    if isinstance(source, list):  # [TarReader, shard paths]
        reader, paths = source
        for path in paths:
            if is_stream(path):
                shard = StreamShard(path)
                for sample in shard.samples():
                    yield partial(reader.load, None, sample)
                if shard.failed is not None or not shard.complete:
                    yield partial(_raise, CorruptSample(f"{path}: {shard.failed or 'truncated tar'}"))
                continue
            samples, complete = index_tar(path)
            if not complete:
                yield partial(_raise, CorruptSample(f"{path}: truncated tar"))
            with open(path, "rb") as handle:
                for sample in samples:
                    yield lambda: reader.load(handle, sample)
    else:
        for index in range(len(source)):
            yield lambda: source.load(index, None)


def load_eval_set(source, transform: ImageTransform) -> tuple[torch.Tensor, list[list[str]], int]:
    """``(images [N, 3, S, S], captions per image, skipped)`` of a map-style source or ``[TarReader, shards]``."""
    images, captions, skipped = [], [], 0
    for load in _eval_loaders(source):
        try:
            image, caps = load()
        except CorruptSample:
            skipped += 1
            continue
        images.append(transform(image))
        captions.append(caps)
    if not images:
        raise DataSchemaError("the evaluation data has no readable sample")
    return torch.stack(images), captions, skipped
