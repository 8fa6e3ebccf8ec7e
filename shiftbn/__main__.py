"""``python -m shiftbn``: the ``shiftbn`` command line."""

from shiftbn.cli.main import run_as_script

if __name__ == "__main__":
    run_as_script()
