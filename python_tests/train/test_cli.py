"""Every command-line switch, from the command line: each one runs a tiny training (or fails with one line
naming the field), and each command-line error prints one line, exits non-zero and shows no traceback.

The switch table must list every TrainConfig field: adding a field without a test here fails
``test_the_switch_table_covers_every_field``.
"""

import csv
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from vlcore.train import checkpoint as ckpt
from vlcore.train import cli
from vlcore.train.builders import build_model
from vlcore.train.params import FIELDS, load_config, parse_value

from .helpers import TINY, assert_one_line, clean_samples, cli_error, png_bytes, read_metrics, write_shard

CAPTIONER = ["--model", "captioner-tiny", "--model-overrides",
             '{"vision_cfg": {"image_size": 16, "patch_size": 4}, "connector_cfg": {"output_hw": [2, 2]}}']


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """A CSV (columns img / cap) and two WebDataset shards (png + json captions in field "text")."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(12):
        (root / f"{i}.png").write_bytes(png_bytes(i))
        rows.append({"img": f"{i}.png", "cap": f"caption {i}"})
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["img", "cap"])
        writer.writeheader()
        writer.writerows(rows)
    samples = [(key, image, "json", json.dumps({"text": f"caption {key}"}).encode())
               for key, image, _, _ in clean_samples(16)]
    write_shard(root / "shard-0.tar", samples[:8])
    write_shard(root / "shard-1.tar", samples[8:])
    # --init-from: the weights of the tiny model the switch runs train (a vlcore model.safetensors)
    model, _ = build_model(load_config(TINY))
    save_model(model, str(root / "init.safetensors"))
    # A Karpathy split file whose images live in images/ under another root: 6 test, 6 val images.
    (root / "images").mkdir()
    for i in range(12):
        (root / "images" / f"{i}.png").write_bytes(png_bytes(i))
    karpathy = {"images": [{"filename": f"{i}.png", "split": "test" if i < 6 else "val",
                            "sentences": [{"raw": f"caption {i}"}, {"raw": f"image {i}"}]} for i in range(12)]}
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    return {"csv": str(root / "data.csv"), "wds": str(root / "shard-{0..1}.tar"),
            "karpathy": str(root / "karpathy.json"), "images": str(root / "images"),
            "init": str(root / "init.safetensors")}


def _wds(files):
    return ["--data", "wds", "--train-data", files["wds"], "--wds-caption-key", "json", "--json-caption-field", "text"]


def _csv(files):
    return ["--data", "csv", "--train-data", files["csv"], "--csv-image-key", "img", "--csv-caption-key", "cap"]


# field -> the switches that exercise it (with whatever else it needs); files -> the data fixture
SWITCHES = {
    "model": lambda files: ["--model", "fiber-tiny"],
    "model_overrides": lambda files: ["--model-overrides", '{"embed_dim": 32, "text_cfg": {"context_length": 32}}'],
    "impl": lambda files: ["--impl", "torch"],
    "tome_r": lambda files: ["--tome-r", "[1, -0.5]"],
    "pool": lambda files: ["--pool", "avg"],
    "tokenizer": lambda files: ["--tokenizer", "byte"],
    "loss": lambda files: ["--loss", "siglip"],
    "nvfp4": lambda files: ["--nvfp4", "default"],
    "grad_checkpointing": lambda files: ["--grad-checkpointing"],
    "compile": None,  # slow on CPU: test_compile_switch below
    "init_from": lambda files: ["--init-from", files["init"]],
    "peft": lambda files: ["--peft", "lora"],
    "peft_options": lambda files: ["--peft", "vl_pet", "--peft-options", '{"granularity": "small", "reduction": 4}'],
    "data": lambda files: _csv(files),
    "train_data": lambda files: _wds(files),
    "val_data": lambda files: ["--val-data", files["csv"], "--val-data-type", "csv", "--csv-image-key", "img",
                               "--csv-caption-key", "cap"],
    "val_data_type": lambda files: ["--val-data", files["wds"], "--val-data-type", "wds", "--wds-caption-key",
                                    "json", "--json-caption-field", "text"],
    "csv_image_key": lambda files: _csv(files),
    "csv_caption_key": lambda files: _csv(files),
    "wds_image_keys": lambda files: _wds(files) + ["--wds-image-keys", "webp;png"],
    "wds_caption_key": lambda files: _wds(files),
    "json_caption_field": lambda files: _wds(files),
    "synthetic_size": lambda files: ["--synthetic-size", "8"],
    "synthetic_eval_size": lambda files: ["--synthetic-eval-size", "4"],
    "workers": lambda files: ["--workers", "1"],
    "shuffle": lambda files: ["--shuffle", "false"],
    "random_crop": lambda files: ["--random-crop", "false"],
    "batch_size": lambda files: ["--batch-size", "4"],
    "grad_accum": lambda files: ["--grad-accum", "2"],
    "grad_cache": lambda files: ["--grad-accum", "2", "--grad-cache"],
    "steps": lambda files: ["--steps", "2"],
    "lr": lambda files: ["--lr", "5e-4"],
    "min_lr_ratio": lambda files: ["--min-lr-ratio", "0.1"],
    "warmup_steps": lambda files: ["--warmup-steps", "0"],
    "weight_decay": lambda files: ["--weight-decay", "0"],
    "beta1": lambda files: ["--beta1", "0.8"],
    "beta2": lambda files: ["--beta2", "0.95"],
    "eps": lambda files: ["--eps", "1e-8"],
    "grad_clip": lambda files: ["--grad-clip", "0"],
    "precision": lambda files: ["--precision", "bf16"],
    "seed": lambda files: ["--seed", "3"],
    "eval_every": lambda files: ["--steps", "2", "--eval-every", "1"],
    "log_every": lambda files: ["--steps", "2", "--log-every", "2"],
    "out_dir": lambda files: [],  # every case passes --out-dir
    "checkpoint_every": lambda files: ["--steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "1"],
    "keep_checkpoints": lambda files: ["--steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "2"],
    "resume": lambda files: ["--resume", "none"],
    "progress": lambda files: ["--progress", "true"],
    "tensorboard": lambda files: ["--tensorboard", "true"],
    "plot": lambda files: ["--plot", "true"],
    "device": lambda files: ["--device", "cpu"],
    "cpu_threads": lambda files: ["--cpu-threads", "1"],
    "ddp_backend": lambda files: ["--ddp-backend", "gloo"],
    "fsdp": lambda files: ["--fsdp"],  # one process: no sharding, the run must still work
    "synthetic_benchmark": lambda files: ["--synthetic-benchmark"],
    "val_image_root": lambda files: ["--val-data", files["karpathy"], "--val-data-type", "karpathy",
                                     "--val-image-root", files["images"]],
    "val_split": lambda files: ["--val-data", files["karpathy"], "--val-data-type", "karpathy",
                                "--val-image-root", files["images"], "--val-split", "val"],
    "itm_rerank_k": lambda files: ["--model", "fiber-tiny", "--itm-rerank-k", "3"],
    "caption_samples": lambda files: CAPTIONER + ["--caption-samples", "2"],
    "num_beams": lambda files: CAPTIONER + ["--caption-samples", "2", "--num-beams", "2"],
    "zeroshot": lambda files: ["--zeroshot", "none"],
    "mir_samples": lambda files: CAPTIONER + ["--mir-samples", "4"],
}


def test_the_switch_table_covers_every_field():
    assert set(SWITCHES) == set(FIELDS)


@pytest.mark.parametrize("field", [f for f, make in SWITCHES.items() if make is not None])
def test_every_switch_runs_from_the_command_line(field, data_files, tmp_path, monkeypatch, capsys):
    argv = TINY + ["--steps", "1"] + SWITCHES[field](data_files) + ["--out-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["vlcore-train", *argv])
    cli.train_cli()  # the console entry point: it would exit non-zero on any error
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == parse_value("steps", _last_value(argv, "--steps"))
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    # The switch reached the run: the config the run wrote down has the value from the command line.
    written = json.loads((tmp_path / "config.json").read_text())
    flag = f"--{field.replace('_', '-')}"
    if flag in argv:
        assert written[field] == parse_value(field, _last_value(argv, flag))


def _last_value(argv: list, flag: str):
    """The value of the last ``flag`` in ``argv`` (True for a bare boolean switch), as load_config reads it."""
    i = len(argv) - 1 - argv[::-1].index(flag)
    return True if i + 1 == len(argv) or argv[i + 1].startswith("--") else argv[i + 1]


def test_compile_switch(tmp_path, monkeypatch):
    """--compile wraps the model in torch.compile; dynamo's eager backend keeps the test fast on CPU (the
    default inductor backend generates and compiles C++ for minutes)."""
    compiled = []

    def compile_eagerly(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager", **kwargs)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    summary = cli.main(TINY + ["--steps", "2", "--compile", "--out-dir", str(tmp_path)])
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"])) and len(compiled) == 1


def test_other_command_line_forms(tmp_path, capsys, data_files):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"steps": 1, "lr": 2e-3}))
    summary = cli.main(["--preset", "default", "--config", str(config)] + TINY + ["--steps", "1", "--out-dir",
                                                                                str(tmp_path / "run")])
    assert summary["steps"] == 1
    assert cli.main(["--help"]) == {} and "--nvfp4 values" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["device", "config", "csv", "val_csv", "shards", "synthetic_size", "csv_rows",
                                  "out_dir_file", "nvfp4", "lr"])
def test_command_line_errors_are_one_line(case, tmp_path, monkeypatch, capsys, data_files):
    argv = {
        "device": ["--device", "cuda"],
        "config": ["--config", str(tmp_path / "missing.json")],
        "csv": ["--data", "csv", "--train-data", str(tmp_path / "missing.csv")],
        "val_csv": ["--val-data", str(tmp_path / "missing.csv"), "--val-data-type", "csv"],
        "shards": ["--data", "wds", "--train-data", str(tmp_path / "s-{0..3}.tar")],
        "synthetic_size": ["--synthetic-size", "4", "--batch-size", "8"],
        "csv_rows": _csv(data_files) + ["--batch-size", "16"],
        "out_dir_file": ["--out-dir", str(data_files["csv"]) + "/run"],
        "nvfp4": ["--nvfp4", "fp4"],
        "lr": ["--lr", "nan"],
    }[case]
    if case == "device" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    needle = {"device": "config field 'device': cuda:0 requested but", "config": "missing.json: No such file",
              "csv": "config field 'train_data': ", "val_csv": "config field 'val_data': ",
              "shards": "4 of 4 shards do not exist", "synthetic_size": "config field 'synthetic_size': 4 samples",
              "csv_rows": "config field 'train_data': 12 samples are fewer than one batch (16",
              "out_dir_file": "config field 'out_dir': cannot write to", "nvfp4": "config field 'nvfp4'",
              "lr": "config field 'lr': must be a finite number > 0, got nan"}[case]
    code, err = cli_error(monkeypatch, capsys, TINY + ["--steps", "1", "--out-dir", str(tmp_path / "run")] + argv)
    assert code == 2
    assert_one_line(err, "vlcore-train: error: ", needle)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_out_dir(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    code, err = cli_error(monkeypatch, capsys, TINY + ["--steps", "1", "--out-dir", str(locked / "run")])
    assert code == 2
    assert_one_line(err, "config field 'out_dir': cannot write to", "Permission denied")


def test_read_only_out_dir(tmp_path, monkeypatch, capsys):
    """A read-only file system (simulated: root could write into a chmod-ed directory)."""
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    code, err = cli_error(monkeypatch, capsys, TINY + ["--steps", "1", "--out-dir", str(tmp_path / "run")])
    assert code == 2
    assert_one_line(err, "config field 'out_dir': cannot write to", "Read-only file system")


def test_full_disk_during_a_checkpoint(tmp_path, monkeypatch, capsys):
    """The disk fills up while the second checkpoint is written: one line, exit 1, the first checkpoint intact
    and no temporary directory left; a rerun with space again resumes and finishes."""
    argv = TINY + ["--steps", "4", "--checkpoint-every", "2", "--out-dir", str(tmp_path)]
    real_write, calls = ckpt._write_files, []

    def fills_up(tmp, *args, **kwargs):
        calls.append(tmp)
        if len(calls) == 2:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_write(tmp, *args, **kwargs)

    monkeypatch.setattr(ckpt, "_write_files", fills_up)
    code, err = cli_error(monkeypatch, capsys, argv)
    assert code == 1
    assert_one_line(err, "vlcore-train: error: No space left on device (checkpoint step_00000004 not written",
                     "previous checkpoints are intact")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
    monkeypatch.undo()
    assert cli.main(argv)["steps"] == 4
    assert sorted(read_metrics(tmp_path)) == [1, 2, 3, 4]


def test_diverged_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A NaN loss at step 4: exit 1 with one line naming the step; the step-2 checkpoint is the latest and
    is finite (the run did not save the diverged weights over it)."""
    from vlcore.train import loop

    real_loss, calls = loop.compute_loss, []

    def diverges(*args, **kwargs):
        calls.append(1)
        loss, terms = real_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) >= 4 else loss), terms

    monkeypatch.setattr(loop, "compute_loss", diverges)
    argv = TINY + ["--steps", "6", "--checkpoint-every", "2", "--log-every", "5", "--out-dir", str(tmp_path)]
    code, err = cli_error(monkeypatch, capsys, argv)
    assert code == 1
    assert_one_line(err, "the loss or gradients became NaN or infinite at step 4", "step_00000002")
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_00000002"
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(latest / "model.safetensors").values())


def test_the_real_command_line(tmp_path):
    """`python -m vlcore.train` itself: the documented `--nvfp4 default` trains; an error is one line."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "vlcore.train", *TINY, "--nvfp4", "default", "--steps", "1",
                          "--out-dir", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--nvfp4 default: NVFP4 convert:" in run.stdout + run.stderr
    bad = subprocess.run([sys.executable, "-m", "vlcore.train", "--device", "cuda", "--out-dir", str(tmp_path / "b")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert_one_line(bad.stderr, "vlcore-train: error: config field 'device'")


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self):
        return True


@pytest.mark.parametrize("setting, terminal, bar", [
    (None, False, False), (None, True, True),  # unset: a bar only on a terminal
    ("true", False, True), ("false", True, False),  # --progress forces it either way
])
def test_progress_bar_only_on_a_terminal_unless_forced(setting, terminal, bar, tmp_path, monkeypatch):
    """stdout and stderr share one stream, as with `2>&1 > log`. Without a bar the stream holds log lines
    only; with one, every log line still stands whole on its own line (tqdm erases the bar, writes the
    line, redraws the bar)."""
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(sys, "stderr", stream)
    i = TINY.index("--progress")
    argv = TINY[:i] + TINY[i + 2:]
    argv += ["--steps", "12", "--out-dir", str(tmp_path)] + (["--progress", setting] if setting else [])
    cli.main(argv)
    text = stream.getvalue()
    assert ("train:" in text and "%|" in text) == bar, text[-2000:]  # tqdm's frame: "train:  50%|#####  |"
    assert ("\r" in text) == bar
    rows = [row.rsplit("\r", 1)[-1] for row in text.split("\n")]  # what each terminal row ends up showing
    logged = [row for row in rows if row.startswith("step ")]
    # The log lines: every step when there is no bar (the bar shows the numbers otherwise), and the
    # checkpoint line, each intact.
    assert sum(row.startswith("step     ") for row in logged) == (2 if bar else 12), logged
    assert any(row.startswith("step 12: checkpoint") for row in logged)
    for row in rows:
        assert "train:" not in row or not row.startswith(("step", "config", "model")), row


@pytest.mark.parametrize("argv, needle", [
    (["--val-data", "x.csv"], "--checkpoint PATH is required"),
    (["--checkpoint", "/no/such/run"], "--checkpoint: /no/such/run is not a checkpoint directory"),
])
def test_eval_command_line_errors_are_one_line(argv, needle, monkeypatch, capsys):
    code, err = cli_error(monkeypatch, capsys, argv, entry=cli.eval_cli)
    assert code == 2
    assert_one_line(err, "vlcore-eval: error: ", needle)
