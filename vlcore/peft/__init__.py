"""Parameter-efficient tuning of vlcore's models: LoRA, VL-Adapter's bottleneck adapters and VL-PET's
granularity-controlled modifications, applied with one call to any model built from vlcore's transformer
blocks (CLIP towers, FIBER / BridgeTower / ManagerTower fusion, the captioner).

```python
from vlcore.peft import apply_peft, save_peft, load_peft, merge_lora

report = apply_peft(model, "lora", rank=8, alpha=16)        # base frozen, LoRA on attention and MLP linears
print(report)                                               # trainable / total parameters, modules modified
...train...
save_peft(model, "tuned.safetensors")                       # only the tuned parameters, plus the config
load_peft(fresh_base_model, "tuned.safetensors")            # applies the method, then loads
merge_lora(model)                                           # W += (alpha / r) B A; plain nn.Linear again
apply_peft(model, "vl_pet", granularity="large")            # VL-PET encoder design; decoder design on model.lm
apply_peft(model, "adapter", tasks=("vqa", "caption"), sharing="half")   # VL-Adapter, half-shared
```

**Why not the ``peft`` library for LoRA.** ``peft`` (Hugging Face) does LoRA on ``nn.Linear`` well, but it
would bring ``transformers``, ``accelerate`` and ``huggingface_hub`` into a project whose dependencies are
torch and numpy, for about sixty lines of code here (vlcore/peft/lora.py); it wraps the model in its own
``PeftModel`` (changing every parameter name and the forward signature the trainer calls); and it has no
VL-Adapter sharing or VL-PET gates, so the three methods would need two mechanisms for applying, reporting,
saving and merging. vlcore's own LoRA keeps base parameter names (a base checkpoint still loads), saves
with the same safetensors format as the adapters, and is tested against the unmerged forward.
"""

from vlcore.peft.tuning import (METHODS, PeftConfig, PeftReport, apply_peft, load_peft, merge_lora, peft_report,
                                peft_state_dict, read_peft_config, save_peft, set_active_task)

__all__ = ["PeftConfig", "PeftReport", "apply_peft", "peft_report", "set_active_task", "peft_state_dict",
           "save_peft", "load_peft", "read_peft_config", "merge_lora", "METHODS"]
