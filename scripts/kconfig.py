"""The program behind the Makefile's configuration targets.

    python -m scripts.kconfig defconfig gpt2-bitter7 [--set "SYM=value ..."]
    python -m scripts.kconfig olddefconfig | savedefconfig | check | list
    python -m scripts.kconfig command [--set ...]   # print the trainer command
    python -m scripts.kconfig train [--set ...]     # print it, then run it
    python -m scripts.kconfig resume [RUN_DIR]      # continue an interrupted run (default: the newest)

Every command that reads .config applies `--set` overrides first (`make
<target> SET="..."` hands them over in the environment as KPRUNE_SET, the
default of --set; RESUME= likewise), validates the result strictly and writes
.config back atomically, so .config always describes what ran. On any error
nothing is written and the exit status is 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from lib.cli import make_variable
from lib.errors import ConfigError, KpruneError
from lib.kconfig import (REPO_ROOT, apply_overrides, load_kconfig, read_config, selected_model,
                         settings_from_kconfig, trainer_argv, write_config)

DEFCONFIGS = REPO_ROOT / "defconfigs"
DOT_CONFIG = Path(".config")
NO_CONFIG = ("no .config here: create one first with `make defconfig-<name>` "
             "(`make list-defconfigs` lists them) or `make menuconfig`")


def _overrides(text: str | None) -> list[str]:
    """SET's words, split as a shell would split them (quotes group a value with spaces)."""
    try:
        return shlex.split(text) if text else []
    except ValueError as exc:  # an unbalanced quote
        raise ConfigError(f"SET={text!r}: {exc}; quote a value that has spaces or quotes as a whole, "
                          "e.g. SET=\"RUN_NAME='my run'\"") from None


def load_dot_config(set_text: str | None, path: Path = DOT_CONFIG):
    if not path.exists():
        raise ConfigError(NO_CONFIG if path == DOT_CONFIG else f"{path}: no such file")
    kconf, seen = read_config(path)
    overrides = _overrides(set_text)
    if overrides:
        apply_overrides(kconf, seen, overrides)
        write_config(kconf, path)
        print(f"updated {path}: {' '.join(overrides)}", file=sys.stderr)
    return kconf


def defconfig_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    candidate = DEFCONFIGS / name
    if candidate.is_file():
        cwd = Path.cwd().resolve()
        return candidate.relative_to(cwd) if candidate.is_relative_to(cwd) else candidate
    names = ", ".join(sorted(p.name for p in DEFCONFIGS.iterdir()))
    raise ConfigError(f"no defconfig named '{name}' (available: {names})")


def cmd_defconfig(args) -> int:
    path = defconfig_path(args.name)
    kconf, seen = read_config(path)
    overrides = _overrides(args.set)
    if overrides:
        apply_overrides(kconf, seen, overrides)
    write_config(kconf, DOT_CONFIG)
    extra = f" with {' '.join(overrides)}" if overrides else ""
    print(f"wrote .config from {path}{extra}")
    return 0


def cmd_olddefconfig(args) -> int:
    kconf = load_dot_config(args.set)
    write_config(kconf, DOT_CONFIG)
    print("wrote .config (new options take their defaults)")
    return 0


def cmd_savedefconfig(args) -> int:
    kconf = load_dot_config(args.set)
    out = Path(args.output)
    write_config(kconf, out, minimal=True)
    print(f"wrote {out}: the minimal defconfig for .config (copy it into defconfigs/ to keep it)")
    return 0


def cmd_check(args) -> int:
    kconf = load_dot_config(args.set)
    print(f".config is valid (model: {selected_model(kconf)})")
    return 0


def cmd_list(args) -> int:
    for path in sorted(DEFCONFIGS.iterdir()):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"  defconfig-{path.name:<28} {about}")
    return 0


def trainer_command(kconf, env: Mapping[str, str] = os.environ,
                    per_node: tuple[str, ...] = ("train", "--config", str(DOT_CONFIG))) -> list[str]:
    """The trainer's command line; under torchrun when more than one process is configured.

    Inside a Slurm allocation with DDP_NNODES > 1, srun first starts `python -m scripts.kconfig
    <per_node>` (this same command) once per node; there, the node rank, head node and node
    count come from Slurm's environment.
    """
    s = settings_from_kconfig(kconf)
    module = ["-m", f"{s.model}.train", *trainer_argv(kconf)]
    if s.ddp_nproc_per_node * s.ddp_nnodes == 1:
        return [sys.executable, *module]
    from lib import distributed  # imports torch: only when torchrun is wanted

    srun = distributed.srun_prefix(env, s.ddp_nnodes)
    if srun is not None:
        return [*srun, sys.executable, "-m", "scripts.kconfig", *per_node]
    node = distributed.slurm_node(env, s.ddp_nnodes, s.ddp_master_port) or distributed.SlurmNode(
        s.ddp_nnodes, s.ddp_node_rank, s.ddp_master_addr, s.ddp_master_port)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={s.ddp_nproc_per_node}",
            f"--nnodes={node.nnodes}", f"--node-rank={node.node_rank}", f"--master-addr={node.master_addr}",
            f"--master-port={node.master_port}", *module]


def cmd_command(args) -> int:
    print(shlex.join(trainer_command(load_dot_config(args.set))))
    return 0


def cmd_train(args) -> int:
    config = Path(args.config)
    argv = trainer_command(load_dot_config(args.set, config), per_node=("train", "--config", str(config)))
    print(shlex.join(argv), flush=True)
    os.execvp(argv[0], argv)  # the trainer (or srun) takes over: its status and signals are the run's
    return 0


def cmd_resume(args) -> int:
    """Continue an interrupted run from its checkpoint, with the run's own config.

    Without a directory: the newest interrupted run with a checkpoint in OUTPUT_DIR.
    """
    from lib.run_dir import newest_interrupted  # torch is imported only when a run is resumed

    if args.run:
        run_dir = Path(args.run)
    else:
        output_dir = Path(settings_from_kconfig(read_config(DOT_CONFIG)[0]).output_dir
                          if DOT_CONFIG.exists() else "results")
        run_dir = newest_interrupted(output_dir)
        if run_dir is None:
            raise KpruneError(f"no interrupted run with a checkpoint in {output_dir}/; "
                              "name the run to continue: make resume RESUME=<run directory>")
        print(f"resuming the newest interrupted run in {output_dir}/: {run_dir}", file=sys.stderr)
    if not (run_dir / "config").is_file():
        raise KpruneError(f"{run_dir} is not a run directory (it has no config file): "
                          "make resume RESUME=<run directory> names a directory that make train wrote")
    kconf, seen = read_config(run_dir / "config")
    apply_overrides(kconf, seen, [f"RESUME_FROM={run_dir}"] + _overrides(args.set))
    argv = trainer_command(kconf, per_node=("resume", str(run_dir), "--set", args.set or ""))
    print(shlex.join(argv), flush=True)
    os.execvp(argv[0], argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.kconfig", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, about in [
        ("defconfig", cmd_defconfig, "load a defconfig (name in defconfigs/ or a path) into .config"),
        ("olddefconfig", cmd_olddefconfig, "rewrite .config with defaults for options it lacks"),
        ("savedefconfig", cmd_savedefconfig, "write the minimal defconfig for .config"),
        ("check", cmd_check, "validate .config"),
        ("list", cmd_list, "list the defconfigs"),
        ("command", cmd_command, "print the trainer command for .config"),
        ("train", cmd_train, "print the trainer command for .config and run it"),
        ("resume", cmd_resume, "continue an interrupted run (its own config); default: the newest"),
    ]:
        p = sub.add_parser(name, help=about)
        p.set_defaults(func=func)
        p.add_argument("--set", default=make_variable("SET"),
                       help='overrides, e.g. "MAX_ITERS=20 LR=3e-4" (make\'s SET=)')
        if name == "defconfig":
            p.add_argument("name")
        if name == "resume":
            p.add_argument("run", nargs="?", default=make_variable("RESUME"),
                           help="the run directory (make's RESUME=; default: the newest interrupted run)")
        if name == "savedefconfig":
            p.add_argument("--output", default="defconfig")
        if name == "train":
            p.add_argument("--config", default=str(DOT_CONFIG), help="the configuration to train (default: .config)")
    args = parser.parse_args(argv)
    try:
        load_kconfig()  # a broken Kconfig tree is reported before anything else
        return args.func(args)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, ConfigError) and exc.args and exc.args[0] != NO_CONFIG:
            print("nothing was written; .config is unchanged", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
