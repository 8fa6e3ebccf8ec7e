"""``shiftbn demo``: train on the built-in multi-lab data, analyse it, write the report."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from shiftbn._io import atomic_save_torch, atomic_write_text
from shiftbn._log import Phases
from shiftbn.bn import collect_stats, stats_shift
from shiftbn.data.builtin import load
from shiftbn.evaluate import summarize
from shiftbn.studies.common import make_model
from shiftbn.studies.heldout import HeldOutSources
from shiftbn.studies.population import EmaVsPrecise
from shiftbn.studies.report import Outputs, render_report
from shiftbn.studies.report.build import comparison_tables, matrix_with_outputs
from shiftbn.studies.report.decisions import audit_table, drift_tables, site_choice_table
from shiftbn.studies.runs import RunFolder
from shiftbn.studies.training import train

DEMO_DATASETS: dict[str, dict[str, Any]] = {
    "digits-labs": {"held_out": "lab_e", "load": {}},
    "fashion-mnist-labs": {"held_out": "lab_d", "load": {"n": 6000}},
    "digits-c": {"held_out": "contrast_5", "load": {}},
    "fashion-mnist-c": {"held_out": "gaussian_noise_5", "load": {"n": 6000}},
}

STRATEGIES = ["ema", "precise", "target", "prior:16", "batch:64", "tent"]
TRAIN_MODE = "random"  # the demo's training batches (a SourceBatchSampler mode); the report audits it
CI, N_BOOT = 0.95, 1000  # the report's intervals: percentile bootstrap within each lab


def demo_config(dataset: str = "digits-labs", quick: bool = False, seed: int = 0,
                held_out_protocol: bool = False) -> dict[str, Any]:
    """The resolved configuration of a demo run (what ``config.json`` records).

    ``held_out_protocol``: also retrain one model without each lab (``HeldOutSources``); off by default,
    since it is most of a full run's time and a first look does not need it.
    """
    if dataset not in DEMO_DATASETS:
        raise ValueError(f"unknown demo dataset {dataset!r}; choose from {sorted(DEMO_DATASETS)}")
    base = DEMO_DATASETS[dataset]
    return {
        "dataset": dataset, "load": base["load"], "held_out": base["held_out"], "seed": seed, "quick": quick,
        "model": {"name": "SmallCNN", "width": 8 if quick else 16},
        "steps": 60 if quick else 400, "batch_size": 32, "fractions": [0.6, 0.2, 0.2],
        "strategies": STRATEGIES, "heldout_strategies": ["ema", "precise", "target", "prior:16"],
        "held_out_protocol": held_out_protocol,
        "heldout_labs": [base["held_out"]] if quick else None, "heldout_steps": 60 if quick else 300,
        "ema": {"batch_sizes": [64] if quick else [16, 256], "steps": 40 if quick else 150,
                "every": 20 if quick else 25, "precise_samples": 200 if quick else 1000,
                "sample_grid": [50, 200] if quick else [30, 100, 300, 1000]},
    }


@dataclass
class DemoResult:
    """What ``run_demo`` returns: its tidy tables and the report's path.

    ``matrix``: the cross-source matrix (``cross_source_matrix`` rows); ``summary``: ``summarize``
    of its strategy rows; ``heldout``: held-out-lab rows (None without ``held_out_protocol``); ``shift``:
    the layer shift profile; ``ema``: EMA vs PreciseBN rows; ``report``: path of ``report.html``;
    ``sites``: the strategy chosen per site without labels (``site_choice_table``); ``drift``: each
    site's drift against the reference lab (``drift_tables``).
    """

    matrix: pd.DataFrame
    summary: pd.DataFrame
    heldout: pd.DataFrame | None
    shift: pd.DataFrame
    ema: pd.DataFrame
    report: Path
    sites: pd.DataFrame | None = None
    drift: pd.DataFrame | None = None


def run_demo(out: str | Path = "runs/demo", *, dataset: str = "digits-labs", quick: bool = False,
             resume: bool = False, seed: int = 0, progress: bool = True,
             held_out_protocol: bool = False) -> DemoResult:
    """Run the demo into ``out`` (resumable cell by cell) and write ``report.html``.

    ``held_out_protocol``: also retrain one model without each lab (the report's "Held-out labs" bars);
    without it the report's panel says how to get them.
    """
    cfg = demo_config(dataset, quick, seed, held_out_protocol)
    with RunFolder(out, cfg, resume=resume) as run:
        return _demo(run, cfg, progress)


def _demo(run: RunFolder, cfg: dict[str, Any], progress: bool) -> DemoResult:
    seed = cfg["seed"]
    ds = load(cfg["dataset"], **cfg["load"])
    split = ds.split(fractions=tuple(cfg["fractions"]), seed=seed)
    train_labs = [s for s in ds.sources_present if s != cfg["held_out"]]
    labs = (cfg["heldout_labs"] or ds.sources_present) if cfg["held_out_protocol"] else []
    n = 7 + len(labs)
    phases = Phases(n)

    def announce(key: str, text: str) -> None:
        phases.start(text + (" (finished before: read back)" if run.done(key) else ""))

    model = make_model(cfg["model"], ds, seed)
    ckpt = run.path / "model.pt"

    def do_train() -> pd.DataFrame:
        log = train(model, split.train.subset(train_labs), steps=cfg["steps"], batch_size=cfg["batch_size"],
                    mode=TRAIN_MODE, seed=seed, progress=progress)
        atomic_save_torch(ckpt, model.state_dict())
        return log

    announce("train", f"training {cfg['model']['name']} on {', '.join(train_labs)} ({cfg['steps']} steps)")
    run.cell("train", do_train)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.eval()

    def do_stats() -> pd.DataFrame:
        stats = collect_stats(model, split.calibration, seed=seed, progress=progress)
        atomic_write_text(run.path / "stats.json", json.dumps(stats.to_dict()))
        return stats_shift(stats, metric="all")

    announce("shift_profile", "per-lab BN statistics and the layer shift profile")
    shift = run.cell("shift_profile", do_stats)
    announce("matrix", f"cross-source matrix: {len(cfg['strategies']) + 1} strategies x "
                       f"{len(ds.sources_present)} labs, with paired bootstrap comparisons")
    kept: dict = {}

    def outputs() -> Outputs:
        if "outputs" not in kept:
            kept["matrix"], kept["outputs"] = matrix_with_outputs(
                model, ds, cfg["strategies"] + ["stats:*"], ["accuracy", "nll", "ece"],
                calibration=(split.calibration, split.test), train_sources=train_labs, ci=CI, n_boot=N_BOOT,
                seed=seed, progress=progress)
        return kept["outputs"]

    matrix = run.cell("matrix", lambda: (outputs(), kept["matrix"])[1])
    comparisons = run.cell("comparisons", lambda: comparison_tables(outputs(), n_boot=N_BOOT, level=CI, seed=seed)[0])
    pooled = run.cell("pooled", lambda: comparison_tables(outputs(), n_boot=N_BOOT, level=CI, seed=seed)[1])
    frames = []
    heldout_train = replace(HeldOutSources.default_train, model=cfg["model"], steps=cfg["heldout_steps"],
                            batch_size=cfg["batch_size"])
    for lab in labs:
        announce(f"heldout__{lab}", f"held-out protocol: {lab}")
        study = HeldOutSources(train=heldout_train, held_out=[lab], strategies=cfg["heldout_strategies"], seeds=[seed])
        frames.append(run.cell(f"heldout__{lab}", lambda study=study: study.run(ds, progress)))
    heldout = pd.concat(frames, ignore_index=True) if frames else None
    announce("ema", "EMA vs PreciseBN")
    ema_params = {k: v for k, v in cfg["ema"].items() if k != "steps"}
    ema_train = replace(EmaVsPrecise.default_train, model=cfg["model"], steps=cfg["ema"]["steps"])
    ema_study = EmaVsPrecise(train=ema_train, seeds=[seed], **ema_params)
    ema = run.cell("ema", lambda: ema_study.run(ds.subset(train_labs), progress))
    decisions = _decisions(run, model, split, train_labs, cfg, announce)
    summary = summarize(matrix[~matrix["is_cross_source"]])
    run.write_results(matrix, "matrix")
    if heldout is not None:
        run.write_results(heldout, "heldout")
    phases.start("figures and report.html")
    report = _write_report(run, ds, cfg, matrix, heldout, shift, ema, comparisons, pooled, decisions)
    phases.finish()
    return DemoResult(matrix, summary, heldout, shift, ema, report, decisions["sites"], decisions["drift"])


def _decisions(run: RunFolder, model, split, train_labs: list[str], cfg: dict[str, Any],
               announce) -> dict[str, Any]:
    """The decision panels: the strategy chosen per site without labels, and drift against the first lab."""
    reference = train_labs[0]
    announce("sites", "which statistics for each site (chosen without its labels)")
    sites = run.cell("sites", lambda: site_choice_table(model, split, train_labs, cfg["heldout_strategies"],
                                                        seed=cfg["seed"]))
    announce("drift", f"drift of each lab against {reference}")
    kept: dict = {}

    def tables():
        if "drift" not in kept:
            kept["drift"], kept["layers"] = drift_tables(model, split, reference, seed=cfg["seed"])
        return kept

    drift = run.cell("drift", lambda: tables()["drift"])
    layers = run.cell("drift_layers", lambda: tables()["layers"])
    # the sampler the model was trained with, beside the other built-in ones (part of the drift phase: seconds)
    audit = run.cell("audit", lambda: audit_table(split.train.subset(train_labs), cfg["batch_size"], TRAIN_MODE,
                                                  seed=cfg["seed"]))
    return {"sites": sites, "drift": drift, "drift_layers": layers, "reference": reference, "audit": audit}


def _write_report(run, ds, cfg, matrix, heldout, shift, ema, comparisons, pooled, decisions=None) -> Path:
    lab = cfg["held_out"]
    meta = {"dataset": cfg["dataset"], "held-out lab in the main model": lab,
            "model": cfg["model"]["name"], "steps": str(cfg["steps"]), "seed": str(cfg["seed"]),
            "quick": str(cfg["quick"]), "bootstrap": f"{N_BOOT} resamples, {CI:.0%}"}
    return render_report(run.path, title=f"shiftbn report — {cfg['dataset']}", meta=meta, matrix=matrix, shift=shift,
                         samples=ds, held_out=[lab], heldout=heldout, ema=ema, comparisons=comparisons,
                         pooled=pooled, num_classes=_num_classes(ds), level=CI, n_boot=N_BOOT, seed=cfg["seed"],
                         notes={"Held-out labs": _two_numbers(matrix, heldout, lab, cfg)}, decisions=decisions)


def protocol_command(cfg: dict[str, Any], out: str = "runs/demo-protocol") -> str:
    """The command that reruns this demo with the held-out protocol into a new folder ``out``."""
    args = ["shiftbn demo --held-out-protocol"]
    if cfg["dataset"] != "digits-labs":
        args.append(f"--dataset {cfg['dataset']}")
    if cfg["quick"]:
        args.append("--quick")
    if cfg["seed"] != 0:
        args.append(f"--seed {cfg['seed']}")
    return " ".join([*args, f"--out {out}"])


def _num_classes(ds) -> int:
    return len(ds.class_names) if ds.class_names is not None else int(ds.labels.max()) + 1


def _two_numbers(matrix: pd.DataFrame, heldout: pd.DataFrame | None, lab: str, cfg: dict) -> str:
    """Why the matrix and this section give different numbers for the main held-out lab under ema
    (without the protocol: how to get this section)."""
    if heldout is None:
        return ("Not run: retraining one model without each lab (the held-out protocol) is most of a full run's "
                f"time, and the cross-source matrix already shows {lab}, which the main model never saw. To retrain "
                f"and measure each lab held out, run: {protocol_command(cfg)}")
    in_matrix = matrix.query("strategy == 'ema' and metric == 'accuracy' and eval_source == @lab")["value"]
    here = heldout.query("held_out == @lab and is_held_out and strategy == 'ema' and metric == 'accuracy'")
    text = ("Each bar comes from a separate model retrained without that lab "
            f"({cfg['heldout_steps']} steps, seed {cfg['seed']}); it is evaluated on the lab's test split. ")
    if len(in_matrix) and len(here):
        text += (f"So {lab} under ema (the model's stored statistics) reads {in_matrix.iloc[0]:.1%} in the "
                 "cross-source matrix (the main model, "
                 f"{cfg['steps']} steps, also trained without {lab}) and {here['value'].iloc[0]:.1%} here (n="
                 f"{int(here['n'].iloc[0])}): two training runs, not two measurements of one model. Their gap shows "
                 "training noise (steps, initialization, batch order), which the bootstrap intervals, computed over "
                 "evaluation samples of one model, do not include.")
    return text
