"""The reproduction study's configuration set and the data each preset's study runs on."""

import json
import re
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
    # tiny and small: data_samples' training set with 80 validation trials (10 resolve no difference of a few errors)
    assert reproduce.study_data(reproduce.SIZES["tiny"], tmp_path) == tmp_path / "runs" / "data" / "sample_val40"
    root = reproduce.study_data(size, tmp_path)
    assert root.parent == tmp_path / "runs" / "data" and root.name.startswith("b2t_lengths")
    assert any(Path(root).rglob("*.hdf5"))


def test_the_seed_study_keeps_the_seeds_precision_through_the_whole_curriculum():
    # notebook 01's ctc_precision and carry_scaler default to None: the preset's values below
    nb = json.loads((Path(__file__).resolve().parents[2] / "notebooks" / "01_reproduce_nan_explosion.ipynb").read_text())
    params = next("".join(c["source"]) for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    assert re.search(r"^ctc_precision = None\b", params, re.M) and re.search(r"^carry_scaler = None\b", params, re.M)
    seed = reproduce.SIZES["seed"]
    assert (seed.ctc_precision, seed.carry_scaler) == ("fp16", True)
    assert all((s.ctc_precision, s.carry_scaler) == ("fp32", False) for name, s in reproduce.SIZES.items()
               if name != "seed")


def test_every_run_has_a_ctc_only_control_of_its_length_precision_and_seed():
    base = reproduce.seed_run(12)
    plan = reproduce.plan(reproduce.configurations(base, [1, 6]), [0, 1])
    for cell in plan.cells:
        run, control = plan.runs[cell["run"]], plan.runs[cell["control"]]
        assert control.ctc_only and control.seed == run.seed
        assert (control.steps, control.precision) == (run.steps, run.precision)
    lengths = {(s.steps, s.precision) for s in plan.runs.values() if s.ctc_only}
    assert lengths == {(12, "fp16"), (13, "fp16"), (18, "fp16"), (12, "bf16"), (12, "fp32")}


def _row(config, seed, ctc, control, rnnt=(2, 2), initial=(5, 5), functional=True):
    return {"config": config, "seed": seed, "val_ctc_errors": list(ctc), "control_val_ctc_errors": list(control),
            "val_ref_lengths": [4, 4], "val_rnnt_errors": list(rnnt), "val_rnnt_errors_initial": list(initial),
            "val_rnnt_functional": functional}


def test_effects_are_paired_in_errors_and_a_decoder_that_is_not_functional_is_not_ranked():
    rows = [_row("seed_faithful", s, (3, 3), (1, 1)) for s in (0, 1, 2)]
    rows += [_row("rebuild_at_stage_change", s, (1, 1), (1, 1)) for s in (0, 1, 2)]
    # the decoder-lr run's hypotheses are empty in one seed: fewer errors than untrained means nothing there
    rows += [_row("rebuild_decoder_lr_0.001", s, (1, 1), (1, 1), rnnt=(0, 0), functional=s != 1) for s in (0, 1, 2)]
    found, tally = reproduce.effects(rows)
    by = {(f["config"], f["kind"]): f for f in found}
    assert by[("seed_faithful", "vs_control")]["effect"]["per_seed"] == [4, 4, 4]
    assert by[("rebuild_at_stage_change", "vs_untrained")]["effect"]["per_seed"] == [-6, -6, -6]
    lr = by[("rebuild_decoder_lr_0.001", "vs_untrained")]
    assert lr["effect"] is None and "functional in 2/3 seeds" in lr["reason"]
    assert tally.to_dict()["comparisons"] == 4 and tally.to_dict()["expected_by_chance"] == pytest.approx(1.0)
