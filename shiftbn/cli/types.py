"""argparse ``type=`` functions shared by the commands: every value a flag takes is checked once, where
it is parsed.

Why: a bad value must stop at the boundary as one line that names the flag (argparse prefixes
``argument --flag:``) and the fix, not deep inside numpy or torch as a message about something else, a
120 GB allocation or a silently ignored value. Standard library only (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import math
import os

SEED_MAX = 2**32 - 1  # numpy's legacy seeding and torch.manual_seed take every seed up to here
IMAGE_SIZE_MAX = 8192  # one 3-channel float32 image of 8192 x 8192 is 0.75 GiB
RESAMPLES_MAX = 100_000  # bootstrap draws: more change no printed digit and cost memory per draw
SECONDS_MAX = 10**9  # about 31 years: past it datetime.timedelta and torch's timeout overflow


def _whole(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a whole number of {what}, got {text!r}") from None


def count_type(unit: str, minimum: int = 1, maximum: int | None = None, why: str = ""):
    """An argparse ``type`` for a count of ``minimum``..``maximum`` ``unit``s (e.g. "sample", "thread");
    ``why`` (shown when above ``maximum``) says where the bound comes from."""
    def parse(text: str) -> int:
        value = _whole(text, f"{unit}s")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"needs at least {minimum} {unit}{'s' * (minimum != 1)}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"takes at most {maximum:,} {unit}s{f' ({why})' if why else ''}, got "
                                             f"{value:,}")
        return value

    return parse


def threads(text: str) -> int:
    """``--threads``: 1 to the CPUs of this machine (a huge count aborts the process creating threads)."""
    cpus = os.cpu_count()
    return count_type("thread", maximum=cpus, why="the CPUs of this machine" if cpus else "")(text)


def seed(text: str) -> int:
    """``--seed``: a whole number 0..2**32 - 1."""
    value = _whole(text, "seed")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"needs a whole number from 0 to {SEED_MAX} (2**32 - 1), got {value}")
    return value


def image_size(text: str) -> int:
    """``--image-size``: a side of 1..``IMAGE_SIZE_MAX`` pixels."""
    value = _whole(text, "pixels")
    if not 1 <= value <= IMAGE_SIZE_MAX:
        raise argparse.ArgumentTypeError(
            f"needs a side of 1 to {IMAGE_SIZE_MAX} pixels (one 3-channel image of {IMAGE_SIZE_MAX} x "
            f"{IMAGE_SIZE_MAX} is 0.75 GiB as float32), got {value}; leave it out to keep the images' own size")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (``--calibration``, ``--ci``, ``--alpha``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"needs a number strictly between 0 and 1, e.g. 0.5; got {text}")
    return value


def seconds(text: str) -> float:
    """``--dist-timeout``: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number of seconds, got {text!r}") from None
    if not 0 < value <= SECONDS_MAX:
        raise argparse.ArgumentTypeError(f"needs a positive number of seconds up to {SECONDS_MAX:.0e}, e.g. 1800; "
                                         f"got {text}")
    return value


def device(text: str) -> str:
    """``--device``: a device that holds data; torch checks the rest (cuda:N exists, mps is built) when
    the model moves there."""
    kind = text.strip().partition(":")[0].lower()
    if not kind:
        raise argparse.ArgumentTypeError("needs a device: cpu, cuda, cuda:N or mps")
    if kind == "meta":
        raise argparse.ArgumentTypeError("meta tensors hold no data, so nothing can be computed on them; use cpu, "
                                         "cuda, cuda:N or mps")
    return text.strip()


def numbers(text: str) -> tuple[float, ...]:
    """Finite numbers, one or comma-separated (one per channel)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes numbers, one or comma-separated per channel, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"takes finite numbers, got {text!r}")
    return values


class Normalize(argparse.Action):
    """``--normalize MEAN STD`` (each parsed by ``numbers``): STD > 0, and MEAN and STD of one length
    (one per channel) or one of them a single value for every channel."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        mean, std = values
        if min(std) <= 0:
            raise argparse.ArgumentError(self, f"STD divides, so every value must be > 0, got "
                                               f"{','.join(f'{v:g}' for v in std)}; e.g. --normalize 0.5 0.25")
        if len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise argparse.ArgumentError(self, f"MEAN has {len(mean)} values and STD {len(std)}; give one per "
                                               "channel to both (or one value for every channel)")
        setattr(namespace, self.dest, (mean, std))
