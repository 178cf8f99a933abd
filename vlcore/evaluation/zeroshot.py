"""Zero-shot classification with CLIP_benchmark's protocol (docs/evaluation.md, 'Zero-shot classification').

Each class name is written into every prompt template; the prompts' text embeddings are normalised,
averaged per class and renormalised (CLIP's prompt ensembling). An image's class scores are the cosine
similarities of its normalised embedding with these class embeddings; reported are top-1 and top-5 accuracy
and the mean per-class recall (CLIP_benchmark's ``mean_per_class_recall``, the balanced top-1 accuracy).

Two label sets are built in: the embedded shapes data's (colour, shape) pairs, rendered one object per image
(:func:`shapes_classification_set`), and any folder-per-class image set (:func:`image_folder_set`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlcore.evaluation.retrieval import encode_in_batches

__all__ = ["format_prompt", "zero_shot_classifier", "classification_metrics", "evaluate_zero_shot",
           "shapes_classes", "SHAPES_TEMPLATES", "shapes_classification_set", "evaluate_shapes_zero_shot",
           "image_folder_set"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def format_prompt(template, classname: str) -> str:
    """``template`` is a callable, or a string with ``{}`` or ``{c}`` for the class name (CLIP_benchmark)."""
    return template(classname) if callable(template) else template.format(classname, c=classname)


@torch.no_grad()
def zero_shot_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer, classnames: Sequence[str],
                         templates: Sequence, context_length: int, *, device: Optional[torch.device] = None,
                         batch_size: int = 256, autocast=nullcontext) -> torch.Tensor:
    """``[C, D]`` class embeddings: per class, the renormalised mean of its normalised prompt embeddings."""
    if not classnames or not templates:
        raise ValueError(f"zero_shot_classifier: need classnames and templates, got {len(classnames)} and {len(templates)}")
    prompts = [format_prompt(t, c) for c in classnames for t in templates]
    features = encode_in_batches(encode_text, tokenizer(prompts, context_length), batch_size=batch_size, device=device,
                                 autocast=autocast)
    return F.normalize(features.reshape(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """``top{k}_accuracy`` (k capped at the number of classes) and ``mean_per_class_recall`` (the mean over
    the classes present in ``labels`` of their top-1 recall) of ``logits [N, C]``."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"classification_metrics: logits [N, C] and labels [N] expected, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("classification_metrics: no labels")
    labels = labels.to(logits.device)
    order = logits.argsort(dim=1, descending=True, stable=True)
    correct = order == labels[:, None]
    metrics = {f"top{k}_accuracy": correct[:, : min(k, logits.shape[1])].any(dim=1).float().mean().item() for k in ks}
    top1 = correct[:, 0].float()
    recalls = [top1[labels == c].mean().item() for c in labels.unique().tolist()]
    metrics["mean_per_class_recall"] = float(np.mean(recalls))
    return metrics


@torch.no_grad()
def evaluate_zero_shot(model, images: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], templates: Sequence,
                       tokenizer, context_length: int, *, device: Optional[torch.device] = None,
                       ks: Sequence[int] = (1, 5), batch_size: int = 256, autocast=nullcontext,
                       class_groups: Optional[dict[str, Sequence[int]]] = None) -> dict:
    """Zero-shot metrics of ``model`` (``encode_image`` / ``encode_text``) on ``images [N, 3, H, W]`` with
    ``labels [N]`` indexing ``classnames``. ``class_groups`` (name -> class indices) adds
    ``top1_accuracy_<name>``: top-1 accuracy over the images of those classes (e.g. held-out pairs)."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"evaluate_zero_shot: {images.shape[0]} images but labels has {labels.shape[0]}")
    classifier = zero_shot_classifier(model.encode_text, tokenizer, classnames, templates, context_length,
                                      device=device, batch_size=batch_size, autocast=autocast)
    image_features = encode_in_batches(model.encode_image, images, batch_size=batch_size, device=device, autocast=autocast)
    logits = (100.0 * image_features @ classifier.t()).cpu()  # CLIP_benchmark's scale; argmax-invariant
    metrics = classification_metrics(logits, labels.cpu(), ks)
    predicted = logits.argmax(dim=1)
    for name, classes in (class_groups or {}).items():
        chosen = torch.isin(labels.cpu(), torch.as_tensor(list(classes)))
        if chosen.any():
            metrics[f"top1_accuracy_{name}"] = (predicted[chosen] == labels.cpu()[chosen]).float().mean().item()
    metrics["zeroshot_images"] = images.shape[0]
    metrics["zeroshot_classes"] = len(classnames)
    return metrics


# --- the embedded shapes data ---------------------------------------------------------------------------------


def shapes_classes() -> tuple[list[str], list[int], list[int]]:
    """``(classnames, held-out class indices, seen class indices)``: every (colour, shape) pair of the
    embedded data, named as its captions name it (``"red circle"``)."""
    from vlcore.train import synthetic

    pairs = [(c, s) for c in synthetic.COLOUR_NAMES for s in synthetic.SHAPES]
    held_out = [i for i, p in enumerate(pairs) if p in synthetic.HELD_OUT]
    return [f"{c} {s}" for c, s in pairs], held_out, [i for i in range(len(pairs)) if i not in held_out]


def _shapes_templates() -> list[str]:
    # The single-object caption templates of the embedded data, every size and region: the ensemble is over
    # exactly the phrasings the text tower was trained on.
    from vlcore.train import synthetic

    places = [f"at the {r}" if r != "centre" else "in the centre" for r in synthetic.REGIONS]
    return [f"a {size} {{}} {place}" for size in synthetic.SIZES for place in places]


SHAPES_TEMPLATES = _shapes_templates()


def shapes_classification_set(seed: int, size: int, image_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """``(images uint8 [size, S, S, 3], labels [size])``: one object of class ``i % 24`` (see
    :func:`shapes_classes`) per image, drawn like the embedded data's one-object images (random size,
    region, jitter, sensor noise and tint). Held-out pairs included: they never occur in training."""
    from vlcore.train import synthetic

    classnames, _, _ = shapes_classes()
    images = np.empty((size, image_size, image_size, 3), dtype=np.uint8)
    labels = torch.arange(size) % len(classnames)
    for index in range(size):
        # Stream 2 of the seed: disjoint from the training (0) and evaluation (1) splits' streams.
        rng = np.random.default_rng([seed, 2, index])
        colour, shape = classnames[int(labels[index])].split(" ")
        size_name = tuple(synthetic.SIZES)[rng.integers(len(synthetic.SIZES))]
        cx, cy = synthetic.REGIONS[tuple(synthetic.REGIONS)[rng.integers(len(synthetic.REGIONS))]]
        jitter = rng.uniform(-0.06, 0.06, size=2)
        image = np.empty((image_size, image_size, 3), dtype=np.float32)
        image[:] = synthetic.BACKGROUND
        image += rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)
        mask = synthetic._mask(shape, image_size, (cx + jitter[0]) * image_size, (cy + jitter[1]) * image_size,
                               synthetic.SIZES[size_name] * image_size)
        image[mask] = np.asarray(synthetic.COLOURS[colour], dtype=np.float32) + rng.normal(0.0, 8.0, size=3)
        images[index] = np.clip(image, 0, 255).astype(np.uint8)
    return images, labels


# --- folder-per-class image sets ------------------------------------------------------------------------------


def image_folder_set(root: str, transform: Callable) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images [N, 3, S, S], labels [N], classnames)`` of ``root/<class>/<image>`` (torchvision's
    ImageFolder layout: classes are the sorted sub-folder names, images the sorted files with an image
    extension; ``_`` in a folder name reads as a space in the class name). ``transform(PIL image) -> [3, S, S]``.
    """
    from PIL import Image

    if not os.path.isdir(root):
        raise FileNotFoundError(f"image_folder_set: root {root!r} is not a directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    images, labels = [], []
    for label, folder in enumerate(folders):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                with Image.open(os.path.join(root, folder, name)) as image:
                    images.append(transform(image.convert("RGB")))
                labels.append(label)
    if not images:
        raise ValueError(f"image_folder_set: no images under {root!r} (expected root/<class>/<image>)")
    return torch.stack(images), torch.tensor(labels), [f.replace("_", " ") for f in folders]


def evaluate_shapes_zero_shot(model, transform: Callable, tokenizer, context_length: int, *, seed: int = 0,
                              size: int = 240, image_size: Optional[int] = None, **kwargs) -> dict:
    """:func:`evaluate_zero_shot` on :func:`shapes_classification_set` (``size`` images, every class alike)
    with the :data:`SHAPES_TEMPLATES`, adding ``top1_accuracy_held_out`` / ``top1_accuracy_seen``: the
    held-out pairs' classes against the pairs seen in training. ``transform(uint8 array) -> [3, S, S]``."""
    classnames, held_out, seen = shapes_classes()
    raw, labels = shapes_classification_set(seed, size, image_size or model.image_size)
    images = torch.stack([transform(image) for image in raw])
    return evaluate_zero_shot(model, images, labels, classnames, SHAPES_TEMPLATES, tokenizer, context_length,
                              class_groups={"held_out": held_out, "seen": seen}, **kwargs)
