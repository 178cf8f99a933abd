"""Standard image-caption evaluation sets read from local files (docs/evaluation.md, 'Data formats'):

- ``karpathy``: Karpathy's split files ``dataset_coco.json`` / ``dataset_flickr30k.json``:
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}, ...]}``; the image is
  ``image_root/filepath/filename``; one split is read (``"test"``: the 5k COCO / 1k Flickr30k test images).
- ``clip_benchmark``: CLIP_benchmark's Flickr caption file: a header line, then ``<image>,<caption>`` lines,
  the captions of an image grouped in first-seen order; the image is ``image_root/<image>``.
- ``coco``: COCO's caption annotations (``captions_val2014.json``: ``images`` with ``id`` / ``file_name``,
  ``annotations`` with ``image_id`` / ``caption``), read as torchvision's ``CocoCaptions`` (and so
  CLIP_benchmark's ``mscoco_captions``) reads them: images by increasing id, captions in file order.

Each reader is a map-style source (``len``, ``load(index, rng) -> (PIL image, captions)``) for
:func:`vlcore.train.data.load_eval_set`: a missing or unreadable image is skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Optional

from vlcore.train.data import CorruptSample, DataSchemaError, decode_image

__all__ = ["FORMATS", "CaptionFileSource", "karpathy_source", "clip_benchmark_source", "coco_source", "caption_source",
           "load_caption_set"]

FORMATS = ("karpathy", "clip_benchmark", "coco")


class CaptionFileSource:
    """``(image path, captions)`` rows read from an annotation file; images are opened on ``load``."""

    def __init__(self, rows: list[tuple[str, list[str]]], what: str):
        if not rows:
            raise DataSchemaError(f"{what}: no images")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, rng=None):
        path, captions = self.rows[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CorruptSample(f"image {index}: {e}") from None
        return decode_image(data), list(captions)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataSchemaError(f"{path}: not JSON ({e})") from None


def karpathy_source(path: str, image_root: str, split: str = "test") -> CaptionFileSource:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataSchemaError(f"{path}: a Karpathy split file has an 'images' list")
    rows = []
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "filename" not in entry or "split" not in entry:
            raise DataSchemaError(f"{path}: images[{i}] needs 'filename' and 'split'")
        if entry["split"] != split:
            continue
        captions = [s["raw"].strip() for s in entry.get("sentences", []) if isinstance(s, dict) and s.get("raw", "").strip()]
        if not captions:
            raise DataSchemaError(f"{path}: images[{i}] ({entry['filename']}) has no 'sentences' with 'raw' text")
        rows.append((os.path.join(image_root, entry.get("filepath", ""), entry["filename"]), captions))
    return CaptionFileSource(rows, f"{path} (split {split!r})")


def clip_benchmark_source(path: str, image_root: str) -> CaptionFileSource:
    captions = defaultdict(list)  # insertion-ordered: images in first-seen order
    with open(path, encoding="utf-8") as f:
        f.readline()  # the header
        for number, line in enumerate(f, start=2):
            line = line.strip()
            if not line:
                continue
            image, comma, caption = line.partition(",")
            if not comma or not caption.strip():
                raise DataSchemaError(f"{path}:{number}: expected '<image>,<caption>'")
            captions[image].append(caption.strip())
    return CaptionFileSource([(os.path.join(image_root, image), caps) for image, caps in captions.items()], path)


def coco_source(path: str, image_root: str) -> CaptionFileSource:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataSchemaError(f"{path}: COCO caption annotations have 'images' and 'annotations' lists")
    try:
        files = {entry["id"]: entry["file_name"] for entry in data["images"]}
        captions = defaultdict(list)
        for ann in data["annotations"]:
            captions[ann["image_id"]].append(ann["caption"].strip())
    except (KeyError, TypeError, AttributeError) as e:
        raise DataSchemaError(f"{path}: images need 'id' and 'file_name', annotations 'image_id' and 'caption' ({e!r})") from None
    rows = [(os.path.join(image_root, files[i]), captions[i]) for i in sorted(files) if captions[i]]
    return CaptionFileSource(rows, path)


def caption_source(kind: str, path: str, image_root: Optional[str] = None, split: str = "test") -> CaptionFileSource:
    """The source of one of :data:`FORMATS`; ``image_root`` defaults to the annotation file's folder."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption_source: annotation file {path!r} not found")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if kind == "karpathy":
        return karpathy_source(path, root, split)
    if kind == "clip_benchmark":
        return clip_benchmark_source(path, root)
    if kind == "coco":
        return coco_source(path, root)
    raise ValueError(f"caption_source: kind must be one of {FORMATS}, got {kind!r}")


def load_caption_set(kind: str, path: str, transform, image_root: Optional[str] = None, split: str = "test"):
    """``(images [N, 3, S, S], captions per image, skipped)`` of an annotation file (the trainer's eval set)."""
    from vlcore.train.data import load_eval_set

    return load_eval_set(caption_source(kind, path, image_root, split), transform)
