"""Parameter-efficient tuning (vlcore/peft): LoRA merged == unmerged, frozen parameters unchanged by a step,
trainable counts against a hand count, save/load round trip, VL-PET's gates and decoder design written out
in plain torch, VL-Adapter's task sharing, and every model kind trains with each method."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vlcore.models import create_model
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.nn.transformer import Block
from vlcore.packing import build_packed_batch
from vlcore.peft import PeftConfig, apply_peft, load_peft, merge_lora, peft_report, save_peft, set_active_task
from vlcore.peft.adapters import GranularityGate, SublayerModification, TaskAdapter, modify_sublayer

from ..conftest import DEVICES

TOK = ByteTokenizer()
CAPTIONS = ["a red square", "two blue dots", "x", "a green line on grey"]


def _clip_inputs(model, n=3):
    return torch.randn(n, 3, model.image_size, model.image_size), TOK(CAPTIONS[:n], model.context_length)


def _clip_out(model, images, tokens):
    out = model(images, tokens)
    return torch.cat([out["image_features"], out["text_features"]])


def _perturb(model, std=0.05):
    """Stand in for training: move every tuned parameter away from its initialisation."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


@pytest.mark.parametrize("device", DEVICES)
def test_lora_starts_as_the_base_and_merges_to_the_unmerged_forward(device):
    model = create_model("clip-tiny", impl="torch").double().to(device)
    base_keys = set(model.state_dict())
    images, tokens = _clip_inputs(model)
    images, tokens = images.double().to(device), tokens.to(device)
    with torch.no_grad():
        before = _clip_out(model, images, tokens)
        apply_peft(model, "lora", rank=4, alpha=8.0)
        torch.testing.assert_close(_clip_out(model, images, tokens), before, rtol=0, atol=0)  # B = 0
        _perturb(model)
        unmerged = _clip_out(model, images, tokens)
        assert (unmerged - before).abs().max() > 1e-3
        assert merge_lora(model) == 4 * 4  # qkv, out, fc1, fc2 in 2 + 2 blocks
        merged = _clip_out(model, images, tokens)
    torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-12)
    assert set(model.state_dict()) == base_keys  # plain model again: no LoRA modules, no hooks
    assert all(not m._forward_hooks for m in model.modules())


def test_merged_weight_is_w_plus_scaled_ba():
    model = create_model("clip-tiny", impl="torch").double()
    linear = model.visual.blocks[0].mlp.fc1
    w = linear.weight.detach().clone()
    apply_peft(model, "lora", rank=2, alpha=6.0)
    _perturb(model)
    a, b = linear.lora.down.weight.detach().clone(), linear.lora.up.weight.detach().clone()
    merge_lora(model)
    torch.testing.assert_close(linear.weight.detach(), w + (6.0 / 2) * b @ a, rtol=1e-12, atol=1e-12)


def test_trainable_count_and_fraction_match_a_hand_count():
    model = create_model("clip-tiny", impl="torch")
    base_total = sum(p.numel() for p in model.parameters())
    r = 8
    report = apply_peft(model, "lora", rank=r)
    # Per block (width 64, MLP 256): qkv 64->192, out 64->64, fc1 64->256, fc2 256->64; 4 blocks.
    per_block = r * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert report.trainable == 4 * per_block
    assert report.total == base_total + 4 * per_block
    assert report.fraction == pytest.approx(4 * per_block / (base_total + 4 * per_block))
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(".lora." in n for n in report.trainable_names)
    assert "lora" in str(report) and "%" in str(report)


def test_frozen_parameters_are_unchanged_after_an_optimizer_step():
    model = create_model("bridgetower-tiny", impl="torch")
    apply_peft(model, "adapter", trainable=("itm_head",))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and tuned and any(n.startswith("itm_head") for n in tuned)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all of them, on purpose
    images, tokens = _clip_inputs(model, 4)
    model(images, tokens)["loss"].backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p.detach(), frozen[n]), n
    assert sum(not torch.equal(p.detach(), tuned[n]) for n, p in model.named_parameters() if n in tuned) > len(tuned) // 2


@pytest.mark.parametrize("method,options", [("lora", {}), ("adapter", {}), ("vl_pet", {"granularity": "middle_x"})])
def test_save_load_round_trip(tmp_path, method, options):
    torch.manual_seed(0)
    base = create_model("captioner-tiny", impl="torch")
    model = copy.deepcopy(base)
    apply_peft(model, method, **options)
    _perturb(model)
    path = tmp_path / "tuned.safetensors"
    save_peft(model, path)
    samples = [model.sample([*TOK.encode(c), TOK.eot_id]) for c in CAPTIONS[:2]]
    batch = build_packed_batch(samples, image_token_id=model.image_token_id)
    images = torch.randn(2, 3, model.image_size, model.image_size)
    restored = copy.deepcopy(base)
    report = load_peft(restored, path)
    assert report.trainable == peft_report(model).trainable
    with torch.no_grad():
        torch.testing.assert_close(restored(batch, images)["loss"], model(batch, images)["loss"], rtol=0, atol=0)
    # Saved: the tuned parameters alone.
    from safetensors.torch import load_file
    assert set(load_file(str(path))) == {n for n, p in model.named_parameters() if p.requires_grad}
    other = copy.deepcopy(base)
    apply_peft(other, "lora", rank=2)
    with pytest.raises(ValueError, match="tuned with"):
        load_peft(other, path)


def _written_out_block(block, x, granularity):
    """A pre-LN block whose attention and MLP outputs pass through VL-PET's encoder design, in plain torch
    (the sub-layers' own forward, which skips the hooks)."""
    def modify(sublayer, u, h):
        mod = sublayer.peft_modification
        ad = mod.adapter
        h = h + ad.up["shared"](F.gelu(ad.down["shared"](h)))
        gate = mod.gate
        if granularity == "large":
            g = torch.sigmoid(gate.up(F.gelu(gate.down(u))))
        elif granularity == "middle_x":
            g = torch.sigmoid(u @ gate.proj.weight.T + gate.proj.bias + h @ gate.proj.weight.T)
        elif granularity == "middle_y":
            g = 1 + gate.scale
        else:
            g = torch.sigmoid(torch.cat([u, h], -1) @ gate.proj.weight.T + gate.proj.bias).mean(1, keepdim=True)
        return g * h

    u = block.norm1(x)
    x = x + modify(block.attn, u, block.attn.forward(u))
    u = block.norm2(x)
    return x + modify(block.mlp, u, block.mlp.forward(u))


@pytest.mark.parametrize("granularity", ["large", "middle_x", "middle_y", "small"])
def test_vl_pet_encoder_design_equals_plain_torch(granularity):
    block = Block(16, 2, impl="torch").double()
    cfg = PeftConfig("vl_pet", granularity=granularity, bottleneck=4)
    for sublayer in (block.attn, block.mlp):
        modify_sublayer(sublayer, SublayerModification(TaskAdapter(16, 4), GranularityGate(16, granularity, 4)).double())
    _perturb(block)  # every parameter: the zero-initialised adapter ups too
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _written_out_block(block, x, granularity), rtol=1e-12, atol=1e-12)
    assert cfg.train_norms  # the adapter methods train LayerNorms, as both papers do
    gate = block.attn.peft_modification.gate
    h = torch.randn(3, 5, 16, dtype=torch.float64)
    shape = {"large": (3, 5, 16), "middle_x": (3, 5, 1), "middle_y": (16,), "small": (3, 1, 1)}[granularity]
    assert tuple(gate(x, h).shape) == shape


def test_vl_pet_small_refuses_packed_states():
    gate = GranularityGate(8, "small", 4)
    with pytest.raises(ValueError, match="small"):
        gate(torch.randn(10, 8), torch.randn(10, 8))


def test_vl_pet_decoder_design_touches_only_the_values():
    model = create_model("captioner-tiny", impl="torch").double()
    apply_peft(model, "vl_pet")
    qkv = model.lm.blocks[0].attn.qkv
    assert hasattr(qkv, "value_adapter") and not hasattr(model.lm.blocks[0].attn, "peft_modification")
    assert hasattr(model.visual.blocks[0].attn, "peft_modification")  # the vision tower gets the encoder design
    _perturb(model)
    x = torch.randn(7, qkv.in_features, dtype=torch.float64)
    with torch.no_grad():
        plain = F.linear(x, qkv.weight, qkv.bias)
        got = qkv(x)
        adapter = qkv.value_adapter
        value = adapter.up["shared"](F.gelu(adapter.down["shared"](x)))
    width = value.shape[-1]
    torch.testing.assert_close(got[:, :-width], plain[:, :-width], rtol=0, atol=0)
    torch.testing.assert_close(got[:, -width:], plain[:, -width:] + value, rtol=1e-12, atol=1e-12)


def test_adapter_task_sharing():
    tasks = ("vqa", "caption")
    shared = TaskAdapter(8, 2, tasks, "shared")
    per_task = TaskAdapter(8, 2, tasks, "per_task")
    half = TaskAdapter(8, 2, tasks, "half")
    assert set(shared.down) == set(shared.up) == {"shared"}
    assert set(per_task.down) == set(per_task.up) == set(tasks)
    assert set(half.down) == {"shared"} and set(half.up) == set(tasks)
    model = create_model("clip-tiny", impl="torch")
    apply_peft(model, "adapter", tasks=tasks, sharing="half")
    _perturb(model)
    images, tokens = _clip_inputs(model)
    with torch.no_grad():
        set_active_task(model, "vqa")
        vqa = _clip_out(model, images, tokens)
        set_active_task(model, "caption")
        caption = _clip_out(model, images, tokens)
    assert (vqa - caption).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown task"):
        set_active_task(model, "nlvr")
    with pytest.raises(ValueError, match="needs the task names"):
        PeftConfig("adapter", sharing="per_task")


def test_adapters_start_as_the_base_model():
    model = create_model("clip-tiny", impl="torch")
    images, tokens = _clip_inputs(model)
    with torch.no_grad():
        before = _clip_out(model, images, tokens)
        apply_peft(model, "adapter")
        torch.testing.assert_close(_clip_out(model, images, tokens), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["clip-tiny", "fiber-tiny", "bridgetower-tiny", "managertower-tiny", "captioner-tiny"])
@pytest.mark.parametrize("method", ["lora", "adapter", "vl_pet"])
def test_every_model_kind_trains_only_its_tuned_parameters(name, method):
    model = create_model(name, impl="vlcore")
    report = apply_peft(model, method)
    assert 0 < report.fraction < 0.5 and report.modified_modules > 0
    images = torch.randn(4, 3, model.image_size, model.image_size)
    if name == "captioner-tiny":
        samples = [model.sample([*TOK.encode(c), TOK.eot_id]) for c in CAPTIONS]
        loss = model(build_packed_batch(samples, image_token_id=model.image_token_id), images)["loss"]
    elif name == "clip-tiny":
        out = model(images, TOK(CAPTIONS, model.context_length))
        loss = -(out["image_features"] * out["text_features"]).sum()
    else:
        loss = model(images, TOK(CAPTIONS, model.context_length))["loss"]
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="method"):
        PeftConfig("prefix")
    with pytest.raises(ValueError, match="granularity"):
        PeftConfig("vl_pet", granularity="x_small")
    with pytest.raises(ValueError, match="rank"):
        PeftConfig("lora", rank=0)
    model = create_model("clip-tiny", impl="torch")
    apply_peft(model, "lora")
    with pytest.raises(ValueError, match="already tuned"):
        apply_peft(model, "adapter")
    with pytest.raises(ValueError, match="no vlcore transformer block"):
        apply_peft(torch.nn.Linear(3, 3), "lora")
    with pytest.raises(ValueError, match="lora_targets"):
        apply_peft(create_model("clip-tiny", impl="torch"), "lora", lora_targets=("attn.qkvv",))
    with pytest.raises(ValueError, match="trainable patterns"):
        apply_peft(create_model("clip-tiny", impl="torch"), "adapter", trainable=("itm_head",))
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(create_model("clip-tiny", impl="torch"))
