from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import shiftbn as sb
from shiftbn.data.builtin import FASHION_DEBIAN_ROOT
from shiftbn.studies import (
    STUDIES,
    BatchComposition,
    HeldOutSources,
    TrainConfig,
    load_spec,
    make_study,
    parse_spec,
    run_spec,
)


def _data_fingerprint(ds):
    """A dataset's ids and labels, copied: a study must leave them as they were."""
    return (ds.source_ids.copy(), None if ds.labels is None else ds.labels.copy())


FASHION_MISSING = ("Debian's dataset-fashion-mnist not installed: apt-get install dataset-fashion-mnist "
                   "(make test installs it)")

ANALYSES = Path(__file__).resolve().parents[2] / "analyses"
SPECS = sorted(ANALYSES.glob("*.toml"))


def _needs_fashion(path: Path) -> bool:
    return "fashion-mnist" in str(load_spec(path).dataset)

COLUMNS = {
    "held_out_sources": {"held_out", "eval_source", "is_held_out", "strategy", "is_cross_source", "stats_source",
                         "metric", "value", "n", "groupings", "value_sd", "seed", "sampler_mode"},
    "batch_composition": {"train_mode", "batch_size", "strategy", "is_cross_source", "stats_source", "eval_source",
                          "metric", "value", "n", "groupings", "value_sd", "seed"},
    "ema_vs_precise": {"kind", "batch_size", "momentum", "step", "stats", "num_samples", "metric", "value", "seed"},
    "normalization_batch_size": {"ghost_batch", "eval", "metric", "value", "n", "seed"},
    "shared_domains": {"train_norm", "test_stats", "consistent", "metric", "value", "seed"},
    "leakage_probe": {"composition", "eval", "metric", "value", "seed"},
    "bag_leakage": {"arm", "eval", "metric", "value", "n", "seed"},
    "strategy_choice": {"held_out", "strategy", "stats_source", "pred_accuracy", "labeled_accuracy", "atc_threshold",
                        "confidence", "entropy", "agreement", "bn_distance", "bn_distance_max",
                        "bn_distance_max_layer", "labeled_distance", "atc_site_error", "in_range", "n",
                        "rank", "chosen", "is_oracle", "metric", "value", "seed"},
    "drift_detection": {"shift", "severity", "metric", "value", "seed"},
    "seg_held_out_sites": {"held_out", "eval_source", "is_held_out", "strategy", "mode", "stream", "metric", "case",
                           "value", "value_sd", "groupings", "seconds", "seed"},
}
TIMINGS = ["seconds"]  # wall time of a cell's parts: the one column a rerun need not repeat


def test_every_protocol_has_a_spec():
    assert {load_spec(p).protocol for p in SPECS} == set(STUDIES)


# specs whose protocol's quick run another spec covers in make test (their data differs, their code does not):
# in make test-slow, to keep make test under 5 minutes
SLOW_SPECS = {"batch_composition_collections", "ema_vs_precise_collections", "strategy_choice_collections",
              "normalization_batch_converged"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_SPECS else p
                                  for p in SPECS], ids=[p.stem for p in SPECS])
def test_quick_study_schema_determinism_and_no_mutation(path):
    if _needs_fashion(path) and not FASHION_DEBIAN_ROOT.exists():
        pytest.skip(FASHION_MISSING)
    spec = load_spec(path)
    ds = spec.load_dataset()
    before = _data_fingerprint(ds)
    first = make_study(spec.protocol, spec.resolved(quick=True)).run(ds, progress=False)
    assert set(first.columns) == COLUMNS[spec.protocol]
    assert len(first) > 0 and first["value"].notna().all()
    assert set(first["seed"]) == set(spec.resolved(quick=True)["seeds"])
    again = run_spec(spec, quick=True, progress=False)
    pd.testing.assert_frame_equal(first.drop(columns=TIMINGS, errors="ignore"),
                                  again.drop(columns=TIMINGS, errors="ignore"))
    after = _data_fingerprint(ds)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_held_out_target_rescues_the_shifted_lab():
    ds = sb.load("digits-labs")
    study = HeldOutSources(train=TrainConfig(model={"name": "SmallCNN", "width": 8}, steps=150), held_out=["lab_e"],
                           strategies=["ema", "target"])
    df = study.run(ds, progress=False)
    held = df.query("is_held_out and metric == 'accuracy'").set_index("strategy")["value"]
    assert held["target"] > held["ema"] + 0.2
    assert set(df["eval_source"]) == set(ds.source_names)


@pytest.mark.slow  # a 15 s end-to-end training run; make test-slow
def test_single_source_training_needs_per_source_statistics():
    ds = sb.load("digits-labs")
    study = BatchComposition(train=TrainConfig(model={"name": "SmallCNN", "width": 8}, steps=150), modes=["single"],
                             strategies=["precise", "per-source"])
    df = study.run(ds, progress=False)
    mean = df.groupby("strategy")["value"].mean()
    assert mean["per-source"] > mean["precise"] + 0.2


def test_factory_models_are_built_per_seed():
    from shiftbn.studies.models import MLP

    ds = sb.load("blobs-labs", n=300)
    calls = []

    def factory(seed):
        calls.append(seed)
        return MLP(16, 3, seed=seed)

    df = make_study("held_out_sources", {"model": factory, "held_out": ["lab_3"], "strategies": ["ema"],
                                         "steps": 20, "seeds": [0, 1]}).run(ds, progress=False)
    assert calls == [0, 1] and set(df["seed"]) == {0, 1}


def test_spec_errors_name_the_key():
    with pytest.raises(ValueError, match=r"\[study\]"):
        parse_spec({})
    with pytest.raises(ValueError, match="study.protocol must be one of"):
        parse_spec({"study": {"protocol": "nope", "dataset": "digits-labs"}})
    with pytest.raises(ValueError, match="unknown parameter.*stepz"):
        parse_spec({"study": {"protocol": "held_out_sources", "dataset": "digits-labs"}, "params": {"stepz": 3}})
    with pytest.raises(ValueError, match="dataset is missing"):
        parse_spec({"study": {"protocol": "held_out_sources"}})
    with pytest.raises(FileNotFoundError):
        load_spec("missing.toml")
