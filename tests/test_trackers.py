"""train.report_to: every metrics.jsonl value also reaches the trackers (TensorBoard read back from its event files)."""
from __future__ import annotations

import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import potstill
from potstill.config import RunConfig
from potstill.trackers import flat_config, tracker_names

from conftest import simulate_crash


def run_config(tmp_path, model_dirs, data, *extra):
    return RunConfig.from_yaml(None, [
        f"teacher.path={model_dirs['llama_teacher']}", f"student.path={model_dirs['gpt2_student']}", f"data.train={data}",
        f"out_dir={tmp_path / 'run'}", "data.max_length=48", "data.max_eval_examples=8", "data.max_train_examples=48",
        "train.batch_size=4", "train.lr=0.01", "train.log_every=1", "train.max_steps=6", "train.eval_every=3",
        "train.save_every=3", "eval.max_new_tokens=3", "device=cpu", *extra])


def jsonl_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard tags: {'train/loss': [(step, value), ...], 'eval/student_ce': ...}."""
    series: dict[str, list] = {}
    for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(f"{row['kind']}/{key}", []).append((row["step"], float(value)))
    return series


def tensorboard_scalars(run_dir) -> tuple[dict[str, list[tuple[int, float]]], EventAccumulator]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events


def test_tensorboard_holds_the_same_scalars_as_metrics_jsonl(tmp_path, model_dirs, text_jsonl):
    result = potstill.distill(run_config(tmp_path, model_dirs, text_jsonl), progress=False)  # tensorboard: the default
    logged, events = tensorboard_scalars(result.run_dir)
    expected = jsonl_scalars(result.run_dir)
    assert {"train/loss", "train/lr", "eval/student_ce", "eval/kl_teacher_student"} <= expected.keys()
    assert logged.keys() == expected.keys()
    for tag, points in expected.items():  # TensorBoard stores float32
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    samples = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("eval/sample/text_summary")]
    evals = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert samples == [(r["step"], r["sample"]) for r in evals] and len(samples) == 2  # the sample text, as text


def test_resumed_run_appends_and_drops_what_metrics_jsonl_dropped(tmp_path, model_dirs, text_jsonl):
    cfg = run_config(tmp_path, model_dirs, text_jsonl)
    run_dir = potstill.distill(cfg, progress=False).run_dir
    uninterrupted = jsonl_scalars(run_dir)
    # crashed after step 5: the step-6 checkpoint and final/ never got written, steps 4-5 were logged everywhere
    simulate_crash(run_dir, 6, 5)
    potstill.distill(cfg, resume=True, progress=False)
    logged, _ = tensorboard_scalars(run_dir)
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4, 5, 6]  # steps 4-5 purged once, then logged again
    assert [v for _, v in logged["train/loss"]] == pytest.approx([v for _, v in uninterrupted["train/loss"]], rel=1e-6)


def test_report_to_none_writes_no_tracker_files(tmp_path, model_dirs, text_jsonl):
    result = potstill.distill(run_config(tmp_path, model_dirs, text_jsonl, "train.report_to=none", "train.max_steps=2"),
                              progress=False)
    assert not (result.run_dir / "tensorboard").exists()


def test_hyperparameters_are_the_flattened_config():
    flat = flat_config(RunConfig().to_dict())
    assert flat["train.lr"] == 1e-4 and flat["student.lora.r"] == 0 and flat["student.lora.target_modules"] == "all-linear"
    assert flat_config({"a": {"b": [1, 2]}}) == {"a.b": "[1, 2]"}


@pytest.mark.parametrize("report_to,message", [
    ("tensorbord", "train.report_to: unknown tracker 'tensorbord'. Did you mean .tensorboard."),
    ("[tensorboard, comet]", "unknown tracker 'comet'"),
])
def test_unknown_tracker_is_one_line_at_config_load(report_to, message):
    with pytest.raises(ValueError, match=message) as err:
        RunConfig.from_yaml(None, ["teacher.path=builtin", "student.init_from_teacher_layers=2", f"train.report_to={report_to}"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_tracker_package_is_one_line_before_anything_is_written(tmp_path, name):
    """wandb and mlflow are extras, not installed in the test environment."""
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    with pytest.raises(ValueError, match=rf"train.report_to={name} needs the {name} package: pip install 'potstill\[{name}\]'") as err:
        RunConfig.from_yaml(None, ["teacher.path=builtin", "student.init_from_teacher_layers=2",
                                   f"train.report_to=[tensorboard, {name}]", f"out_dir={tmp_path / 'run'}"])
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_report_to_accepts_none_and_lists():
    assert tracker_names("none") == [] and tracker_names(["tensorboard", "TensorBoard"]) == ["tensorboard"]
