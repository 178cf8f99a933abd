"""One call to tune a vlcore model parameter-efficiently: :func:`apply_peft` freezes the base, attaches the
method's modules to every transformer block (CLIP towers, fusion towers and cross-modal layers, the
captioner's vision tower and LM) and returns a :class:`PeftReport`; :func:`save_peft` / :func:`load_peft`
store only the tuned parameters (safetensors, with the method's configuration in the metadata);
:func:`merge_lora` folds LoRA into the base weights for inference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from vlcore.models.config import _sub_from_dict
from vlcore.nn.transformer import Block
from vlcore.peft.adapters import (GRANULARITIES, SHARING, GranularityGate, SublayerModification, TaskAdapter,
                                  add_value_adapter, modify_sublayer)
from vlcore.peft.lora import add_lora, merge_lora_linear

METHODS = ("lora", "adapter", "vl_pet")
#: The attribute under which a tuned model keeps its configuration.
CONFIG_ATTR = "vlcore_peft_config"
METADATA_KEY = "vlcore_peft"


@dataclass
class PeftConfig:
    """What to attach and what to train.

    - ``lora``: ``rank``, ``alpha``, ``dropout`` on every ``nn.Linear`` inside a block whose name ends with
      one of ``lora_targets`` (attention ``qkv`` / ``out``, cross-attention ``q`` / ``kv`` / ``out``, MLP
      ``fc1`` / ``fc2``).
    - ``adapter`` (VL-Adapter) and ``vl_pet``: bottleneck ``width // reduction`` (or ``bottleneck``);
      ``tasks`` and ``sharing`` (``shared``, ``per_task``, ``half``); VL-PET's ``granularity`` and the
      bottleneck of its ``large`` gate (``gate_bottleneck``, default the adapter's).
    - ``decoder_prefixes``: blocks under these module names are decoders (the captioner's ``lm``): VL-PET
      gives them its decoder design, the other methods treat them like any block.
    - ``train_norms``: LayerNorms stay trainable (default: on for the adapter methods, as both papers
      train them; off for LoRA). ``trainable``: further parameter-name substrings kept trainable (task
      heads, e.g. ``"itm_head"``).
    """

    method: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lora_targets: tuple = ("attn.qkv", "attn.out", "cross.q", "cross.kv", "cross.out", "mlp.fc1", "mlp.fc2")
    reduction: int = 8
    bottleneck: int = 0
    tasks: tuple = ()
    sharing: str = "shared"
    granularity: str = "large"
    gate_bottleneck: int = 0
    decoder_prefixes: tuple = ("lm",)
    train_norms: Optional[bool] = None
    trainable: tuple = ()

    def __post_init__(self):
        where = "PeftConfig"
        if self.method not in METHODS:
            raise ValueError(f"{where}: method must be one of {METHODS}, got {self.method!r}")
        for name in ("lora_targets", "tasks", "decoder_prefixes", "trainable"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.rank <= 0 or self.reduction <= 0 or self.bottleneck < 0 or self.gate_bottleneck < 0:
            raise ValueError(f"{where}: rank and reduction must be positive, bottleneck sizes non-negative")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.sharing not in SHARING:
            raise ValueError(f"{where}: sharing must be one of {SHARING}, got {self.sharing!r}")
        if self.sharing != "shared" and not self.tasks:
            raise ValueError(f"{where}: sharing {self.sharing!r} needs the task names (tasks=...)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"{where}: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.train_norms is None:
            self.train_norms = self.method != "lora"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        return _sub_from_dict(cls, d, "PeftConfig")


@dataclass
class PeftReport:
    """Trainable and total parameter counts after :func:`apply_peft` (PEFT modules included in the total)."""

    method: str
    trainable: int
    total: int
    modified_modules: int
    trainable_names: list = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"{self.method}: {self.trainable:,} of {self.total:,} parameters trainable "
                f"({100 * self.fraction:.3f} %), {self.modified_modules} modules modified")


def _blocks(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]


def _is_decoder(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _bottleneck(cfg: PeftConfig, width: int) -> int:
    return cfg.bottleneck or max(1, width // cfg.reduction)


def _apply_lora(model: nn.Module, cfg: PeftConfig) -> list[nn.Module]:
    added = []
    for block_name, block in _blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in cfg.lora_targets):
                added.append(add_lora(module, cfg.rank, cfg.alpha, cfg.dropout))
    return added


def _apply_adapters(model: nn.Module, cfg: PeftConfig) -> list[nn.Module]:
    added = []
    for block_name, block in _blocks(model):
        width = block.norm1.normalized_shape[0]
        bottleneck = _bottleneck(cfg, width)
        if cfg.method == "vl_pet" and _is_decoder(block_name, cfg.decoder_prefixes):
            value_width = block.attn.num_kv_heads * block.attn.head_dim
            added.append(add_value_adapter(block.attn.qkv, value_width, bottleneck, cfg.tasks, cfg.sharing))
            continue
        for sublayer in (block.attn, block.mlp):
            gate = None
            if cfg.method == "vl_pet":
                gate = GranularityGate(width, cfg.granularity, cfg.gate_bottleneck or bottleneck)
            modification = SublayerModification(TaskAdapter(width, bottleneck, cfg.tasks, cfg.sharing), gate)
            reference = next(sublayer.parameters())
            modification.to(device=reference.device, dtype=reference.dtype)
            modify_sublayer(sublayer, modification)
            added.append(modification)
    return added


def apply_peft(model: nn.Module, config: Union[PeftConfig, dict, str], **options) -> PeftReport:
    """Freeze ``model`` and attach the method of ``config`` (a :class:`PeftConfig`, its dict, or a method name
    with ``options``), in place. Returns the report of trainable parameters. Raises ``ValueError`` on a
    model that is already tuned or has no transformer block."""
    if isinstance(config, str):
        config = PeftConfig(method=config, **options)
    elif isinstance(config, dict):
        config = PeftConfig.from_dict({**config, **options})
    elif options:
        raise ValueError("apply_peft: pass options either in the PeftConfig or as keywords, not both")
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("apply_peft: the model is already tuned; merge or rebuild it first")
    if not _blocks(model):
        raise ValueError("apply_peft: the model has no vlcore transformer block to tune")
    names = [name for name, _ in model.named_parameters()]
    unmatched = [s for s in config.trainable if not any(s in name for name in names)]
    if unmatched:
        raise ValueError(f"apply_peft: trainable patterns {unmatched} match no parameter of the model")
    added = _apply_lora(model, config) if config.method == "lora" else _apply_adapters(model, config)
    if not added:
        raise ValueError(f"apply_peft: lora_targets {list(config.lora_targets)} match no linear layer of a block")
    model.requires_grad_(False)
    for module in added:
        module.requires_grad_(True)
    if config.train_norms:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
    for name, p in model.named_parameters():
        if any(s in name for s in config.trainable):
            p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    return peft_report(model, modified_modules=len(added))


def peft_report(model: nn.Module, modified_modules: Optional[int] = None) -> PeftReport:
    """The trainable / total parameter counts of ``model`` as it stands."""
    config = getattr(model, CONFIG_ATTR, None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if modified_modules is None:
        modified_modules = sum(1 for m in model.modules()
                               if isinstance(m, (SublayerModification,)) or hasattr(m, "lora")
                               or hasattr(m, "value_adapter"))
    return PeftReport(config.method if config is not None else "none", trainable, total, modified_modules, names)


def set_active_task(model: nn.Module, task: str) -> None:
    """Select which task's adapters run (VL-Adapter's per-task and half-shared adapters)."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or config.method == "lora":
        raise ValueError("set_active_task: the model carries no adapters")
    if config.tasks and task not in config.tasks:
        raise ValueError(f"set_active_task: unknown task {task!r}; tasks are {list(config.tasks)}")
    for module in model.modules():
        if isinstance(module, TaskAdapter):
            module.active_task = task


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tuned parameters alone (every parameter that is trainable), by their names in ``model``."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_peft(model: nn.Module, path: Union[str, Path]) -> None:
    """Write the tuned parameters and the method's configuration to a safetensors file."""
    from safetensors.torch import save_file

    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("save_peft: the model is not tuned (call apply_peft first)")
    tensors = {name: t.cpu().contiguous() for name, t in peft_state_dict(model).items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(config.to_dict())})


def read_peft_config(path: Union[str, Path]) -> PeftConfig:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"load_peft: {path} is not a vlcore PEFT file (no {METADATA_KEY!r} metadata)")
    return PeftConfig.from_dict(json.loads(metadata[METADATA_KEY]))


@torch.no_grad()
def load_peft(model: nn.Module, path: Union[str, Path]) -> PeftReport:
    """Load tuned parameters saved by :func:`save_peft` into ``model`` (the base model: the method is applied
    first from the file's configuration; or a model already tuned with the same configuration). Raises
    ``ValueError`` naming missing, unexpected or mis-shaped tensors."""
    from safetensors.torch import load_file

    saved_config = read_peft_config(path)
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        apply_peft(model, saved_config)
    elif config != saved_config:
        raise ValueError(f"load_peft: the model is tuned with {config}, the file with {saved_config}")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    expected = set(peft_state_dict(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"load_peft: {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise ValueError(f"load_peft: {name} has shape {tuple(value.shape)} in {path}, "
                             f"{tuple(params[name].shape)} in the model")
        params[name].copy_(value)
    return peft_report(model)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight (for inference) and remove the LoRA modules; the model is
    then a plain model again (no longer marked as tuned). Returns the number of merged layers."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or config.method != "lora":
        raise ValueError("merge_lora: the model carries no LoRA updates")
    merged = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Linear) and hasattr(module, "lora"):
            merge_lora_linear(module)
            merged += 1
    setattr(model, CONFIG_ATTR, None)
    return merged


__all__ = ["PeftConfig", "PeftReport", "apply_peft", "peft_report", "set_active_task", "peft_state_dict",
           "save_peft", "load_peft", "read_peft_config", "merge_lora", "METHODS"]
