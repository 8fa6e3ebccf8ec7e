"""Fast start: ``import shiftbn.cli.main`` and ``shiftbn --help`` load no torch/pandas/matplotlib; the lazy
package root still resolves every public name."""

import os
import subprocess
import sys
import time
from pathlib import Path

import shiftbn as sb
from shiftbn import _names

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "pandas", "seaborn", "matplotlib", "numpy")


def _python(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    return res, time.perf_counter() - t0


def test_importing_the_cli_loads_no_heavy_library():
    code = f"import shiftbn.cli.main, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
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
    code = ("import inspect, warnings, shiftbn as sb\n"
            "import shiftbn.studies.training, shiftbn.sites.recalibration\n"
            "from shiftbn import collect_stats\n"
            "from shiftbn.studies import RunFolder, train\n"
            "missing = [n for n in sb.__all__ if getattr(sb, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert set(sb.__all__) <= set(dir(sb)) and len(sb.__all__) <= 30, len(sb.__all__)\n"
            "assert inspect.isfunction(sb.studies.train) and inspect.isfunction(sb.sites.recalibrate)\n"
            "assert inspect.ismodule(sb.evaluate) and inspect.ismodule(sb.sites) and inspect.ismodule(sb.studies)\n"
            "assert train is sb.studies.train and RunFolder is sb.studies.RunFolder\n"
            "assert sb.bn.buffer_stats is sb.buffer_stats\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    assert sb.per_site_model is sb.sites.per_site_model\n"
            "assert 'moved to shiftbn.sites.per_site_model' in str(w[0].message), w\n"
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
    from shiftbn.adapt.spec import _BUILT_IN, _DEPRECATED
    from shiftbn.evaluate.metrics import METRICS

    assert tuple(METRICS)[:len(_names.METRIC_NAMES)] == _names.METRIC_NAMES
    assert GRAMMAR is _names.GRAMMAR
    prefixes = {item.split(":")[0].split(" ")[0] for item in GRAMMAR.split(" | ")}
    assert prefixes == set(_BUILT_IN) - _DEPRECATED  # old spellings parse (with a note) but are not listed
