"""The reproduction study's configuration set and the data each preset's study runs on."""

from pathlib import Path

import pytest

from workbench.studies import reproduce


def test_every_configuration_changes_one_setting_of_the_seed_run():
    base = reproduce.seed_run(5)
    configs = reproduce.configurations(base, [1, 4])
    names = [c.name for c in configs]
    assert names[0] == "seed_faithful" and len(set(names)) == len(names)
    assert {"freeze_params_N1_rebuild", "freeze_params_N4_no_rebuild", "freeze_and_mute_N4"} <= set(names)
    frozen = next(c for c in configs if c.name == "freeze_params_N4_rebuild")
    assert frozen.steps == base.steps + 4  # the decoder trains as long as in every other configuration


def test_a_carried_scaler_stays_only_where_a_fp16_run_keeps_the_seeds_scaler():
    configs = {c.name: c for c in reproduce.configurations(reproduce.seed_run(5, carry_scaler=True), [1])}
    fresh = {name for name, c in configs.items() if not c.carry_scaler}
    assert fresh == {"bf16", "fp32", "init_scale_4096"}  # no scaler to carry, or a fresh one is the change
    assert all(c.precision == "fp16" for name, c in configs.items() if name not in fresh)


def test_only_selects_configurations_in_order_and_rejects_unknown_names():
    base = reproduce.seed_run(5)
    picked = reproduce.configurations(base, [1], only=["fp32", "seed_faithful"])
    assert [c.name for c in picked] == ["fp32", "seed_faithful"]
    assert picked[0].precision == "fp32"
    with pytest.raises(ValueError, match="unknown fp64"):
        reproduce.configurations(base, [1], only=["fp64"])


def test_the_seed_study_runs_its_configurations_on_real_length_data(tmp_path):
    size = reproduce.SIZES["seed"]
    picked = reproduce.configurations(reproduce.seed_run(size.steps), size.freeze_steps, only=size.configs)
    assert [c.name for c in picked] == list(size.configs)
    assert reproduce.study_data(reproduce.SIZES["tiny"], tmp_path) == tmp_path / "data_samples"
    root = reproduce.study_data(size, tmp_path)
    assert root.parent == tmp_path / "runs" / "data" and root.name.startswith("b2t_lengths")
    assert any(Path(root).rglob("*.hdf5"))
