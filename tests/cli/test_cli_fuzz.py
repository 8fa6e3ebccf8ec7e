"""Fuzz the CLI's boundary: bad manifests, study specs and strategy strings must each end in exit
status 2 with exactly one stderr line — never a traceback, never a hang."""

import contextlib
import io
import itertools
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from shiftbn.adapt import parse_strategy
from shiftbn.cli.main import main
from tests.cli.test_cli import _cli
from tests.timeouts import deadline

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_counter = itertools.count()


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """A tiny user project: a model factory module, its weights and a two-site image folder."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "fuzznet.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    """))
    sys.path.append(str(root))
    import fuzznet

    torch.save(fuzznet.make().state_dict(), root / "w.pt")
    rng = np.random.default_rng(0)
    for site in ("site_a", "site_b"):
        for cls in ("neg", "pos"):
            (root / "data" / site / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8), mode="L").save(
                    root / "data" / site / cls / f"{i}.png")
    yield root
    sys.path.remove(str(root))


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with deadline(10), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, err.getvalue()


def _assert_one_line_error(status: int, err: str) -> None:
    assert status == 2, err
    lines = [line for line in err.strip().splitlines() if not re.match(r"\[\d+/\d+\] ", line)]  # after phase lines
    assert len(lines) == 1 and lines[0].startswith(("shiftbn ", "shiftbn:")) and ": error: " in lines[0], err
    assert "Traceback" not in err


def _user(proj: Path) -> list[str]:
    return ["--model", "fuzznet:make", "--weights", str(proj / "w.pt"), "--no-progress", "--batch-size", "2"]


def _fresh(proj: Path, name: str) -> Path:
    return proj / "out" / f"{name}{next(_counter)}"


_cell = st.one_of(st.text(max_size=12), st.integers(-3, 3).map(str), st.sampled_from(["", "nan", "data/site_a"]))
_columns = st.lists(st.sampled_from(["path", "label", "source", "extra", "PATH", ""]), max_size=4)


@st.composite
def bad_manifests(draw) -> str:
    """CSV text that is garbage, lacks a needed column, has no rows, or names files that are not images."""
    kind = draw(st.sampled_from(["garbage", "columns", "empty", "paths"]))
    if kind == "garbage":
        return draw(st.text(max_size=200))
    if kind == "columns":
        cols = draw(_columns.filter(lambda c: not {"path", "label", "source"} <= set(c)))
    else:
        cols = ["path", "label", "source"] + draw(st.lists(st.sampled_from(["extra", "x"]), max_size=1, unique=True))
    n = 0 if kind == "empty" else draw(st.integers(1, 4))
    rows = [[draw(_cell) for _ in cols] for _ in range(n)]
    if kind == "paths":
        for row in rows:
            # relative to the manifest's folder (out/): missing files, folders, files that are not images
            row[:3] = [draw(st.sampled_from(["missing.png", "..", "../data", "../w.pt", "../fuzznet.py",
                                             "../data/site_a/neg"])),
                       draw(st.sampled_from(["0", "1", "neg"])), draw(st.sampled_from(["site_a", "site_b"]))]
    quote = lambda v: '"' + v.replace('"', '""') + '"'  # noqa: E731
    return "\n".join(",".join(quote(v) for v in r) for r in [cols, *rows]) + "\n"


@given(text=bad_manifests(), command=st.sampled_from(["stats", "matrix"]))
@FUZZ
def test_bad_manifests_are_one_line_errors(proj, text, command):
    manifest = _fresh(proj, "manifest").with_suffix(".csv")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(text)
    _assert_one_line_error(*_run([command, *_user(proj), "--data", str(manifest), "--out", str(_fresh(proj, "o"))]))


_protocols = ["held_out_sources", "batch_composition", "ema_vs_precise", "normalization_batch_size",
              "shared_domains", "leakage_probe", "bag_leakage"]
_value = st.one_of(st.integers(-5, 5), st.text(max_size=8), st.booleans(), st.lists(st.integers(-2, 2), max_size=2))


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


@st.composite
def bad_specs(draw) -> str:
    """TOML text that is not TOML, or a spec with one defect found before any training."""
    kind = draw(st.sampled_from(["text", "protocol", "dataset", "param", "table", "study", "sources"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    protocol = draw(st.sampled_from(_protocols))
    dataset = '"blobs-labs"'
    extra = ""
    if kind == "protocol":
        protocol = draw(st.text(max_size=12).filter(lambda p: p not in _protocols))
    elif kind == "dataset":
        dataset = _toml(draw(st.one_of(st.text(max_size=10).filter(lambda d: "-labs" not in d), st.integers())))
    elif kind == "param":
        extra = f"\n[params]\nnot_a_param_{draw(st.integers(0, 99))} = {_toml(draw(_value))}\n"
    elif kind == "table":
        extra = f"\n[{draw(st.sampled_from(['study2', 'param', 'quik', 'x']))}]\na = 1\n"
    elif kind == "study":
        return f"study = {_toml(draw(_value))}\n"
    else:
        sources = draw(st.one_of(st.text(max_size=6), st.lists(st.text(max_size=4), min_size=1, max_size=2)))
        dataset += f"\nsources = {_toml(sources)}"
    return f'[study]\nprotocol = {_toml(protocol)}\ndataset = {dataset}\n{extra}'


@given(text=bad_specs(), resume=st.booleans())
@FUZZ
def test_bad_specs_are_one_line_errors(proj, text, resume):
    spec = _fresh(proj, "spec").with_suffix(".toml")
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(text)
    _assert_one_line_error(*_run(["run", str(spec), "--out", str(_fresh(proj, "r")), "--no-progress",
                                  *(["--resume"] if resume else [])]))


def _parses(spec: str) -> bool:
    try:
        parse_strategy(spec)
    except Exception:  # noqa: BLE001 - any refusal is what we want here
        return False
    return True


_known = st.sampled_from(["source", "precise", "target", "prior", "batch", "stats", "tent", "per-source", "ema"])


@given(spec=st.one_of(st.text(max_size=20), st.builds(lambda p, a: f"{p}:{a}", _known, st.text(max_size=10))))
@FUZZ
def test_bad_strategy_strings_are_one_line_errors(proj, spec):
    assume(not _parses(spec) and "\x00" not in spec)
    _assert_one_line_error(*_run(["matrix", *_user(proj), "--data", str(proj / "data"), f"--strategies={spec}",
                                  "--out", str(_fresh(proj, "m"))]))


@pytest.mark.parametrize("kind", ["manifest", "spec"])
def test_bad_inputs_in_a_subprocess_are_one_line_errors(proj, kind):
    bad = proj / ("bad.csv" if kind == "manifest" else "bad.toml")
    bad.write_text("path,label\n\x01,\"\n" if kind == "manifest" else "[study]\nprotocol = 3\n")
    args = (["stats", *_user(proj), "--data", str(bad), "--out", str(proj / "sub")] if kind == "manifest"
            else ["run", str(bad), "--out", str(proj / "sub")])
    res = _cli(*args, cwd=proj, timeout=60)
    _assert_one_line_error(res.returncode, res.stderr)


# Bad values of the flags checked as they are parsed (shiftbn.cli.types); each is tried on every command
# that has the flag. Nothing exists on disk: a value that got past parsing would fail on a missing file.
_BAD_VALUES = {
    "--seed": [["-1"], ["4294967296"], ["x"]],
    "--image-size": [["100000"], ["0"]],
    "--normalize": [["0.5", "0"], ["0.5", "-1"], ["nan", "1"], ["0.5", "inf"], ["0.1,0.2", "0.3,0.4,0.5"], [",", "1"]],
    "--device": [["meta"], ["meta:0"], [""]],
    "--batch-size": [["0"], ["-3"]],
    "--num-samples": [["0"]],
    "--threads": [["0"], ["100000"]],
    "--n-boot": [["5"], ["100000000000"]],
    "--ci": [["1"], ["nan"]],
    "--calibration": [["0"], ["1.5"]],
    "--alpha": [["2"]],
    "--n-null": [["5"], ["100000000000"]],
    "--min-count": [["0"]],
}
_REQUIRED = {"stats": ["--model", "m:f", "--weights", "w.pt", "--data", "d"],
             "recalibrate": ["--model", "m:f", "--weights", "w.pt", "--data", "d", "--output", "o.pt"],
             "monitor": ["--model", "m:f", "--weights", "w.pt", "--data", "d", "--reference", "a"],
             "merge": ["a.stats", "--out", "o.stats"], "run": ["spec.toml"]}
_REQUIRED["matrix"] = _REQUIRED["report"] = _REQUIRED["stats"]


def _flag_cases():
    from shiftbn.cli.main import build_parser

    commands = {a.dest: a for a in build_parser()._actions}["command"].choices
    for name, parser in commands.items():
        flags = {f for a in parser._actions for f in a.option_strings}
        for flag in sorted(flags & set(_BAD_VALUES)):
            for values in _BAD_VALUES[flag]:
                yield [name, *_REQUIRED.get(name, []), flag, *values], flag
    yield ["--dist-timeout", "-5", "stats", *_REQUIRED["stats"]], "--dist-timeout"
    yield ["--dist-timeout", "nan", "run", "spec.toml"], "--dist-timeout"


_CASES = list(_flag_cases())


def test_each_checked_flag_is_tried_on_every_command_that_has_it():
    where = {}
    for argv, flag in _CASES:
        where.setdefault(flag, set()).add(next(a for a in argv if not a.startswith("-") and a not in ("nan",)))
    users = {"stats", "matrix", "recalibrate", "report", "monitor"}
    assert where["--seed"] == users | {"demo"}
    assert where["--image-size"] == where["--normalize"] == where["--device"] == users
    assert where["--threads"] == users | {"demo", "run"}


@pytest.mark.parametrize("argv, flag", _CASES, ids=[" ".join(a) for a, _ in _CASES])
def test_bad_flag_values_are_one_line_errors_naming_the_flag(tmp_path, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    status, err = _run(argv)
    _assert_one_line_error(status, err)
    assert f"argument {flag}" in err, err


def test_a_folder_as_spec_and_an_uncreatable_out_name_the_argument(proj, tmp_path):
    status, err = _run(["run", str(tmp_path)])
    _assert_one_line_error(status, err)
    assert "is a folder; give a study spec file" in err
    if Path("/proc/self").is_dir():  # a virtual file system where no folder can be made
        status, err = _run(["stats", *_user(proj), "--data", str(proj / "data"), "--out", "/proc/shiftbn-out"])
        _assert_one_line_error(status, err)
        assert "--out /proc/shiftbn-out: cannot create the folder" in err
