"""`make schedule`: the sparsity the current .config will reach, as a table and a PNG.

Prints the target sparsity at every mask update (every milestone of a table
schedule), and where it is reached, then writes the curve to
results/schedule.png (or --png). With ADAPTIVE_PRUNING the model is built to
count its parameters, and the adapted schedule is shown.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from lib.cli import make_variable
from lib.errors import KpruneError
from lib.kconfig import settings_from_kconfig
from lib.pruning.build import build_pruner
from lib.pruning.schedules import schedule_from_settings
from scripts.kconfig import load_dot_config

MAX_ROWS = 40


def _schedule(settings):
    if not settings.adaptive_pruning:
        return schedule_from_settings(settings), None
    import torch

    trainer = importlib.import_module(f"{settings.model}.train")
    model = trainer.build_model(settings)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner, adaptive = build_pruner(settings, list(model.named_parameters()), optimizer, params)
    return pruner.schedule, adaptive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.schedule", description=__doc__)
    parser.add_argument("--set", default=make_variable("SET"), help="overrides (make's SET=)")
    parser.add_argument("--png", default="results/schedule.png")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_kconfig(load_dot_config(args.set))
        if settings.pruning_method == "none":
            print("PRUNING_METHOD is none: nothing is pruned, so there is no schedule")
            return 0
        sched, adaptive = _schedule(settings)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # A prune-only run (MAX_ITERS=0) makes its one update at step 0, before evaluating; no step 1 follows.
    updates = [0] if settings.max_iters == 0 else sched.update_steps()
    shown = updates if len(updates) <= MAX_ROWS else sorted(
        set(updates[:: max(1, len(updates) // (MAX_ROWS - 1))]) | {updates[-1]})
    print(f"schedule {sched.kind}: start {sched.start}, end {sched.end}, final {sched.final:g}, "
          f"{len(updates)} mask updates, run length {settings.max_iters} steps"
          + (" (prune-only)" if settings.max_iters == 0 else ""))
    if adaptive:
        print(f"adaptive: {adaptive}")
    print(f"{'step':>10}  {'target sparsity':>16}")
    for step in shown:
        print(f"{step:>10}  {100 * sched.target(step):>15.2f}%")
    if len(shown) < len(updates):
        print(f"({len(updates) - len(shown)} more updates not shown)")
    _plot(sched, settings.max_iters, Path(args.png))
    print(f"plot: {args.png}")
    return 0


def _plot(sched, max_iters: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.results import write_bytes_atomic

    steps = list(range(0, max_iters + 1, max(1, max_iters // 1000)))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [100 * sched.target(t) for t in steps], label="target sparsity")
    held, level = [], 0.0
    for t in steps:  # what the masks hold: the target at the latest update
        if any(u <= t for u in sched.update_steps()):
            level = sched.target(max(u for u in sched.update_steps() if u <= t))
        held.append(100 * level)
    ax.step(steps, held, where="post", label="pruned (mask updates)", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity (%)")
    ax.set_title(f"{sched.kind} schedule to {100 * sched.final:g}%")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
