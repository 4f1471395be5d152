"""Cross-tokenizer terms, several teachers and hidden-state KD build the teacher signal in three different ways;
a run that asks for two of them is refused at config load, in one line naming both."""
import json

import pytest

from potstill.config import RunConfig

BASE = ["teacher.path=builtin", "student.init_from_teacher_layers=1", "data.train=builtin"]
EXTRA = "teachers.extra=[" + json.dumps({"name": "b", "path": "builtin"}) + "]"


@pytest.mark.parametrize("overrides, named", [
    (["loss.objective=0.5*ce + uld", EXTRA], ("cross-tokenizer terms (uld)", "several teachers")),
    (["loss.objective=alm", "hidden.weight=1"], ("cross-tokenizer terms (alm)", "hidden-state KD")),
    ([EXTRA, "hidden.weight=1"], ("several teachers", "hidden-state KD")),
    ([EXTRA, "hidden.attention_relations.weight=1"], ("several teachers", "hidden-state KD")),
    (["task.kind=sequence_classification", EXTRA], ("several teachers", "task.kind=sequence_classification")),
    (["task.kind=sequence_classification", "hidden.weight=1"], ("hidden-state KD", "task.kind=sequence_classification")),
])
def test_two_kinds_of_teacher_signal_are_refused_in_one_line(overrides, named):
    with pytest.raises(ValueError) as err:
        RunConfig.from_yaml(None, BASE + overrides)
    message = str(err.value)
    assert "\n" not in message and "cannot be combined" in message
    assert all(n in message for n in named)


@pytest.mark.parametrize("overrides", [["loss.objective=0.5*ce + uld"], [EXTRA], ["hidden.weight=1"]])
def test_each_kind_alone_loads(overrides):
    RunConfig.from_yaml(None, BASE + overrides)
