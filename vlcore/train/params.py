"""Training configuration: one flat dataclass, presets shipped as JSON, and command-line overrides.

``load_config(["--preset", "clip-b16", "--lr", "5e-4", "--model-overrides", '{"vision_cfg": {"tome_r": 8}}'])``
starts from the dataclass defaults, applies the preset file (``presets/<name>.json`` or a path), then an
optional ``--config file.json``, then every ``--field value`` in order. A field that does not exist, or a value
that does not parse as the field's type, raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from vlcore.nvfp4 import NVFP4Policy, NVFP4Recipe
from vlcore.peft import METHODS as PEFT_METHODS
from vlcore.peft import PeftConfig

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A bad configuration: unknown field, unparsable value, or an inconsistent combination."""


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------------
    model: str = "clip-tiny"  # a vlcore.models preset name or a model JSON path
    model_overrides: dict = field(default_factory=dict)  # passed to create_model, e.g. {"text_cfg": {"context_length": 48}}
    impl: str = "vlcore"  # "vlcore": fused kernels where the build has them; "torch": plain PyTorch everywhere
    tome_r: Optional[str] = None  # ToMe tokens merged per layer: "8", "[8, -0.5]" (r, inflect) or a per-layer list
    pool: Optional[str] = None  # vision pooling override: "tok" (class token) or "avg"
    tokenizer: Optional[str] = None  # text_cfg.tokenizer override: "byte" or the path of CLIP's bpe_simple_vocab_16e6.txt.gz
    loss: str = "clip"  # contrastive loss of CLIP models: "clip" (InfoNCE) or "siglip"
    nvfp4: Optional[str] = None  # NVFP4 matmuls: default, all-blocks, no-rht, no-stochastic-rounding, 1d-weights or a JSON NVFP4Policy; none: full precision
    grad_checkpointing: bool = False  # recompute transformer blocks in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile the model
    init_from: Optional[str] = None  # weights to start from: a vlcore checkpoint (dir or model.safetensors), a Hugging Face CLIP/SigLIP folder or an open_clip file; a resumed run ignores it
    peft: str = "none"  # parameter-efficient tuning (docs/peft.md): none, lora, adapter or vl_pet; the base is frozen
    peft_options: dict = field(default_factory=dict)  # PeftConfig fields for --peft, e.g. {"rank": 8, "alpha": 16, "trainable": ["itm_head"]}
    # --- data --------------------------------------------------------------------------------------------
    data: str = "synthetic"  # "synthetic" (embedded shapes), "wds" (WebDataset tars) or "csv" (CSV/TSV)
    train_data: Optional[str] = None  # wds: "/data/shard-{0000..0099}.tar" (brace patterns, "::" joins lists); csv: a file
    val_data: Optional[str] = None  # same formats; None with data=synthetic evaluates on the held-out split
    val_data_type: Optional[str] = None  # "wds", "csv", "karpathy", "clip_benchmark" or "coco" for val_data; defaults to data
    csv_image_key: str = "filepath"  # CSV column with the image path (relative paths: relative to the CSV)
    csv_caption_key: str = "title"  # CSV column with the caption
    wds_image_keys: str = "jpg;png;webp;jpeg"  # tar member extensions tried for the image, in order
    wds_caption_key: str = "txt"  # tar member extension of the caption: "txt", or "json" (then json_caption_field)
    json_caption_field: str = "caption"  # field of the .json member holding the caption (a string or a list)
    synthetic_size: int = 200_000  # samples per epoch of the embedded dataset (generated on the fly)
    synthetic_eval_size: int = 500  # held-out images (every one shows an attribute combination unseen in training)
    workers: int = 2  # dataloader worker processes per rank (decoding, augmentation); 0 = in the main process
    shuffle: bool = True  # shuffle samples (and shards) per epoch, deterministically from seed and epoch
    random_crop: bool = True  # random resized crop (scale 0.9-1) for training images; evaluation centre-crops
    # --- optimisation ------------------------------------------------------------------------------------
    batch_size: int = 128  # global batch per optimizer step (all ranks, all accumulation steps together)
    grad_accum: int = 1  # micro-batches per optimizer step; each is batch_size / (world_size * grad_accum)
    grad_cache: bool = False  # CLIP with grad_accum > 1: GradCache, the full batch's loss and negatives (else each micro-batch contrasts its own)
    steps: int = 1000  # optimizer steps in the run
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only; gains, biases, embeddings of dim < 2 and the logit scale get none
    beta1: float = 0.9
    beta2: float = 0.98  # open_clip's default for ViTs
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm (finite, > 0); 0 turns clipping off
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32"
    seed: int = 0
    # --- evaluation, logging, checkpoints ----------------------------------------------------------------
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    log_every: int = 10  # steps between log lines (and loss records in metrics.jsonl)
    out_dir: str = "runs/default"  # logs, metrics, plots and checkpoints go here
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end and on Ctrl-C)
    keep_checkpoints: int = 2  # the last K checkpoints are kept
    resume: str = "auto"  # "auto": continue from the latest checkpoint in out_dir if any; "none"; or a checkpoint path
    progress: Optional[bool] = None  # tqdm bar (rank 0): none = only when stderr is a terminal; true/false force it
    tensorboard: bool = True  # also write TensorBoard event files
    plot: bool = True  # loss / retrieval PNG at the end
    device: str = "auto"  # "auto": cuda when available, else cpu
    cpu_threads: int = 0  # torch.set_num_threads when training on CPU (0: torch's default, one per core)
    ddp_backend: str = "auto"  # "auto": nccl on CUDA, gloo on CPU
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per transformer block and tower) instead of DDP
    synthetic_benchmark: bool = False  # throughput only: random tensors instead of data, no eval or checkpoints
    # --- what each evaluation measures (docs/evaluation.md) --------------------------------------------------
    val_image_root: Optional[str] = None  # karpathy / clip_benchmark / coco val_data: image folder (default: the annotation file's)
    val_split: str = "test"  # karpathy val_data: the split evaluated ("test", "val", ...)
    itm_rerank_k: int = 16  # fusion models: re-rank each query's ITC top k with the ITM head (0: ITC only)
    caption_samples: int = 64  # captioners: held-out images captioned (greedy or beam) and scored with CIDEr / BLEU-4
    num_beams: int = 1  # captioners: beam width of the evaluation captions (1: greedy)
    zeroshot: str = "auto"  # zero-shot classification (clip/fusion): "shapes", a folder-per-class path, "none"; auto: shapes on synthetic data
    mir_samples: int = 64  # captioners: held-out images whose hidden states give the MIR (0: no MIR)

    def check(self) -> None:
        """Every field's range and the cross-field rules that need no distributed context. Each error names
        the field: a bad value must fail here, before any work, not as NaN losses or a traceback later."""
        choices = {"impl": ("vlcore", "torch"), "loss": ("clip", "siglip"), "data": ("synthetic", "wds", "csv"),
                   "precision": ("auto", "bf16", "fp32"), "pool": (None, "tok", "avg"),
                   "val_data_type": (None, "wds", "csv", "karpathy", "clip_benchmark", "coco"),
                   "peft": ("none",) + PEFT_METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field '{name}': must be one of {list(allowed)}, got {getattr(self, name)!r}")
        positive = ("batch_size", "grad_accum", "steps", "log_every", "keep_checkpoints", "synthetic_size",
                    "synthetic_eval_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}': must be positive, got {getattr(self, name)}")
        for name in ("workers", "cpu_threads", "warmup_steps", "eval_every", "checkpoint_every", "itm_rerank_k",
                     "caption_samples", "mir_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field '{name}': must be >= 0, got {getattr(self, name)}")
        if self.num_beams < 1:
            raise ConfigError(f"config field 'num_beams': must be >= 1, got {self.num_beams}")
        if not self.zeroshot:
            raise ConfigError("config field 'zeroshot': give 'auto', 'shapes', 'none' or a folder-per-class path")
        if self.val_data_type in ("karpathy", "clip_benchmark", "coco") and not self.val_data:
            raise ConfigError(f"config field 'val_data_type': {self.val_data_type!r} needs an annotation file "
                              f"as --val-data")
        # Floats: NaN compares false with everything, so each range is written as what is allowed.
        _check_float("lr", self.lr, "a finite number > 0", lambda v: v > 0)
        _check_float("weight_decay", self.weight_decay, "a finite number >= 0", lambda v: v >= 0)
        _check_float("grad_clip", self.grad_clip, "a finite number > 0, or 0 to turn clipping off", lambda v: v >= 0)
        _check_float("min_lr_ratio", self.min_lr_ratio, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_float("beta1", self.beta1, "in [0, 1)", lambda v: 0 <= v < 1)
        _check_float("beta2", self.beta2, "in [0, 1)", lambda v: 0 <= v < 1)
        _check_float("eps", self.eps, "a finite number > 0", lambda v: v > 0)
        if self.nvfp4 is not None:
            nvfp4_policy(self.nvfp4)  # raises naming the field
        self.check_peft()
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"config field 'device': expected 'auto', 'cpu', 'cuda' or 'cuda:N', "
                                  f"got {self.device!r}") from None
        if self.data in ("wds", "csv") and not self.train_data and not self.synthetic_benchmark:
            raise ConfigError(f"config field 'train_data': data={self.data!r} needs a path")

    def check_peft(self) -> None:
        """``peft_options`` must be PeftConfig fields; --peft with NVFP4 or FSDP is refused (the frozen base
        and the hooks have not been tested under either)."""
        if self.peft == "none":
            if self.peft_options:
                raise ConfigError("config field 'peft_options': given without --peft (lora, adapter or vl_pet)")
            return
        for other in ("nvfp4", "fsdp"):
            if getattr(self, other):
                raise ConfigError(f"config field 'peft': --peft {self.peft} together with --{other} is not supported "
                                  f"(untested); drop one of them")
        try:
            PeftConfig(method=self.peft, **self.peft_options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config field 'peft_options': {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_float(name: str, value: float, allowed: str, ok) -> None:
    if not math.isfinite(value) or not ok(value):
        raise ConfigError(f"config field '{name}': must be {allowed}, got {value}")


#: ``--nvfp4 NAME``: which layers run their matmuls in NVFP4 (docs/nvfp4.md). ``default`` is the paper's
#: recipe: every transformer block's linear layers except each tower's last 15 % of blocks, which stay in
#: high precision because they are the most sensitive to 4-bit. The others are the usual ablations.
NVFP4_POLICIES = {
    "default": (NVFP4Policy(), "the paper's recipe; each tower's last 15 % of blocks stay high precision"),
    "all-blocks": (NVFP4Policy(keep_last_fraction=0.0), "every block's linear layers in NVFP4"),
    "no-rht": (NVFP4Policy(recipe=NVFP4Recipe(rht=False)), "default without the random Hadamard transform"),
    "no-stochastic-rounding": (NVFP4Policy(recipe=NVFP4Recipe(stochastic_rounding=False)),
                               "default with round-to-nearest gradients"),
    "1d-weights": (NVFP4Policy(recipe=NVFP4Recipe(block_2d_weights=False)), "default with 1x16 weight blocks"),
}


def nvfp4_policy(value: str) -> NVFP4Policy:
    """The policy named ``value``, or one written as JSON: ``{"keep_last_fraction": 0.25,
    "keep_first_blocks": 1, "recipe": {"rht": false}}`` (fields of NVFP4Policy and NVFP4Recipe)."""
    if value in NVFP4_POLICIES:
        return NVFP4_POLICIES[value][0]
    usage = f"one of {list(NVFP4_POLICIES)} or a JSON object of NVFP4Policy fields"
    if not value.lstrip().startswith("{"):
        raise ConfigError(f"config field 'nvfp4': expected {usage}, got {value!r}")
    try:
        fields = json.loads(value)
        recipe = NVFP4Recipe(**fields.pop("recipe", {}))
        policy = NVFP4Policy(recipe=recipe, **fields)
        in_range = 0.0 <= policy.keep_last_fraction <= 1.0 and policy.keep_first_blocks >= 0
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise ConfigError(f"config field 'nvfp4': expected {usage}, got {value!r} ({e})") from None
    if not in_range:
        raise ConfigError(f"config field 'nvfp4': keep_last_fraction must be in [0, 1] and keep_first_blocks "
                          f">= 0, got {value!r}")
    return policy


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config field '{name}'{hint}")


def parse_value(name: str, raw):
    """``raw`` (a string from the command line, or a JSON value) as field ``name``'s type."""
    if name not in FIELDS:
        raise _unknown(name)
    hint = _HINTS[name]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if optional and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "auto"))):
        return None
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.replace("_", ""))
        if base is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if base is dict:
            value = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(value, dict):
                raise ValueError
            return value
        if base is str:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError
            return str(raw)
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    else:
        raise AssertionError(f"TrainConfig field {name} has an unsupported type {hint}")
    type_name = getattr(base, "__name__", str(base)) + (" or none" if optional else "")
    raise ConfigError(f"config field '{name}': expected {type_name}, got {raw!r}")


def apply(cfg: TrainConfig, updates: dict, source: str) -> None:
    for key, raw in updates.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{source}: {_unknown(name)}")
        setattr(cfg, name, parse_value(name, raw))


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}: not valid JSON ({e})") from None
    except OSError as e:  # missing, a directory, unreadable: the file the user named, and why
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not a UTF-8 text file ({e.reason})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object of config fields")
    return d


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.json"
    if path.exists():
        return path
    if Path(name).exists():
        return Path(name)
    raise ConfigError(f"unknown preset {name!r}: not one of {list_presets()} nor a JSON file")


def split_argv(argv: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """``["--lr", "1e-3", "--compile", "--steps=5"]`` -> ``[("lr", "1e-3"), ("compile", None), ("steps", "5")]``.
    A flag with no value (followed by another ``--flag`` or nothing) means ``true``."""
    pairs, i = [], 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: options are --field value (see --help)")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = None
            i += 1
        pairs.append((key.replace("-", "_"), value))
    return pairs


def load_config(argv: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- ``--preset`` (default: ``default``) <- ``--config FILE`` <- each ``--field value``."""
    pairs = split_argv(argv)
    for key, value in pairs:
        if key in ("preset", "config") and value is None:
            raise ConfigError(f"--{key} needs a value (--{key} {'NAME' if key == 'preset' else 'FILE.json'})")
    preset = next((v for k, v in pairs if k == "preset"), "default")
    cfg = TrainConfig()
    apply(cfg, _read_json(preset_path(preset), "preset"), f"preset {preset!r}")
    for key, value in pairs:
        if key == "config":
            apply(cfg, _read_json(Path(value), "config file"), f"config file {value}")
    for key, value in pairs:
        if key in ("preset", "config"):
            continue
        if key not in FIELDS:
            raise _unknown(key)
        if value is None and _HINTS[key] not in (bool, Optional[bool]):  # a bare switch means true
            raise ConfigError(f"config field '{key}': needs a value (--{key.replace('_', '-')} VALUE)")
        setattr(cfg, key, parse_value(key, True if value is None else value))
    cfg.check()
    return cfg


def help_text() -> str:
    """``--help``: every field with its default and the comment from this file."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    lines = ["usage: vlcore-train [--preset NAME] [--config FILE.json] [--field VALUE ...]",
             f"presets: {', '.join(list_presets())}", "fields (defaults before the preset):"]
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{name.replace('_', '-'):<22} {default!r:<24} {comments.get(name, '')}")
    lines.append("--nvfp4 values (or a JSON object of NVFP4Policy fields, e.g. '{\"keep_last_fraction\": 0.25}'):")
    for name, (_, what) in NVFP4_POLICIES.items():
        lines.append(f"  {name:<24} {what}")
    return "\n".join(lines)
