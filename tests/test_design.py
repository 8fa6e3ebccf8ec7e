"""The design step's contracts: imports point one way, strings live at the boundary, and a new
strategy, metric or study is one class or one table entry."""

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import shiftbn as sb
from shiftbn.evaluate import METRICS, Metric, register_metric
from shiftbn.studies import STUDIES, FigureSpec, Study, make_study, parse_spec
from shiftbn.studies.common import fit
from shiftbn.studies.models import MLP

PKG = Path(sb.__file__).resolve().parent

# Bottom to top; a module may import only from its own layer or below (../shared/DESIGN.md).
LAYERS = [
    ("shiftbn._torch", "shiftbn._io", "shiftbn._lock", "shiftbn._log", "shiftbn._names", "shiftbn._version",
     "shiftbn._safefile", "shiftbn._forward"),
    ("shiftbn.data", "shiftbn.samplers"),
    ("shiftbn.bn",),
    ("shiftbn.adapt",),
    ("shiftbn.evaluate",),
    ("shiftbn.sites",),
    ("shiftbn.studies",),
    ("shiftbn.cli", "shiftbn.integrations", "shiftbn.__main__"),
]


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"module {module} is in no layer of the design; add it to LAYERS")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _path_of(module: str) -> Path | None:
    base = PKG.parent.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand
    return None


def _reexports(package: str) -> dict[str, str]:
    """name -> defining module for the names a package's ``__init__`` imports from its own submodules."""
    path = _path_of(package)
    out: dict[str, str] = {}
    if path is None or path.name != "__init__.py":
        return out
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package + "."):
            out.update({a.asname or a.name: node.module for a in node.names})
    return out


def _edges(path: Path) -> set[str]:
    """The shiftbn modules a file depends on, at top level or inside functions; a name imported from a
    package resolves to the submodule that defines it (so ``from shiftbn.bn import native`` inside
    ``bn/`` is an edge to ``shiftbn.bn.native``, not to the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shiftbn"):
            reexp = _reexports(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if _path_of(sub) else reexp.get(a.name, node.module))
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("shiftbn")}
    return out


def _imports(path: Path) -> set[str]:
    return _edges(path)


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _edges(p) for p in sorted(PKG.rglob("*.py"))}


def test_imports_point_one_way():
    upward = []
    for name, imported_set in _graph().items():
        if name == "shiftbn":
            continue  # the package root names the core lazily
        for imported in imported_set:
            if imported == "shiftbn":
                upward.append(f"{name} imports the package root")
            elif _layer(imported) > _layer(name):
                upward.append(f"{name} (layer {_layer(name)}) imports {imported} (layer {_layer(imported)})")
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere():
    graph = {k: v - {"shiftbn"} for k, v in _graph().items() if k != "shiftbn"}
    assert not _cycles(graph), _cycles(graph)


def test_cycle_finder_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# every other cli/ module: a command
CLI_SHARED = {"__init__", "main", "_user", "_parser", "_renamed", "types", "dist", "_malloc"}
CLI_PRIVATE_FROM = {"_user", "_parser", "types"}  # the shared helpers a command may take private names from


def _cli_violations(folder: Path) -> list[str]:
    """Ways the modules of ``folder`` (a ``cli/``) break "one module per command, each declaring its own
    options": a command without ``register``/``run``, a command importing another command, a private
    name taken from a module other than the shared helpers, a parser's ``_actions`` edited after the fact."""
    commands = {p.stem for p in folder.glob("*.py")} - CLI_SHARED
    out = []
    for path in sorted(folder.glob("*.py")):
        name, tree = path.stem, ast.parse(path.read_text())
        if name in commands:
            defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            out += [f"{name} defines no {f}()" for f in ("register", "run") if f not in defs]
        aliases = {}  # local name -> cli module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname or a.name: a.name.rpartition(".")[2] for a in node.names
                            if a.name.startswith("shiftbn.cli.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shiftbn.cli"):
                module = node.module.removeprefix("shiftbn.cli").lstrip(".")
                for a in node.names:
                    target = module or a.name
                    if not module:
                        aliases[a.asname or a.name] = target
                    elif a.name.startswith("_") and target not in CLI_PRIVATE_FROM:
                        out.append(f"{name} imports the private {a.name} from {target}")
                    if name in commands and target in commands and target != name:
                        out.append(f"{name} imports the command module {target}")
            elif isinstance(node, ast.Attribute) and node.attr == "_actions":
                out.append(f"{name} edits a parser's _actions (declare the option where the parser is built)")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                  and not node.attr.startswith("__") and aliases.get(node.value.id, "") not in ("", *CLI_PRIVATE_FROM)):
                out.append(f"{name} uses the private {node.value.id}.{node.attr}")
        for alias, target in aliases.items():
            if name in commands and target in commands and target != name:
                out.append(f"{name} imports the command module {target} (as {alias})")
    return sorted(set(out))


def test_each_cli_command_is_one_module_declaring_its_own_options():
    from shiftbn.cli.main import COMMAND_MODULES, build_parser

    folder = PKG / "cli"
    assert not _cli_violations(folder), _cli_violations(folder)
    commands = sorted({p.stem for p in folder.glob("*.py")} - CLI_SHARED)
    assert sorted(m.__name__.rpartition(".")[2] for m in COMMAND_MODULES) == commands
    assert sorted({a.dest: a for a in build_parser()._actions}["command"].choices) == commands


def test_cli_rules_can_fail(tmp_path):
    (tmp_path / "_user.py").write_text("def _helper():\n    pass\n")
    (tmp_path / "good.py").write_text("import shiftbn.cli._user as user\nfrom shiftbn.cli._user import _helper\n"
                                      "def register(sub):\n    user._helper()\ndef run(args):\n    pass\n")
    assert _cli_violations(tmp_path) == []
    (tmp_path / "bad.py").write_text("from shiftbn.cli.good import _x\nimport shiftbn.cli.good as g\n"
                                     "def register(sub):\n    g._y\n    sub._actions[0].help = ''\n")
    assert _cli_violations(tmp_path) == [
        "bad defines no run()", "bad edits a parser's _actions (declare the option where the parser is built)",
        "bad imports the command module good", "bad imports the command module good (as g)",
        "bad imports the private _x from good", "bad uses the private g._y"]


def test_the_top_level_is_the_core_only():
    assert len(sb.__all__) <= 30, sb.__all__
    wings = ("shiftbn.sites", "shiftbn.studies", "shiftbn.cli", "shiftbn.integrations")
    assert not [n for n, m in sb._WHERE.items() if m.startswith(wings)]


def test_layer_walk_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from shiftbn.studies.report import save\n")
    assert "shiftbn.studies.report.figures" in _imports(bad) and _layer("shiftbn.studies") > _layer("shiftbn.bn")


def test_no_strings_parsed_back_out_of_results():
    pattern = re.compile(r'startswith\("stats:"\)|split\("\|"\)|split\("@"\)')
    hits = [f"{p}:{i}" for p in PKG.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


@pytest.fixture(scope="module")
def trained():
    ds = sb.load("blobs-labs", n=240)
    sp = ds.split(fractions=(0.5, 0.25, 0.25), seed=0)
    model = fit(sb.studies.TrainConfig(model=lambda seed: MLP(16, 3, seed=seed), steps=30), sp.train, seed=0)
    return model, ds


def test_strategy_objects_equal_their_spec_strings(trained):
    model, ds = trained
    strategies = [sb.adapt.EMA(), sb.adapt.Prior(16), sb.adapt.Target(), sb.adapt.StatsFromEach()]
    objs = sb.cross_source_matrix(model, ds, strategies, progress=False)
    strs = sb.cross_source_matrix(model, ds, ["ema", "prior:16", "target", "stats:*"], progress=False)
    pd.testing.assert_frame_equal(objs, strs)
    assert set(objs.loc[objs["is_cross_source"], "strategy"]) == {f"stats:{s}" for s in ds.sources_present}
    assert not objs.loc[~objs["is_cross_source"], "strategy"].str.startswith("stats:").any()


def test_a_new_strategy_is_one_class_and_caches_through_the_memo(trained):
    model, ds = trained
    calls = []

    class HalfPrior(sb.Strategy):
        """Source and target statistics mixed half and half (a user's own strategy)."""

        name = "half-prior"

        def stats_source(self, ctx, eval_source):
            return f"half:{eval_source}"

        def stats_sources(self, eval_source):
            return {eval_source}

        def bn_stats(self, ctx, eval_source):
            def mix():
                calls.append(eval_source)
                return sb.mix_stats(sb.buffer_stats(ctx.model), ctx.source_stats(eval_source), 0.5)

            return ctx.memo(("half", eval_source), mix)

    table = sb.cross_source_matrix(model, ds, [HalfPrior(), "ema"], ["accuracy", "nll"], progress=False)
    assert sorted(calls) == sorted(ds.sources_present)  # once per source, though two metrics
    assert set(table["strategy"]) == {"half-prior", "ema"}
    assert not table["is_cross_source"].any()


def test_source_alone_runs_no_statistics_pass(trained, monkeypatch):
    model, ds = trained
    matrix = importlib.import_module("shiftbn.evaluate.matrix")  # sb.evaluate is the function

    def boom(*args, **kwargs):
        raise AssertionError("a statistics pass ran")

    monkeypatch.setattr(matrix, "collect_stats", boom)
    table = sb.cross_source_matrix(model, ds, ["ema", "batch:16"], progress=False)
    assert len(table) == 2 * len(ds.sources_present)


def test_a_new_metric_is_one_table_entry(trained):
    model, ds = trained
    register_metric(Metric("error_rate", lambda out, y: float((out.argmax(1) != y).mean()), higher_is_better=False,
                           bounded=True, task="classification"))
    try:
        table = sb.cross_source_matrix(model, ds, ["ema"], ["accuracy", "error_rate"], progress=False)
        wide = table.pivot_table(index="eval_source", columns="metric", values="value")
        np.testing.assert_allclose(wide["error_rate"], 1 - wide["accuracy"], atol=1e-12)
        summary = sb.summarize(table).set_index("metric")
        # lower is better for the new metric: its worst source is the one with the highest value
        assert summary.loc["error_rate", "worst"] == wide["error_rate"].max()
        assert summary.loc["accuracy", "worst"] == wide["accuracy"].min()
    finally:
        METRICS.pop("error_rate")


def test_metric_table_drives_direction_and_bounds():
    assert not METRICS["nll"].higher_is_better and not METRICS["ece"].higher_is_better
    assert METRICS["accuracy"].bounded and not METRICS["nll"].bounded
    assert {m.task for m in METRICS.values()} == {"classification", "regression", "segmentation"}
    assert not METRICS["hd95"].higher_is_better and not METRICS["hd95"].bounded and METRICS["dice"].bounded


def test_a_new_study_is_one_class(tmp_path):
    @dataclass(kw_only=True)
    class SourceVsTarget(Study):
        """Accuracy gain of AdaBN over the EMA per source (a user's own study)."""

        name = "source_vs_target_test"
        axis = "widths"
        figure = FigureSpec("bars", x="width", hue="strategy", title="source vs target")

        widths: tuple[int, ...] = (4,)

        def cell(self, ds, seed, value):
            sp = ds.split(fractions=self.train.fractions, seed=seed)
            config = sb.studies.TrainConfig(model={"name": "MLP", "hidden": value}, steps=self.train.steps)
            model = fit(config, sp.train, seed)
            table = sb.cross_source_matrix(model, ds, ["ema", "target"], calibration=(sp.calibration, sp.test),
                                           progress=False)
            return table.assign(width=value, seed=seed)

    try:
        spec = parse_spec({"study": {"protocol": "source_vs_target_test", "dataset": {"name": "blobs-labs", "n": 150}},
                           "params": {"widths": [4, 8], "steps": 10, "seeds": [0, 1]}})
        run = sb.studies.RunFolder(tmp_path / "run", {"spec": "test"})
        table = sb.studies.run_study(spec, run, progress=False)
        assert (tmp_path / "run" / "figure.png").stat().st_size > 1000
        assert set(table["width"]) == {4, 8} and set(table["seed"]) == {0, 1}
        with pytest.raises(ValueError, match=r"\[params\] widths"):
            make_study("source_vs_target_test", {"widths": "wide"})
    finally:
        STUDIES.pop("source_vs_target_test")


@pytest.mark.parametrize("params, match", [
    ({"held_out": "lab_0"}, r"\[params\] held_out"),
    ({"seeds": []}, "seeds must hold at least one seed"),
    ({"steps": "many"}, r"\[params\] steps"),
    ({"sourcse": ["lab_a"]}, "unknown parameter.*sourcse"),
])
def test_spec_values_are_validated_with_the_key_named(params, match):
    with pytest.raises(ValueError, match=match):
        parse_spec({"study": {"protocol": "held_out_sources", "dataset": "digits-labs"}, "params": params})


def test_unknown_study_keys_are_refused():
    with pytest.raises(ValueError, match=r"\[study\] has unknown key.*sourcse"):
        parse_spec({"study": {"protocol": "held_out_sources", "dataset": "digits-labs", "sourcse": ["lab_a"]}})


def test_recalibrate_verb_matches_collect_and_load(trained):
    model, ds = trained
    a, b = [type(model)(16, 3) for _ in range(2)]
    a.load_state_dict(model.state_dict())
    b.load_state_dict(model.state_dict())
    stats = sb.sites.recalibrate(a, ds, target="lab_1", progress=False)
    ref = sb.collect_stats(b, ds.subset("lab_1"), progress=False)["lab_1"]
    sb.load_stats(b, ref)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert stats.num_samples == len(ds.indices_of("lab_1"))
    with pytest.raises(ValueError, match="needs target="):
        sb.sites.recalibrate(a, ds, method="target")
    with pytest.raises(ValueError, match="unknown method 'adabn'"):
        sb.sites.recalibrate(a, ds, target="lab_1", method="adabn")


def test_nan_outputs_are_refused_naming_strategy_and_source(trained):
    model, ds = trained

    class Broken(sb.Strategy):
        name = "broken"

        def stats_source(self, ctx, eval_source):
            return "ema"

        def logits(self, ctx, eval_source, x):
            out = torch.zeros(len(x), 3)
            out[0, 0] = float("nan")
            return out

    with pytest.raises(ValueError, match=r"'broken' produced NaN or infinite outputs for 1 of \d+ samples of source"):
        sb.cross_source_matrix(model, ds, [Broken()], progress=False)


@pytest.mark.parametrize("spec", ["prior:nan", "prior:inf", "tent-offline:inf", "batch:nan"])
def test_non_finite_strategy_numbers_are_refused_at_parse_time(spec):
    with pytest.raises(ValueError, match="finite|needs a number"):
        sb.parse_strategy(spec)


def test_tent_on_a_half_precision_model_gives_finite_outputs(trained):
    model, ds = trained
    half = type(model)(16, 3)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)

    class Float32Out(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x.to(torch.bfloat16)).float()

    table = sb.cross_source_matrix(Float32Out(half), ds, ["tent-offline:5"], progress=False)
    assert table["value"].notna().all()


def test_phase_lines_print_the_duration_of_finished_phases_and_quiet_silences_them(capsys, monkeypatch):
    from shiftbn import _log

    _log.set_quiet(False)  # the tests' default is quiet (conftest)
    clock = iter([100.0, 103.25, 103.25, 230.0])  # phase 1 takes 3.25 s, phase 2 126.75 s
    monkeypatch.setattr(_log.time, "monotonic", lambda: next(clock))
    with _log.Phases(2) as phases:
        phases.start("loading the model and data")
        assert capsys.readouterr().err == "[1/2] loading the model and data ...\n"  # no time: nothing finished yet
        phases.start("cross-source matrix")
    assert capsys.readouterr().err.splitlines() == [
        "[1/2] loading the model and data: done (3.2 s)", "[2/2] cross-source matrix ...",
        "[2/2] cross-source matrix: done (2 min 07 s)"]
    with pytest.raises(KeyError), _log.Phases(1) as phases:  # a failed phase is not "done"
        monkeypatch.setattr(_log.time, "monotonic", lambda: 0.0)
        phases.start("scoring")
        raise KeyError("boom")
    assert capsys.readouterr().err == "[1/1] scoring ...\n"
    _log.set_quiet(True)
    try:
        with _log.Phases(5) as phases:
            phases.start("held-out protocol")
        assert capsys.readouterr().err == "" and not _log.bars_wanted()
    finally:
        _log.set_quiet(False)
