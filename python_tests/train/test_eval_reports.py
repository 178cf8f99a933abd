"""What each kind of run reports from the command line: the captioner's sample captions, CIDEr, attribute
accuracy and MIR; a fusion model's ITM re-ranked recall beside ITC; ``vlcore-eval`` on a Karpathy file
writing one JSON line per metric with the checkpoint's step; the curves' panels; TensorBoard's tags."""

import json
import math

import pytest

from vlcore.evaluation import read_metrics_jsonl
from vlcore.train import cli
from vlcore.train.logs import RunLogger, curve_panels
from vlcore.train.params import load_config

from .helpers import TINY, png_bytes

CAPTIONER = ["--model", "captioner-tiny", "--model-overrides",
             '{"vision_cfg": {"image_size": 16, "patch_size": 4}, "connector_cfg": {"output_hw": [2, 2]}}']


def _eval_records(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return records, [r for r in records if "eval_images" in r]


@pytest.fixture(scope="module")
def captioner_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("captioner")
    cli.main(TINY + CAPTIONER + ["--steps", "4", "--eval-every", "2", "--caption-samples", "6",
                                 "--mir-samples", "8", "--plot", "true", "--out-dir", str(out)])
    return out


def test_captioner_report_has_samples_caption_metrics_attributes_and_mir(captioner_run):
    report = (captioner_run / "report.txt").read_text()
    for needle in ("sample captions (generated | reference):", "captions (6 images): CIDEr ",
                   "attribute accuracy (held-out pairs / seen pairs): colour ", "MIR "):
        assert needle in report, report
    # Six captioned samples, each a generated caption beside a reference of the held-out set.
    assert sum(line.startswith("  '") and " | '" in line for line in report.splitlines()) == 6
    _, evals = _eval_records(captioner_run)
    assert [r["step"] for r in evals] == [2, 4]  # every eval_every, and at the end
    for record in evals:
        assert len(record["mir_per_layer"]) == 2  # captioner-tiny's language model has two blocks
        assert all(d > 0 for d in record["mir_per_layer"])
        assert record["mir"] == pytest.approx(math.log10(sum(record["mir_per_layer"])))
        assert 0 <= record["cider"] and 0 <= record["attr_shape_held_out"] <= 1
    summary = json.loads((captioner_run / "summary.json").read_text())
    assert summary["mir"] == evals[-1]["mir"]


def test_captioner_curves_show_caption_metrics_and_mir_beside_the_loss(captioner_run):
    assert (captioner_run / "curves.png").stat().st_size > 0
    records, evals = _eval_records(captioner_run)
    panels = curve_panels(records)
    assert list(panels)[:2] == ["loss", "MIR (lower: image tokens closer to text)"]
    labels = {label: (steps, values) for label, steps, values, _ in panels["captions"]}
    assert labels["CIDEr"] == ([2, 4], [r["cider"] for r in evals])
    assert labels["shape accuracy, held-out pairs"][1] == [r["attr_shape_held_out"] for r in evals]
    assert labels["pair accuracy, seen pairs"][1] == [r["attr_pair_seen"] for r in evals]
    assert panels["MIR (lower: image tokens closer to text)"][0][2] == [r["mir"] for r in evals]


def test_fusion_report_has_itm_reranked_recall_beside_itc(tmp_path):
    cli.main(TINY + ["--model", "fiber-tiny", "--steps", "2", "--itm-rerank-k", "4", "--out-dir", str(tmp_path)])
    report = (tmp_path / "report.txt").read_text()
    assert "retrieval (ITC, 16 images): i2t R@1/5/10" in report, report
    assert "retrieval (ITM re-ranked ITC top 4): i2t R@1/5/10" in report, report
    assert "zero-shot (" in report  # the embedded data's (colour, shape) classes, on by default
    records, evals = _eval_records(tmp_path)
    assert evals[-1]["itm_rerank_k"] == 4 and 0 <= evals[-1]["i2t_itm_R@1"] <= 1
    assert f"ITM pair accuracy (each text's image scored above the ITC-hardest other; chance 0.5): " \
           f"{evals[-1]['itm_pair_accuracy']:.3f}" in report
    panels = curve_panels(records)
    styles = {label: style for label, _, _, style in panels["retrieval recall"]}
    assert styles["i2t R@1 (ITC)"] == "-" and styles["i2t R@1 (ITM re-ranked)"] == "--"
    zero_shot = {label: values for label, _, values, _ in panels["zero-shot top-1"]}
    assert zero_shot["held-out pairs' classes"] == [evals[-1]["top1_accuracy_held_out"]]


def test_vlcore_eval_on_a_karpathy_file_writes_json_lines_with_the_step(tmp_path, capsys):
    run = tmp_path / "run"
    cli.main(TINY + ["--steps", "3", "--zeroshot", "none", "--out-dir", str(run)])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.png").write_bytes(png_bytes(i))
    karpathy = {"images": [{"filename": f"{i}.png", "split": "test" if i < 4 else "train",
                            "sentences": [{"raw": f"a picture {i}"}]} for i in range(5)]}
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    capsys.readouterr()
    output = tmp_path / "eval.jsonl"
    metrics = cli.eval_main(["--checkpoint", str(run), "--val-data", str(tmp_path / "karpathy.json"),
                             "--val-data-type", "karpathy", "--val-image-root", str(images), "--output", str(output)])
    printed = capsys.readouterr().out
    assert "retrieval (ITC, 4 images): i2t R@1/5/10" in printed
    rows = read_metrics_jsonl(str(output))
    assert {r["step"] for r in rows} == {3}
    by_name = {r["metric"]: r["value"] for r in rows}
    assert by_name["eval_images"] == 4 and by_name["i2t_R@1"] == metrics["i2t_R@1"]
    assert all(r["checkpoint"] == metrics["checkpoint"] and "step_" in r["checkpoint"] for r in rows)


def test_tensorboard_tags_of_an_evaluation(tmp_path):
    added = []

    class Writer:
        def add_scalar(self, tag, value, step):
            added.append((tag, value, step))

    logger = RunLogger(tmp_path, load_config(["--tensorboard", "false", "--progress", "false"]), True, 0)
    logger.tb = Writer()
    logger.log({"step": 5, "mir": 1.5, "mir_per_layer": [10.0, 21.6], "cider": 0.25}, tensorboard_prefix="eval/")
    assert added == [("eval/mir", 1.5, 5), ("eval/mir_layer_0", 10.0, 5), ("eval/mir_layer_1", 21.6, 5),
                     ("eval/cider", 0.25, 5)]


def test_fusion_run_logs_its_itc_itm_mlm_terms_summing_to_the_loss(tmp_path, capsys):
    cli.main(TINY + ["--model", "fiber-tiny", "--steps", "2", "--grad-accum", "2", "--out-dir", str(tmp_path)])
    records, _ = _eval_records(tmp_path)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # the logged terms are the ones the loss sums (mean over the two micro-batches each)
        assert r["loss_itm"] > 0 and r["loss_mlm"] > 0
        assert abs(r["loss_itc"] + r["loss_itm"] + r["loss_mlm"] - r["loss"]) < 1e-4 * r["loss"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step      2/2 | loss")]
    assert len(printed) == 1 and f"(itc {steps[-1]['loss_itc']:.3f}, itm {steps[-1]['loss_itm']:.3f}, mlm " in printed[0]
    labels = [label for label, *_ in curve_panels(records)["loss"]]
    assert labels[:4] == ["training loss", "ITC term", "ITM term", "MLM term"]


def test_clip_run_logs_no_loss_terms(tmp_path):
    cli.main(TINY + ["--steps", "1", "--out-dir", str(tmp_path)])
    records, _ = _eval_records(tmp_path)
    assert not any(key.startswith("loss_") for r in records for key in r)
