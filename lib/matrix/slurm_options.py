"""The matrix executor and the Slurm menu: typed, validated, turned into sbatch options.

These options are not trainer flags: `make test-matrix` and `make
sbatch-train` read them here. `problems` is called by lib/kconfig.py while a
configuration loads, so a malformed time limit is an error naming the file,
line and symbol, like every other option, before anything is written.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

# Every symbol of the executor choice and the Slurm menu, read by `slurm_options`.
SETTINGS = ("MATRIX_EXECUTOR", "SLURM_PARTITION", "SLURM_ACCOUNT", "SLURM_QOS", "SLURM_TIME",
            "SLURM_SIGNAL_SECONDS", "SLURM_GPUS", "SLURM_CPUS", "SLURM_MEM", "SLURM_MAX_RUNNING",
            "SLURM_EXTRA_ARGS")

TIME_FORMS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
# sbatch options kprune writes itself; setting them again would break the array or its logs.
OWN_OPTIONS = ("--array", "-a", "--output", "-o", "--error", "-e", "--chdir", "-D", "--signal", "--job-name", "-J",
               "--parsable", "--wrap", "--open-mode")
_NAME = re.compile(r"^[A-Za-z0-9_.,-]*$")
_MEM = re.compile(r"^([0-9]+)([KMGT]?)$")


@dataclass(frozen=True)
class SlurmOptions:
    partition: str
    account: str
    qos: str
    time: str
    signal_seconds: int
    gpus: int
    cpus: int
    mem: str
    max_running: int
    extra_args: tuple[str, ...]

    def sbatch_options(self, gpus_flag: str = "--gpus") -> list[str]:
        """The resource options shared by a matrix task and an sbatch-train job."""
        out = [f"--{name}={value}" for name, value in
               (("partition", self.partition), ("account", self.account), ("qos", self.qos), ("time", self.time))
               if value]
        out.append(f"--cpus-per-task={self.cpus}")
        if self.mem:
            out.append(f"--mem={self.mem}")
        if self.gpus:
            out.append(f"{gpus_flag}={self.gpus}")
        return out


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit; ValueError naming the accepted forms otherwise."""
    days, rest = 0, text
    if "-" in text:
        head, rest = text.split("-", 1)
        if not head.isdigit() or not rest:
            raise ValueError(f"'{text}' is not a Slurm time limit ({TIME_FORMS})")
        days = int(head)
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or len(parts) > 3:
        raise ValueError(f"'{text}' is not a Slurm time limit ({TIME_FORMS})")
    nums = [int(p) for p in parts]
    if days or "-" in text:  # D-HH, D-HH:MM, D-HH:MM:SS
        nums += [0] * (3 - len(nums))
        hours, minutes, seconds = nums
        if hours > 23:
            raise ValueError(f"'{text}': hours after a day count must be below 24")
    elif len(nums) == 1:      # minutes
        hours, minutes, seconds = 0, nums[0], 0
    elif len(nums) == 2:      # MM:SS
        hours, (minutes, seconds) = 0, nums
    else:                     # HH:MM:SS
        hours, minutes, seconds = nums
    if seconds > 59 or (minutes > 59 and (hours or days or len(nums) == 3)):
        raise ValueError(f"'{text}': minutes and seconds must be below 60 ({TIME_FORMS})")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        raise ValueError(f"'{text}' is no time at all; leave it empty for the partition's default")
    return total


def _extra_args(text: str) -> tuple[str, ...]:
    try:
        args = tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"'{text}' does not split into options: {exc}") from None
    if args and not args[0].startswith("-"):
        raise ValueError(f"'{args[0]}' is not an sbatch option (options start with -)")
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in OWN_OPTIONS or (name.startswith("-") and not name.startswith("--") and name[:2] in OWN_OPTIONS):
            raise ValueError(f"{name} is set by kprune itself; remove it")
    return args


def problems(kconf) -> list[tuple[str, str]]:
    """(symbol, problem) pairs for the executor and Slurm options of a loaded configuration."""
    value = lambda name: kconf.syms[name].str_value
    problems = []
    for name in ("SLURM_PARTITION", "SLURM_ACCOUNT", "SLURM_QOS"):
        if not _NAME.match(value(name)):
            problems.append((name, f"'{value(name)}' is not a Slurm name (letters, digits, _ . - and commas)"))
    seconds = None
    if value("SLURM_TIME"):
        try:
            seconds = time_limit_seconds(value("SLURM_TIME"))
        except ValueError as exc:
            problems.append(("SLURM_TIME", str(exc)))
    warn = int(value("SLURM_SIGNAL_SECONDS"))
    if seconds is not None and warn and warn >= seconds:
        problems.append(("SLURM_SIGNAL_SECONDS", f"{warn} s is not less than SLURM_TIME ({value('SLURM_TIME')} = "
                         f"{seconds} s): the warning would come before the run starts"))
    mem = _MEM.match(value("SLURM_MEM"))
    if value("SLURM_MEM") and (mem is None or int(mem.group(1)) == 0):
        problems.append(("SLURM_MEM", f"'{value('SLURM_MEM')}' is not an amount of memory (a whole number > 0 "
                         "with an optional unit K, M, G or T, e.g. 16G)"))
    try:
        _extra_args(value("SLURM_EXTRA_ARGS"))
    except ValueError as exc:
        problems.append(("SLURM_EXTRA_ARGS", str(exc)))
    return problems


def executor(kconf) -> str:
    """`local` or `slurm`."""
    return kconf.named_choices["MATRIX_EXECUTOR"].selection.name.removeprefix("MATRIX_EXECUTOR_").lower()


def slurm_options(kconf) -> SlurmOptions:
    """The Slurm menu, typed (the configuration has been validated on load)."""
    value = lambda name: kconf.syms[name].str_value
    return SlurmOptions(partition=value("SLURM_PARTITION"), account=value("SLURM_ACCOUNT"), qos=value("SLURM_QOS"),
                        time=value("SLURM_TIME"), signal_seconds=int(value("SLURM_SIGNAL_SECONDS")),
                        gpus=int(value("SLURM_GPUS")), cpus=int(value("SLURM_CPUS")), mem=value("SLURM_MEM"),
                        max_running=int(value("SLURM_MAX_RUNNING")),
                        extra_args=_extra_args(value("SLURM_EXTRA_ARGS")))
