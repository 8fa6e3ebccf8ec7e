"""Fast start: ``import shiftbn.cli`` and ``shiftbn --help`` load no torch/pandas/matplotlib; the lazy
package root still resolves every public name."""

import os
import subprocess
import sys
import time
from pathlib import Path

import shiftbn as sb
from shiftbn import _names

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "seaborn", "matplotlib", "numpy")


def _python(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    return res, time.perf_counter() - t0


def test_importing_the_cli_loads_no_heavy_library():
    code = f"import shiftbn.cli, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    res, _ = _python("-c", code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    code = f"import shiftbn, sys; print(shiftbn.__version__, [m for m in {HEAVY!r} if m in sys.modules])"
    res, _ = _python("-c", code)
    assert res.stdout.split() == [sb.__version__, "[]"]


def test_help_and_argument_errors_answer_fast():
    for args, status in [(["--help"], 0), (["matrix", "--help"], 0), (["demo", "--threads", "0"], 2), ([], 0)]:
        res, seconds = _python("-m", "shiftbn", *args)
        assert res.returncode == status, (args, res.stderr)
        assert seconds < 5, f"shiftbn {' '.join(args)} took {seconds:.1f} s"
        assert "Traceback" not in res.stderr
    res, _ = _python("-m", "shiftbn", "--version")
    assert res.returncode == 0 and res.stdout.strip() == f"shiftbn {sb.__version__}"


def test_every_public_name_resolves_in_a_fresh_process():
    code = ("import inspect, shiftbn as sb\n"
            "import shiftbn.train, shiftbn.evaluate.matrix\n"  # submodules named like the functions they export
            "from shiftbn import RunFolder, collect_stats, train, evaluate\n"
            "missing = [n for n in sb.__all__ if getattr(sb, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert set(sb.__all__) <= set(dir(sb))\n"
            "assert inspect.isfunction(sb.train) and inspect.isfunction(sb.evaluate), (sb.train, sb.evaluate)\n"
            "assert train is sb.train and evaluate is sb.evaluate and RunFolder is sb.RunFolder\n"
            "assert sb.bn.buffer_stats is sb.buffer_stats\n"
            "print('ok')")
    res, _ = _python("-c", code)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_every_public_name_resolves_here():
    assert len(sb.__all__) == len(set(sb.__all__)) and set(sb.__all__) <= set(dir(sb))
    assert set(sb._WHERE) == set(sb.__all__)
    for name in sb.__all__:
        assert getattr(sb, name) is getattr(__import__(sb._WHERE[name], fromlist=[name]), name), name


def test_metric_names_and_grammar_match_the_library():
    from shiftbn.adapt import GRAMMAR
    from shiftbn.adapt.spec import _BUILT_IN
    from shiftbn.evaluate.metrics import METRICS

    assert tuple(METRICS)[:len(_names.METRIC_NAMES)] == _names.METRIC_NAMES
    assert GRAMMAR is _names.GRAMMAR
    prefixes = {item.split(":")[0].split(" ")[0] for item in GRAMMAR.split(" | ")}
    assert prefixes == set(_BUILT_IN)
