"""Evaluation library shared by ``vlcore-eval`` and the trainer (docs/evaluation.md).

Every function takes a model (or its ``encode_image`` / ``encode_text`` / ``generate``), tensors of
preprocessed images and caption lists, and returns a flat ``dict`` of numbers:

- :mod:`~vlcore.evaluation.retrieval`: CLIP_benchmark recall, ITM re-ranking of the ITC top k (fusion models);
- :mod:`~vlcore.evaluation.zeroshot`: zero-shot classification (prompt ensembling, top-1/top-5);
- :mod:`~vlcore.evaluation.captioning`: greedy captions, CIDEr-D / BLEU, shapes attribute accuracy;
- :mod:`~vlcore.evaluation.caption_metrics`: CIDEr-D and BLEU themselves;
- :mod:`~vlcore.evaluation.formats`: Karpathy / CLIP_benchmark / COCO caption files;
- :mod:`~vlcore.evaluation.results`: metrics as JSON lines;
- :mod:`~vlcore.evaluation.suite`: all of it for one model kind (:func:`evaluate_model`) and the report lines.
"""

from vlcore.evaluation.caption_metrics import bleu, cider_d, tokenize_caption
from vlcore.evaluation.captioning import attribute_accuracy, caption_metrics, evaluate_captioning, generate_captions
from vlcore.evaluation.formats import FORMATS, caption_source, load_caption_set
from vlcore.evaluation.results import read_metrics_jsonl, write_metrics_jsonl
from vlcore.evaluation.retrieval import (evaluate_retrieval, fusion_pair_scorer, itm_pair_accuracy, itm_rerank_recall,
                                         retrieval_recall)
from vlcore.evaluation.suite import EvalOptions, EvalResult, evaluate_model, report_lines
from vlcore.evaluation.zeroshot import (SHAPES_TEMPLATES, evaluate_shapes_zero_shot, evaluate_zero_shot, image_folder_set,
                                        zero_shot_classifier)

__all__ = ["bleu", "cider_d", "tokenize_caption", "attribute_accuracy", "caption_metrics", "evaluate_captioning",
           "generate_captions", "FORMATS", "caption_source", "load_caption_set", "read_metrics_jsonl",
           "write_metrics_jsonl", "evaluate_retrieval", "fusion_pair_scorer", "itm_pair_accuracy", "itm_rerank_recall",
           "retrieval_recall", "SHAPES_TEMPLATES", "evaluate_shapes_zero_shot", "evaluate_zero_shot", "image_folder_set",
           "zero_shot_classifier", "EvalOptions", "EvalResult", "evaluate_model", "report_lines"]
