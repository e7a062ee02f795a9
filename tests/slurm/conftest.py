"""A real one-node Slurm for the tests: munged, slurmctld and slurmd from the distribution's packages.

Everything lives in a temporary directory: the munge key and socket, slurm.conf
(unprivileged ports picked free, state and spool directories, logs), and every
client command finds it through SLURM_CONF, which the fixture sets for the
test session. The daemons run in the foreground as our children and are
stopped afterwards. If Slurm cannot be started the fixture fails, with the
daemons' logs: these tests do not skip (.ci/run installs slurm-wlm and munge).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "kprune"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 9 // 10  # below what slurmd measures, or it drains the node
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _conf(root: Path, socket_path: Path) -> str:
    cpus = os.cpu_count() or 1
    return "\n".join([
        "ClusterName=kprunetest",
        "SlurmctldHost=localhost(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
        f"AuthInfo=socket={socket_path},cred_expire=5",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "KillWait=30",
        "MinJobAge=600",
        "MailProg=/bin/true",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ""])


def _logs(root: Path) -> str:
    out = []
    for name in ("munged.log", "slurmctld.log", "slurmd.log", "munged.out", "slurmctld.out", "slurmd.out"):
        path = root / name
        if path.exists():
            out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(out)


def _node_idle(env: dict) -> bool:
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() == "idle"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict:
    """A running single-node Slurm; yields {'conf', 'partition', 'root'}. SLURM_CONF is set meanwhile."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons live in sbin
    where = {d: shutil.which(d, path=search) for d in (*DAEMONS, "sbatch", "squeue", "scontrol", "scancel")}
    missing = [d for d, path in where.items() if path is None]
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge "
                    "(.ci/run does this)")
    root = tmp_path_factory.mktemp("slurm")
    # munged wants every directory above its socket open to all (pytest's are private): its own one in /tmp.
    sockets = Path(tempfile.mkdtemp(prefix="kprune-munge-"))
    sockets.chmod(0o755)
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, sockets / "munge.socket"))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    commands = {
        "munged": [where["munged"], "--foreground", f"--socket={sockets / 'munge.socket'}", f"--key-file={key}",
                   f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                   f"--seed-file={root / 'munged.seed'}"],
        "slurmctld": [where["slurmctld"], "-D", "-c", "-f", str(conf)],
        "slurmd": [where["slurmd"], "-D", "-N", "localhost", "-f", str(conf)],
    }
    procs: dict[str, subprocess.Popen] = {}
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        for name in DAEMONS:
            with open(root / f"{name}.out", "w") as out:
                procs[name] = subprocess.Popen(commands[name], env=env, stdout=out, stderr=subprocess.STDOUT)
            if name == "munged":
                deadline = time.time() + 20
                while not (sockets / "munge.socket").exists():
                    if procs[name].poll() is not None or time.time() > deadline:
                        pytest.fail(f"munged did not start:\n{_logs(root)}")
                    time.sleep(0.1)
        deadline = time.time() + 60
        while not _node_idle(env):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                pytest.fail(f"Slurm did not come up ({', '.join(dead) + ' exited' if dead else 'node not idle'} "
                            f"after {60 if not dead else 'start'} s):\n{_logs(root)}")
            time.sleep(0.5)
        yield {"conf": conf, "partition": PARTITION, "root": root}
    finally:
        if procs.get("slurmctld") and procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", pwd.getpwuid(os.getuid()).pw_name, "--full"], env=env,
                           capture_output=True)
            deadline = time.time() + 40
            while time.time() < deadline:
                queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(sockets, ignore_errors=True)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
