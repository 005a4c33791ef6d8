"""The training config: one rule per field (its annotation), every broken one said at once, in one line."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest

from fakedet.config import FLOAT32_RANGE, TRAIN_FIELDS, TrainConfig
from fakedet.sweep.study import Study, StudyError


def test_every_broken_field_is_named_at_once_in_one_line():
    with pytest.raises(ValueError) as e:
        TrainConfig(lr=-1, momentum=2, batch_size=0, shuffle="random", seed=-1)
    message = str(e.value)
    assert message.startswith("invalid training config: ") and "\n" not in message
    for field in ("lr", "momentum", "batch_size", "shuffle", "seed"):
        assert f"{field}: " in message, field


def test_lr_must_be_a_float32_the_weights_can_use():
    low, high = FLOAT32_RANGE
    TrainConfig(lr=high)
    TrainConfig(lr=low)
    for lr in (high * 10, low / 10, 1e308, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr: "):
            TrainConfig(lr=lr)


def test_values_keep_their_types_and_the_dataclass_stays_hashable():
    cfg = TrainConfig(eval_at=[0.5, 1], seed=np.int64(7), epochs=2)
    assert cfg.eval_at == (0.5, 1.0) and hash(cfg) == hash(TrainConfig(eval_at=(0.5, 1.0), seed=7, epochs=2))
    assert cfg.epochs == 2 and isinstance(TrainConfig(epochs=2).epochs, int)  # 2 stays 2: cells' names and params
    assert pickle.loads(pickle.dumps(cfg)) == cfg and replace(cfg, lr=1e-2).lr == 1e-2
    with pytest.raises(ValueError, match="lr: "):
        replace(cfg, lr=0)
    for bad in ({"batch_size": 32.0}, {"lr": "1e-3"}, {"deterministic": 1}, {"seed": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_from_dict_names_unknown_keys_with_the_broken_values():
    assert TrainConfig.from_dict(TrainConfig(lr=1e-2).to_dict()) == TrainConfig(lr=1e-2)
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({"learning_rate": 1e-2, "lr": 0})
    assert "learning_rate: unknown key" in str(e.value) and "lr: Input should be greater than 0" in str(e.value)


def test_a_huge_value_is_not_echoed_whole():
    with pytest.raises(ValueError) as e:
        TrainConfig(srm="x" * 1_000_000, eval_at=tuple(range(-1000, 0)), epochs=1)
    assert len(str(e.value)) < 1000


# the same value refused the same way by the constructor and by a study file: one rule per field
@pytest.mark.parametrize("field, toml, value", [
    ("momentum", "1.0", 1.0), ("batch_size", "0", 0), ("batch_size", "32.5", 32.5), ("shuffle", '"random"', "random"),
    ("seed", "-1", -1), ("deterministic", '"yes"', "yes"), ("eval_batch_size", "0", 0), ("arch", '"resnet"', "resnet"),
])
def test_constructor_and_study_file_share_each_rule(tmp_path, field, toml, value):
    with pytest.raises(ValueError) as direct:
        TrainConfig(**{field: value})
    path = tmp_path / "s.toml"
    path.write_text(f'kind = "ablation"\n[fixed]\n{field} = {toml}\n')
    with pytest.raises(StudyError) as study:
        Study.load(path)
    rule = str(direct.value).removeprefix("invalid training config: ")
    assert f"[fixed] {rule}" in str(study.value)


@pytest.mark.parametrize("axis, toml, field, value", [
    ("srm", '["pool9"]', "srm", "pool9"), ("lr", "[0.0]", "lr", 0.0), ("lr", "[1e39]", "lr", 1e39), ("seeds", "[-1]", "seed", -1),
])
def test_the_space_axes_share_the_fields_rules(tmp_path, axis, toml, field, value):
    with pytest.raises(ValueError) as direct:
        TrainConfig(**{field: value})
    path = tmp_path / "s.toml"
    path.write_text(f'kind = "ablation"\n[space]\n{axis} = {toml}\n')
    with pytest.raises(StudyError) as study:
        Study.load(path)
    rule = str(direct.value).removeprefix(f"invalid training config: {field}: ")
    assert rule in str(study.value) and f"[space] {axis}" in str(study.value)


def test_the_fields_model_is_the_dataclass():
    assert list(TRAIN_FIELDS.model_fields) == list(TrainConfig.__dataclass_fields__)
    defaults = TrainConfig()
    assert all(TRAIN_FIELDS.model_fields[name].default == getattr(defaults, name) for name in TRAIN_FIELDS.model_fields)


def test_ten_thousand_broken_values_make_one_short_line(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('kind = "ablation"\n[limits]\nvalues = 100000\n[space]\nlr = [' + ", ".join(["-1.0"] * 10_000) + "]\n")
    with pytest.raises(StudyError) as e:
        Study.load(path)
    assert "and 9992 more" in str(e.value) and len(str(e.value)) < len(str(path)) + 1000
