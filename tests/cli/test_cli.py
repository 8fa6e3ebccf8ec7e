import argparse
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import shiftbn as sb
from shiftbn.cli.main import build_parser, main
from tests.helpers import write_user_project

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "shiftbn", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_help_is_complete_for_every_command():
    parser = build_parser()
    top = parser.format_help()
    for cmd in ("demo", "run", "stats", "matrix", "recalibrate"):
        assert cmd in top
    sub = {a.dest: a for a in parser._actions}["command"].choices
    assert "--resume" in sub["run"].format_help() and "--quick" in sub["demo"].format_help()
    assert "never overwritten" in sub["recalibrate"].format_help()
    for cmd in ("stats", "matrix", "recalibrate"):
        text = sub[cmd].format_help()
        assert "--model" in text and "--weights" in text and "--data" in text


def test_help_names_the_local_docs_command_and_the_page_mkdocs_writes():
    config = (ROOT / "mkdocs.yml").read_text()
    assert "use_directory_urls: false" not in config  # directory URLs: reference/cli.md -> reference/cli/index.html
    site = re.search(r"^site_dir: (\S+)", config, re.M).group(1)
    page = re.search(r'^PAGE = "(.+)\.md"', (ROOT / "tools" / "docs_hooks.py").read_text(), re.M).group(1)
    parser = build_parser()
    sub = {a.dest: a for a in parser._actions}["command"].choices
    for text in [parser.format_help(), *(p.format_help() for p in sub.values())]:
        flat = " ".join(text.split())
        assert f"Docs: make docs, then open {site}/{page}/index.html" in flat, text
        assert "README.md (CLI reference)" not in flat


@pytest.mark.parametrize("args, msg", [
    (["run", "nope.toml"], "study spec not found"),
    (["stats", "--model", "nomodule:f", "--weights", "w.pt", "--data", "d.csv"], "cannot import"),
])
def test_errors_are_one_line_without_traceback(args, msg, tmp_path):
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert msg in res.stderr and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if not re.match(r"\[\d+/\d+\] ", line)]  # after phase lines
    assert len(errors) == 1 and errors[0].startswith(f"shiftbn {args[0]}: error: ")


def test_an_error_raised_inside_shiftbn_is_its_message_alone(tmp_path, capsys):
    spec = tmp_path / "nope.toml"  # refused by shiftbn.studies (not shiftbn.cli): still no "raised in"
    assert main(["run", str(spec)]) == 2
    assert capsys.readouterr().err == f"shiftbn run: error: study spec not found: {spec}\n"


def _user_project(tmp_path):
    """A user's own package with a model factory, a checkpoint and an image folder of two sites."""
    write_user_project(tmp_path, "usernet", (("site_a", 40, 6), ("site_b", 150, 6)))
    return tmp_path


def test_old_strategy_spelling_runs_and_prints_one_note(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    common = ["--model", "usernet:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4", "--no-progress",
              "--no-ci"]
    assert main(["matrix", *common, "--strategies", "source", "--out", "old"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == ["shiftbn matrix: note: the strategy 'source' is now spelled 'ema' (the model's stored running "
                     "statistics); 'source' goes in the next release"]
    assert set(pd.read_csv(proj / "old" / "matrix.csv")["strategy"]) == {"ema"}
    assert main(["matrix", *common, "--strategies", "ema", "--out", "new"]) == 0
    assert "note:" not in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_csv(proj / "old" / "matrix.csv"), pd.read_csv(proj / "new" / "matrix.csv"))


def test_a_refused_old_strategy_spelling_is_one_error_line_without_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_user_project(tmp_path))
    err = _one_line_error(capsys, main(["matrix", "--model", "usernet:make", "--weights", "w.pt", "--data", "data",
                                        "--no-progress", "--strategies", "source:0", "--out", "bad"]))
    assert "error: strategy 'ema' takes no argument, got '0'" in err


def test_stats_matrix_recalibrate_on_a_users_model(tmp_path, monkeypatch):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    common = ["--model", "usernet:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4", "--no-progress"]
    assert main(["stats", *common, "--out", "st"]) == 0
    stats = sb.SourceStats.from_dict(json.loads((proj / "st" / "stats.json").read_text()))
    assert list(stats) == ["site_a", "site_b"] and stats["site_a"]["1"].count == 12 * 36
    assert set(pd.read_csv(proj / "st" / "shift.csv")["metric"]) == {"w2", "kl", "smd"}
    assert main(["matrix", *common, "--strategies", "ema", "target", "--out", "mx"]) == 0
    assert len(pd.read_csv(proj / "mx" / "matrix.csv")) == 4
    before = (proj / "w.pt").read_bytes()
    assert main(["recalibrate", *common, "--target", "site_b", "--output", "w.pt"]) == 2  # never the input
    assert main(["recalibrate", *common, "--target", "site_b", "--output", "b.pt"]) == 0
    assert main(["recalibrate", *common, "--target", "site_b", "--output", "b.pt"]) == 2  # exists, no --force
    assert (proj / "w.pt").read_bytes() == before
    new = torch.load(proj / "b.pt", weights_only=True)
    np.testing.assert_allclose(new["1.running_mean"].numpy(), stats["site_b"]["1"].mean, rtol=1e-5)
    np.testing.assert_allclose(new["1.running_var"].numpy(), stats["site_b"]["1"].var, rtol=1e-5)
    assert main(["recalibrate", *common, "--target", "site_z", "--output", "z.pt"]) == 2
    # images of the wrong size for the model: torch's error becomes one line, exit 2
    (proj / "usernet.py").write_text((proj / "usernet.py").read_text() + textwrap.dedent("""
        def make_big():
            return nn.Sequential(nn.Flatten(), nn.Linear(100, 4), nn.BatchNorm1d(4))
    """))
    import importlib

    import usernet

    importlib.reload(usernet)
    torch.save(usernet.make_big().state_dict(), proj / "big.pt")
    assert main(["stats", "--model", "usernet:make_big", "--weights", "big.pt", "--data", "data",
                 "--no-progress", "--out", "bad"]) == 2


def _spec(tmp_path):
    spec = tmp_path / "two_cells.toml"
    spec.write_text(textwrap.dedent("""
        [study]
        protocol = "held_out_sources"
        dataset = { name = "blobs-labs", n = 400 }

        [params]
        model = { name = "MLP", hidden = 16 }
        held_out = ["lab_1", "lab_3"]
        strategies = ["ema", "target"]
        steps = 150
        seeds = [0, 1]
    """))
    return spec


@pytest.mark.slow  # ~30 s: a real demo killed mid-run and resumed; make test-slow
def test_killed_run_resumes_to_the_same_results(tmp_path):
    spec = _spec(tmp_path)
    full = _cli("run", str(spec), "--out", str(tmp_path / "full"), "--no-progress")
    assert full.returncode == 0, full.stderr
    assert (tmp_path / "full" / "figure.png").stat().st_size > 1000
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "shiftbn", "run", str(spec), "--out", str(tmp_path / "cut"),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = tmp_path / "cut" / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and not (cells.exists() and len(list(cells.glob("*.csv"))) >= 1):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in cells.glob("*.csv"))
    assert 1 <= len(done_before) < 4, "the run must be killed midway"
    assert not (tmp_path / "cut" / "results.csv").exists()
    again = _cli("run", str(spec), "--out", str(tmp_path / "cut"), "--no-progress")
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _cli("run", str(spec), "--out", str(tmp_path / "cut"), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "results.csv"),
                                  pd.read_csv(tmp_path / "full" / "results.csv"))
    log = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    computed = [e["cell"] for e in log if e["status"] == "computed"]
    assert len(computed) == len(set(computed)) == 4  # no finished cell computed twice
    skipped = {e["cell"] for e in log if e["status"] == "skipped"}
    assert len(skipped) == len(done_before)


def _add_user_code(proj, code):
    import importlib

    import usernet

    (proj / "usernet.py").write_text((proj / "usernet.py").read_text() + textwrap.dedent(code))
    importlib.reload(usernet)


def _one_line_error(capsys, status):
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


BROKEN = """
    class Broken(nn.Module):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x):
            raise self.exc("inside forward")

    def bad_factory():
        return 1 / 0

    def quiet_assert():
        assert False

    def interrupt():
        raise KeyboardInterrupt

    def broken_assert():
        return Broken(AssertionError)

    def broken_index():
        return Broken(IndexError)

    def broken_not_impl():
        return Broken(NotImplementedError)
"""


def test_user_code_that_raises_anything_is_one_line_naming_where(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    _add_user_code(proj, BROKEN)
    import usernet

    torch.save(usernet.broken_assert().state_dict(), proj / "broken.pt")
    common = ["--data", "data", "--batch-size", "4", "--no-progress", "--out", "o"]
    err = _one_line_error(capsys, main(["stats", "--model", "usernet:bad_factory", "--weights", "w.pt", *common]))
    assert "--model usernet:bad_factory: the factory raised ZeroDivisionError: division by zero" in err
    err = _one_line_error(capsys, main(["stats", "--model", "usernet:quiet_assert", "--weights", "w.pt", *common]))
    assert "the factory raised AssertionError" in err
    for factory, exc in [("broken_assert", "AssertionError"), ("broken_index", "IndexError"),
                         ("broken_not_impl", "NotImplementedError")]:
        err = _one_line_error(capsys, main(["matrix", "--model", f"usernet:{factory}", "--weights", "broken.pt",
                                            "--strategies", "ema", *common]))
        assert f"{exc}: inside forward (raised in forward (usernet.py:" in err and "SHIFTBN_DEBUG=1" in err
    assert main(["stats", "--model", "usernet:interrupt", "--weights", "w.pt", *common]) == 130
    monkeypatch.setenv("SHIFTBN_DEBUG", "1")
    with pytest.raises(IndexError, match="inside forward"):
        main(["stats", "--model", "usernet:broken_index", "--weights", "broken.pt", *common])


def test_a_folder_named_like_a_library_in_cwd_is_never_imported(tmp_path):
    proj = _user_project(tmp_path)
    marker = proj / "pwned"
    (proj / "PIL").mkdir()
    (proj / "PIL" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    try:
        res = _cli("stats", "--model", "usernet:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4",
                   "--no-progress", "--out", "st", cwd=proj, timeout=120)
        assert res.returncode == 0, res.stderr
        assert not marker.exists()
        assert (proj / "st" / "stats.json").exists()  # the user's own module still came from cwd
    finally:
        (proj / "PIL" / "__init__.py").unlink()


def test_a_checkpoint_with_pickled_objects_is_refused_without_unsafe_advice(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    import usernet

    torch.save(usernet.make(), proj / "full.pt")  # a whole pickled model, not a state dict
    (proj / "junk.pt").write_bytes(b"not a checkpoint")
    common = ["--model", "usernet:make", "--data", "data", "--no-progress", "--out", "o"]
    err = _one_line_error(capsys, main(["stats", "--weights", "full.pt", *common]))
    assert "non-tensor Python objects" in err and "torch.save(model.state_dict(), path)" in err
    assert "False" not in err and "weights_only" not in err
    err = _one_line_error(capsys, main(["stats", "--weights", "junk.pt", *common]))
    assert "not a readable torch checkpoint" in err and "False" not in err


def test_out_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    (proj / "taken").write_text("x")
    err = _one_line_error(capsys, main(["stats", "--model", "usernet:make", "--weights", "w.pt", "--data", "data",
                                        "--no-progress", "--out", "taken"]))
    assert "--out taken exists and is a file" in err and "Errno" not in err
    err = _one_line_error(capsys, main(["run", str(_spec(tmp_path)), "--out", "taken", "--no-progress"]))
    assert "taken exists and is not a folder" in err and "Errno" not in err


def test_resume_while_a_run_is_live_is_refused_naming_the_pid(tmp_path, capsys):
    from tests.test_io import _holder

    proc = _holder(tmp_path / "live")
    try:
        err = _one_line_error(capsys, main(["run", str(_spec(tmp_path)), "--out", str(tmp_path / "live"),
                                            "--resume", "--no-progress"]))
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert f"in use by process {proc.pid}" in err


def test_a_malicious_pickle_is_refused_without_unsafe_advice(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    _add_user_code(proj, """
        class Evil:
            def __reduce__(self):
                return (open, ("pwned", "w"))
    """)
    import usernet

    torch.save({"x": usernet.Evil()}, proj / "evil.pt")
    err = _one_line_error(capsys, main(["stats", "--model", "usernet:make", "--weights", "evil.pt", "--data", "data",
                                        "--no-progress", "--out", "o"]))
    assert "non-tensor Python objects" in err and "False" not in err and not (proj / "pwned").exists()


def test_resume_under_another_thread_count_is_refused_naming_both(tmp_path, capsys):
    spec = tmp_path / "nodata.toml"  # the run folder is made, then loading the dataset fails: fast
    spec.write_text('[study]\nprotocol = "held_out_sources"\ndataset = "no-such-dataset"\n')
    out = tmp_path / "r"
    assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 2
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        err = _one_line_error(capsys, main(["run", str(spec), "--out", str(out), "--resume", "--no-progress"]))
    finally:
        torch.set_num_threads(threads)
    assert f"torch_threads was {threads}, now {threads + 1}" in err and "OMP_NUM_THREADS" in err
    err = _one_line_error(capsys, main(["run", str(spec), "--out", str(out), "--resume", "--no-progress"]))
    assert "numerics" not in err and "no-such-dataset" in err


def test_reference_model_with_kwargs_and_a_lightning_checkpoint(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    from shiftbn.studies.models import SmallResNet

    net = SmallResNet(num_classes=2, in_channels=1)
    lightning = {"epoch": 3, "global_step": 120, "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}
    torch.save(lightning, proj / "last.ckpt")
    base = ["matrix", "--model", "shiftbn.studies.models:SmallResNet", "--model-kwargs", "num_classes=2",
            "in_channels=1", "--weights", "last.ckpt", "--data", "data", "--batch-size", "4", "--strategies", "ema",
            "--no-progress", "--out", "mx"]
    assert main(base) == 2
    assert "--state-key state_dict --strip-prefix model." in capsys.readouterr().err
    assert main([*base, "--state-key", "state_dict"]) == 2  # keys still carry the prefix
    assert main([*base, "--state-key", "state_dict", "--strip-prefix", "net."]) == 2
    assert "no key of the state dict starts with it" in capsys.readouterr().err
    assert main([*base, "--state-key", "state_dict", "--strip-prefix", "model."]) == 0
    assert len(pd.read_csv(proj / "mx" / "matrix.csv")) == 2
    bad = [a if a != "in_channels=1" else "in_channels" for a in base]
    assert main([*bad, "--state-key", "state_dict", "--strip-prefix", "model."]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_real_folders_corrupt_grayscale_and_odd_size_files(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    (proj / "usernet.py").write_text((proj / "usernet.py").read_text() + textwrap.dedent("""
        def make_rgb():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    """))
    import importlib

    import usernet

    importlib.reload(usernet)
    torch.save(usernet.make_rgb().state_dict(), proj / "rgb.pt")
    rng = np.random.default_rng(1)
    data = proj / "rgb_data"
    for site in ("site_a", "site_b", "site_c"):
        for cls in ("neg", "pos"):
            folder = data / site / cls
            folder.mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), mode="RGB").save(folder / f"{i}.png")
    (data / "site_a" / "neg" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(data / "site_b" / "pos" / "g.png")
    big = rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(big, mode="RGB").save(data / "site_c" / "neg" / "big.png")
    common = ["--model", "usernet:make_rgb", "--weights", "rgb.pt", "--data", "rgb_data", "--batch-size", "4",
              "--no-progress", "--strategies", "ema", "target"]
    assert main(["matrix", *common, "--out", "plain"]) == 2  # the grayscale or the odd size, named
    assert re.search(r"g\.png|big\.png", capsys.readouterr().err)
    assert main(["matrix", *common, "--strict", "--channels", "3", "--image-size", "8", "--out", "strict"]) == 2
    assert "corrupt.png" in capsys.readouterr().err
    assert main(["matrix", *common, "--channels", "3", "--image-size", "8", "--normalize", "0.5", "0.25,0.25,0.25",
                 "--out", "mx"]) == 0
    skipped = pd.read_csv(proj / "mx" / "skipped.csv")
    assert list(skipped["path"].map(lambda p: Path(p).name)) == ["corrupt.png"]
    table = pd.read_csv(proj / "mx" / "matrix.csv")
    assert table.groupby("eval_source")["n"].first().sum() > 0 and len(table) == 6
    assert main(["matrix", *common, "--normalize", "0.5", "x", "--out", "bad"]) == 2
    assert "argument --normalize: takes numbers" in capsys.readouterr().err


def _subparsers(parser):
    return {a.dest: a for a in parser._actions}["command"].choices


HIDDEN = {*((cmd, "--site") for cmd in ("stats", "monitor")), ("recalibrate", "--output"), ("monitor", "--save")}


def test_helps_name_only_options_their_command_has_and_spell_defaults_one_way():
    """Every ``--flag`` in a command's help is one of its own options, or follows the name of the command
    that has it (``recalibrate --stats``); every default is spelled ``(default: X)``; no flag is cut at a
    hyphen by the line wrapping. (The top-level help speaks of the commands' options: not scanned for flags.)"""
    parser = build_parser()
    sub = _subparsers(parser)
    own = {cmd: set(p._option_string_actions) for cmd, p in sub.items()}
    own["shiftbn"] = set(parser._option_string_actions)
    for cmd, text in [("shiftbn", parser.format_help()), *((c, p.format_help()) for c, p in sub.items())]:
        assert not re.search(r"--[a-z-]*-\n", text), f"{cmd}: a flag is cut at a hyphen in\n{text}"
        flat = " ".join(text.split())
        for m in re.finditer(r"(?:\b([a-z]+) )?(--[a-z][a-z0-9-]*[a-z0-9])", flat if cmd in sub else ""):
            owner = m.group(1) if m.group(1) in sub else cmd
            assert m.group(2) in own[owner], f"{cmd}'s help names {m.group(2)}, an option {owner} lacks: {m.group(0)!r}"
        for m in re.finditer(r"default", flat):
            assert flat[m.start() - 1:m.start() + 9] == "(default: ", f"{cmd}: {flat[m.start() - 40:m.end() + 20]!r}"


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    for cmd, sub in _subparsers(parser).items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            if action.help == argparse.SUPPRESS:  # an old spelling, hidden: --site (prints a note) or a kept alias
                assert (cmd, *action.option_strings) in HIDDEN, f"{cmd} {action.option_strings[0]} is hidden"
                continue
            assert action.help, f"{cmd} {action.option_strings[0]} has no help text"
            shown = sub._get_formatter()._get_help_string(action)
            if not action.required and action.nargs != 0 and not shown.endswith("(required)"):
                assert "default" in shown, f"{cmd} {action.option_strings[0]}: no default in {shown!r}"
    sub = _subparsers(parser)
    for cmd in ("demo", "run", "stats", "matrix", "recalibrate"):
        text = " ".join(sub[cmd].format_help().split())
        assert "--threads N" in text and "--quiet" in text
    assert "(default: runs/demo)" in sub["demo"].format_help()
    matrix = " ".join(sub["matrix"].format_help().split())
    from shiftbn._names import GRAMMAR, METRIC_NAMES

    assert "batch:B[:mixed] (B >= 1)" in matrix and "stats:*" in matrix and GRAMMAR.split(" | ")[0] in matrix
    assert all(name in matrix for name in METRIC_NAMES)


def test_bare_shiftbn_prints_the_help_and_version_prints_the_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: shiftbn") and "recalibrate" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"shiftbn {sb.__version__}"


def test_threads_and_quiet_hold_during_the_command_and_are_restored(monkeypatch):
    import shiftbn.cli.demo as demo
    from shiftbn import _log
    from shiftbn.cli._user import progress

    seen = {}

    def fake(args):
        seen.update(threads=torch.get_num_threads(), quiet=_log.quiet(), progress=progress(args))

    monkeypatch.setattr(demo, "run", fake)
    _log.set_quiet(False)  # the tests' default is quiet (conftest)
    before = torch.get_num_threads()
    assert main(["demo", "--threads", "1", "--quiet"]) == 0
    assert seen == {"threads": 1, "quiet": True, "progress": False}
    assert torch.get_num_threads() == before and not _log.quiet()
    assert main(["demo"]) == 0  # stderr is not a terminal here: no bars even without --no-progress
    assert seen == {"threads": before, "quiet": False, "progress": False}


def test_threads_are_recorded_and_a_resume_under_another_count_is_refused(tmp_path, capsys):
    spec = tmp_path / "nodata.toml"  # the run folder is made, then loading the dataset fails: fast
    spec.write_text('[study]\nprotocol = "held_out_sources"\ndataset = "no-such-dataset"\n')
    out = tmp_path / "r"
    assert main(["run", str(spec), "--out", str(out), "--threads", "1", "--no-progress"]) == 2
    assert json.loads((out / "environment.json").read_text())["torch_threads"] == 1
    assert json.loads((out / "run.json").read_text())["numerics"]["torch_threads"] == 1
    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(out), "--resume", "--threads", "1", "--no-progress"]) == 2
    assert "no-such-dataset" in capsys.readouterr().err  # same count: the resume itself is accepted
    threads = torch.get_num_threads()
    if threads != 1:
        err = _one_line_error(capsys, main(["run", str(spec), "--out", str(out), "--resume", "--no-progress"]))
        assert f"torch_threads was 1, now {threads}" in err


@pytest.mark.slow  # ~30 s: the quick demo with --held-out-protocol in a subprocess; make test-slow
def test_demo_through_a_pipe_prints_one_line_per_phase_and_no_bars(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # bars asked for: only the pipe stops them
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "d"  # with the held-out protocol (the default run skips it: tests/studies/test_demo.py)
    res = subprocess.run([sys.executable, "-m", "shiftbn", "demo", "--quick", "--held-out-protocol", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "\r" not in res.stdout
    lines = res.stderr.strip().splitlines()  # a line when each phase starts, one with its duration when it ends
    assert [line.split("]")[0] for line in lines] == [f"[{i}/8" for i in range(1, 9) for _ in "se"], res.stderr
    assert all(re.search(r": done \((\d+\.\d s|\d+ min \d\d s)\)$", line) for line in lines[1::2]), res.stderr
    assert "training SmallCNN on lab_a, lab_b, lab_c, lab_d" in lines[0]
    assert "held-out protocol: lab_e" in lines[6] and "EMA vs PreciseBN" in lines[8]
    assert set(pd.read_csv(out / "heldout.csv")["held_out"]) == {"lab_e"}
    assert "<h2>Held-out labs</h2><img" in (out / "report.html").read_text()  # the bars, not the how-to note
    assert res.stdout.strip().splitlines()[-2] == f"Report: {out / 'report.html'}"
    assert res.stdout.strip().splitlines()[-1].startswith("Next, your own model: shiftbn report --model ")


def test_matrix_prints_intervals_and_counts_by_default(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    common = ["matrix", "--model", "usernet:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4",
              "--no-progress", "--strategies", "ema", "target", "--n-boot", "50"]
    assert main([*common, "--out", "mx"]) == 0
    out = capsys.readouterr().out
    assert "[95% interval]" in out and "(n=" in out and re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", out)
    assert {"ci_low", "ci_high"} <= set(pd.read_csv(proj / "mx" / "matrix.csv").columns)
    assert main([*common, "--no-ci", "--out", "plain"]) == 0
    assert "interval" not in capsys.readouterr().out
    assert "ci_low" not in pd.read_csv(proj / "plain" / "matrix.csv").columns
    assert main([*common, "--ci", "2", "--out", "bad"]) == 2


def test_matrix_held_out_gives_reports_matrix_cell_for_cell(tmp_path, monkeypatch, capsys):
    write_user_project(tmp_path, "heldnet", (("site_a", 40, 4), ("site_b", 150, 4), ("site_c", 230, 4)))
    monkeypatch.chdir(tmp_path)
    common = ["--model", "heldnet:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4", "--no-progress",
              "--no-ci", "--strategies", "ema", "precise", "target", "--seed", "3", "--calibration", "0.5"]
    assert main(["report", *common, "--held-out", "site_c", "--out", "rep"]) == 0
    report = pd.read_csv(tmp_path / "rep" / "matrix.csv")
    metrics = ["--metrics", *report["metric"].unique()]
    assert main(["matrix", *common, *metrics, "--held-out", "site_c", "--out", "held"]) == 0
    out = capsys.readouterr().out
    assert "held out (never trained on): site_c; precise pools the calibration data of: site_a, site_b" in out
    assert "site_c [held out]" in out
    held = pd.read_csv(tmp_path / "held" / "matrix.csv")
    pd.testing.assert_frame_equal(held, report)  # same rows, same columns, same values exactly
    assert main(["matrix", *common, *metrics, "--out", "all"]) == 0
    every = pd.read_csv(tmp_path / "all" / "matrix.csv")
    cell = "strategy == 'precise' and eval_source == 'site_c' and metric == 'nll'"
    assert every.query(cell)["value"].item() != held.query(cell)["value"].item()  # the flag changes precise
    # --held-out in both helps says which sources feed precise; bad names are one line naming the flag
    sub = {a.dest: a for a in build_parser()._actions}["command"].choices
    for cmd in ("matrix", "report"):
        helps = {a.dest: a.help for a in sub[cmd]._actions}
        assert "precise = PreciseBN over the training sources' calibration data (every source not in --held-out)" \
            in helps["held_out"]
    capsys.readouterr()
    assert main(["matrix", *common, "--held-out", "site_bb", "--out", "bad"]) == 2
    assert "--held-out 'site_bb' is not a source of the data (sources: site_a, site_b, site_c); did you mean site_b?" \
        in capsys.readouterr().err
    assert main(["matrix", *common, "--held-out", "site_a", "site_b", "site_c", "--out", "bad"]) == 2
    assert "--held-out names every source" in capsys.readouterr().err


def _tiny_project(tmp_path, module):
    write_user_project(tmp_path, module, (("site_a", 40, 4), ("site_b", 150, 4)))
    return ["--model", f"{module}:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4"]


PHASE = re.compile(r"^\[\d+/\d+\] ")


def test_report_on_a_terminal_shows_phase_lines_with_durations_and_bars_with_rate_and_eta(tmp_path):
    """stderr is a pseudo-terminal (what a person sees): numbered phases, each finished one with its
    duration, and tqdm bars with their rate and time left."""
    import pty

    common = _tiny_project(tmp_path, "ptynet")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["PYTHONPATH"] = str(ROOT)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "shiftbn", "report", *common, "--strategies", "ema", "target",
                             "--n-boot", "10", "--out", "rep"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    out = proc.communicate(timeout=300)[0].decode()
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, err
    lines = [line for line in re.split(r"[\r\n]+", err) if PHASE.match(line)]
    assert lines[0] == "[1/2] loading the model and data ..."
    assert re.fullmatch(r"\[1/2\] loading the model and data: done \(\d+\.\d s\)", lines[1])
    assert lines[2].startswith("[2/2] the report on 16 samples of 2 source(s)") and len(lines) == 4
    # a bar: elapsed<left, rate (tqdm writes a slow rate as seconds per unit: "4.71s/cell" on a loaded machine)
    assert re.search(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?(\w+/s|s/\w+)\]", err), err
    assert "Report: rep/report.html" in out and "\r" not in out


def test_quiet_on_a_pipe_prints_nothing_but_the_results_and_a_notebook_sees_phase_lines(tmp_path, monkeypatch,
                                                                                      capsys):
    common = _tiny_project(tmp_path, "pipenet")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # bars asked for: only the pipe stops them
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-m", "shiftbn", "matrix", *common, "--strategies", "ema", "--no-ci", "-q",
                          "--out", "mx"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    lines = res.stdout.splitlines()  # the table and where it was written, nothing else
    assert len(lines) == 6 and lines[:2] == ["", "accuracy:"] and lines[4:] == ["", "Wrote mx/matrix.csv"], lines
    assert lines[2].split() == ["strategy", "site_a", "(n=4)", "site_b", "(n=4)"] and lines[3].split()[0] == "ema"
    # in a notebook (stderr not a terminal, not quiet): the phase lines are the sign of life, no bars
    from shiftbn import _log

    monkeypatch.chdir(tmp_path)
    _log.set_quiet(False)  # the tests' default is quiet (conftest)
    assert main(["matrix", *common, "--strategies", "ema", "--no-ci", "--out", "nb"]) == 0
    err = capsys.readouterr().err
    assert [line.split(" ...")[0].split(": done")[0] for line in err.splitlines()] == [
        "[1/2] loading the model and data", "[1/2] loading the model and data",
        "[2/2] the cross-source matrix: 1 strategy spec(s) x 2 source(s)",
        "[2/2] the cross-source matrix: 1 strategy spec(s) x 2 source(s)"], err
    assert "\r" not in err


def test_out_is_the_output_flag_errors_name_flags_and_suggest_the_closest_name(tmp_path, monkeypatch, capsys):
    common = _tiny_project(tmp_path, "outnet")
    monkeypatch.chdir(tmp_path)
    assert main(["recalibrate", *common, "--target", "site_b", "--out", "b.pt"]) == 0
    assert main(["recalibrate", *common, "--target", "site_b", "--output", "c.pt"]) == 0  # the first spelling, kept
    assert (tmp_path / "b.pt").read_bytes() == (tmp_path / "c.pt").read_bytes()
    assert "note:" not in capsys.readouterr().err
    for args, want in (
            (["recalibrate", *common, "--target", "site_b"], "give its path with --out FILE"),
            (["recalibrate", *common, "--out", "d.pt"],
             "--method target (the default) recomputes one source's statistics: name it with --target SOURCE, one of "
             "site_a, site_b"),
            (["recalibrate", *common, "--target", "site_bb", "--out", "d.pt"],
             "--target 'site_bb' is not a source of the data (sources: site_a, site_b); did you mean site_b?"),
            (["monitor", *common, "--reference", "Site_A"], "--reference 'Site_A' is not a source of the data "
                                                            "(sources: site_a, site_b); did you mean site_a?"),
            (["monitor", *common, "--reference", "site_a", "--sources", "site_c"], "--sources 'site_c'"),
            (["matrix", *common, "--strategies", "stats:site_q", "--out", "mx"],
             "--strategies stats:SOURCE 'site_q' is not a source of the data"),
            (["monitr"], "invalid choice: 'monitr'"),
            (["stats", *common, "--mode", "bach"], "invalid choice: 'bach'")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert want in err and len(err.strip().splitlines()) == 1 and "=" not in err, err
        if "invalid choice" in err:
            assert re.search(r"(did you mean|maybe you meant) '(monitor|batch)'", err), err
    # a library message that reaches the command line speaks of its options, not of Python keywords
    import shiftbn.cli.recalibrate as recalibrate_cmd

    ds = sb.data.from_folder(tmp_path / "data")
    monkeypatch.setattr(recalibrate_cmd, "run", lambda args: sb.sites.recalibrate(torch.nn.BatchNorm1d(2), ds))
    assert main(["recalibrate", *common, "--out", "e.pt"]) == 2
    assert capsys.readouterr().err == ("shiftbn recalibrate: error: --method target needs --target, one of "
                                       "['site_a', 'site_b']\n")
    from shiftbn.cli.main import _as_flags

    assert _as_flags("n=3 and seed=4", {"--seed"}) == "n=3 and --seed 4"  # a keyword the command lacks stays
    with pytest.raises(ValueError, match=r"unknown source 'site_bb'; known sources: \['site_a', 'site_b'\]; did you "
                                         r"mean 'site_b'\?"):
        sb.data.from_folder(tmp_path / "data").source_id("site_bb")


def test_num_samples_below_two_is_one_error_line_and_few_samples_one_warning_line(tmp_path, monkeypatch, capsys):
    common = _tiny_project(tmp_path, "fewnet")
    monkeypatch.chdir(tmp_path)
    weights = common.index("--weights") + 1
    unreadable = [*common[:weights], "missing.pt", *common[weights + 1:]]  # refused before the weights are read
    for cmd in ("matrix", "report", "stats", "recalibrate"):
        extra = ["--target", "site_a", "--out", "r.pt"] if cmd == "recalibrate" else ["--out", cmd]
        for args in (common, unreadable):
            err = _one_line_error(capsys, main([cmd, *args, "--num-samples", "1", "--no-progress", *extra]))
            assert "--num-samples must be >= 2 samples per source" in err and "leave --num-samples out" in err, err
        assert not (tmp_path / cmd).exists() and not (tmp_path / "r.pt").exists()
    assert main(["matrix", *common, "--num-samples", "3", "--strategies", "target", "--no-ci", "--out", "few"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == ["shiftbn matrix: warning: BN statistics from fewer than 16 samples (site_a: 3, site_b: 3) are "
                      "noisy; their matrix cells are doubtful: calibrate on more samples (num_samples / "
                      "--num-samples, calibration / --calibration)"], warned


def test_strategies_help_states_what_one_grouping_costs():
    # batch:B and per-batch prior:N are scored over 5 groupings: both helps say what each costs against a plain
    # forward (benchmarks/bench_groupings.py), one figure for both strategies
    sub = _subparsers(build_parser())
    for cmd in ("matrix", "report"):
        text = " ".join(sub[cmd].format_help().split())
        assert re.search(r"a batch:B or prior:N grouping costs about 1\.\d+-1\.\d+x a plain forward", text), text
