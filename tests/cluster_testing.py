"""Two nodes simulated on this machine, for the multi-node and Slurm tests.

    with Cluster() as cluster:              # node0 and node1, or a pytest skip saying why not
        job = cluster.start(1, ["hostname"], log=path)
        cluster.link_down(1)                # node1's cable pulled: no FIN, no RST
        with Slurm(cluster, folder) as slurm:    # slurmctld on node0, one slurmd per node
            job_id = slurm.sbatch(["--nodes", "2", script], env)

Each node is a Linux network namespace holding one end of a veth pair (named eth0 there), and
each process tree
started on it gets its own UTS namespace named after the node (`hostname` says node0 / node1)
and its own mount namespace (`ip netns exec` makes one, and bind-mounts
/etc/netns/<namespace>/hosts over /etc/hosts there, which maps the node names to the veth
addresses). The file system is this machine's, so every folder is "shared" by both nodes unless
a test hides one with `private`: a folder bind-mounted over a path on one node only.

Names carry this process's id (namespaces `stagt<pid><n>`); namespaces and /etc/netns entries
left by a process that no longer exists are removed on the next start, so a crashed run does not
break the next one. Everything is torn down on exit, on failure too: every process inside a
namespace is killed (SIGKILL), then the namespace and its /etc/netns entry are deleted.

Needs root, iproute2 (`ip netns`) and util-linux (`unshare`); `skip_reason()` says what is
missing. Slurm: Debian's slurm-wlm (`install_slurm()` installs it with apt-get as root), with
`auth/none` (no munge daemon), one slurmctld and one slurmd per node, all inside the namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

PREFIX = "stagt"  # namespace names: stagt<pid>x<cluster><node>
SUBNET = "10.213.7"  # node n has SUBNET.(n + 1); the namespaces are private, so any subnet works
IFNAME = "eth0"  # each node's end of the veth pair, renamed inside its namespace


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def skip_reason() -> Optional[str]:
    """Why two simulated nodes cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, hostnames and mounts per simulated node)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    name = f"{PREFIX}{os.getpid()}xprobe"
    try:
        made = _run("ip", "netns", "add", name, check=False)
        if made.returncode:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
        probe = _run("ip", "netns", "exec", name, "unshare", "--uts", "--", "hostname", "probe",
                     check=False)
        if probe.returncode:
            return f"cannot set a hostname in a namespace: {probe.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name, check=False)
    return None


def _namespaces() -> list:
    listed = _run("ip", "netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.strip()]


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process in `namespace` until none is left (daemons fork)."""
    for _ in range(50):
        pids = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.1)


def _remove_namespace(namespace: str) -> None:
    _kill_inside(namespace)
    _run("ip", "netns", "del", namespace, check=False)
    shutil.rmtree(f"/etc/netns/{namespace}", ignore_errors=True)


def remove_stale() -> None:
    """Namespaces (and /etc/netns entries) of earlier runs whose process is gone."""
    names = set(_namespaces())
    if Path("/etc/netns").is_dir():
        names |= {p.name for p in Path("/etc/netns").iterdir()}
    for name in names:
        match = re.fullmatch(rf"{PREFIX}(\d+)x\w+", name)
        if match and not _alive(int(match.group(1))):
            _remove_namespace(name)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s+Z", status, re.MULTILINE)


class _Managed:
    """A context manager that skips the test when `_unavailable()` names a reason, runs
    `_open()`, and always `close()`s, also when opening fails half-way."""

    what = ""

    def __enter__(self):
        reason = self._unavailable()
        if reason is not None:
            import pytest

            pytest.skip(f"{self.what}: {reason}")
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Cluster(_Managed):
    """`nodes` simulated nodes (2: one veth pair joins them), named node0, node1, ..."""

    made = 0  # clusters made by this process (their names differ)

    def __init__(self, nodes: int = 2):
        if nodes != 2:
            raise ValueError("two nodes: one veth pair joins them")
        Cluster.made += 1
        tag = f"{os.getpid()}x{Cluster.made}"
        self.hosts = [f"node{i}" for i in range(nodes)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        self.namespaces = [f"{PREFIX}{tag}n{i}" for i in range(nodes)]
        self.veths = [f"stg{tag}v{i}"[-15:] for i in range(nodes)]  # (at most 15 characters)
        self.processes: list = []

    # ------------------------------------------------------------------------ set-up / teardown

    what = "simulated nodes"

    def _unavailable(self) -> Optional[str]:
        return skip_reason()

    def _open(self) -> None:
        remove_stale()
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{address} {host}\n" for address, host in zip(self.addresses, self.hosts))
        for namespace in self.namespaces:
            _run("ip", "netns", "add", namespace)
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
            Path(f"/etc/netns/{namespace}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{namespace}/hosts").write_text(hosts)
        _run("ip", "link", "add", self.veths[0], "type", "veth", "peer", "name", self.veths[1])
        for namespace, veth, address in zip(self.namespaces, self.veths, self.addresses):
            _run("ip", "link", "set", veth, "netns", namespace)
            _run("ip", "-n", namespace, "link", "set", veth, "name", IFNAME)
            _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", IFNAME)
            _run("ip", "-n", namespace, "link", "set", IFNAME, "up")

    def close(self) -> None:
        for process in self.processes:
            _kill_group(process)
        for namespace in self.namespaces:
            _remove_namespace(namespace)

    # ------------------------------------------------------------------------ running on a node

    def command(self, node: int, argv: Sequence[str], private: dict = None) -> list:
        """argv run on `node`: in its network namespace, under its hostname, with `private`
        ({path: folder}) bind-mounted over those paths on this node only."""
        mounts = "".join(f'mount --bind "{source}" "{target}" && '
                         for target, source in (private or {}).items())
        script = f'{mounts}hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.namespaces[node], "unshare", "--uts", "--",
                "sh", "-c", script, self.hosts[node], *map(str, argv)]

    def start(self, node: int, argv: Sequence[str], log: Path, env: dict = None,
              cwd: Path = None, private: dict = None) -> subprocess.Popen:
        """Start argv on `node` in its own process group, stdout and stderr to `log`."""
        with open(log, "w") as out:
            process = subprocess.Popen(self.command(node, argv, private), stdout=out,
                                       stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def run(self, node: int, argv: Sequence[str], timeout: float = 60,
            env: dict = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(node, argv), capture_output=True, text=True,
                              timeout=timeout, env=env)

    def pids(self, node: int) -> list:
        return [int(p) for p in
                _run("ip", "netns", "pids", self.namespaces[node], check=False).stdout.split()]

    def kill_node(self, node: int) -> None:
        """Every process on `node` killed at once (SIGKILL): its connections close."""
        _kill_inside(self.namespaces[node])

    def link_down(self, node: int) -> None:
        """`node`'s network link down: its peers' connections go silent (nothing is closed)."""
        _run("ip", "-n", self.namespaces[node], "link", "set", IFNAME, "down")

    def link_up(self, node: int) -> None:
        _run("ip", "-n", self.namespaces[node], "link", "set", IFNAME, "up")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def wait_all(processes: Sequence[subprocess.Popen], timeout: float) -> list:
    """Return codes of `processes` once all have ended; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    for process in processes:
        left = deadline - time.monotonic()
        try:
            process.wait(timeout=max(left, 0.01))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"still running after {timeout:.0f} s") from None
    return [process.returncode for process in processes]


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------

SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")


def install_slurm() -> Optional[str]:
    """Install Debian's slurm-wlm with apt-get when missing (root); None, or why not."""
    if all(shutil.which(tool) for tool in SLURM_TOOLS):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "slurm-wlm is not installed, and installing it needs root and apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode:  # stale package lists: refresh them once
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env,
                       timeout=600)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode or not all(shutil.which(tool) for tool in SLURM_TOOLS):
        return f"`{' '.join(command)}` failed: {(result.stderr or result.stdout)[-500:]}"
    return None


class Slurm(_Managed):
    """A Slurm cluster over `cluster`'s nodes: slurmctld on node0, one slurmd per node (each
    named after its node, with the CPUs of this machine), one partition, no accounting, no
    cgroups, `auth/none`. Commands (sbatch, squeue, ...) run on node0."""

    def __init__(self, cluster: Cluster, folder: Path):
        self.cluster, self.folder = cluster, Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.daemons: list = []

    what = "Slurm"

    def _unavailable(self) -> Optional[str]:
        return install_slurm()

    def env(self, env: dict = None) -> dict:
        """`env` (default: this process's) with SLURM_CONF."""
        return {**(os.environ if env is None else env), "SLURM_CONF": str(self.conf)}

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        (self.folder / "state").mkdir(exist_ok=True)
        for host in self.cluster.hosts:
            (self.folder / f"spool-{host}").mkdir(exist_ok=True)
        # no cgroup mounts inside the namespaces: cgroup/v1 without automount needs none
        (self.folder / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        nodes = "".join(f"NodeName={host} NodeAddr={address} CPUs={cpus} State=UNKNOWN\n"
                        for host, address in zip(self.cluster.hosts, self.cluster.addresses))
        self.conf.write_text(f"""\
ClusterName=stagtest
SlurmctldHost={self.cluster.hosts[0]}({self.cluster.addresses[0]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={self.folder / 'state'}
SlurmdSpoolDir={self.folder}/spool-%n
SlurmctldPidFile={self.folder}/slurmctld.pid
SlurmdPidFile={self.folder}/slurmd-%n.pid
SlurmctldLogFile={self.folder}/slurmctld.log
SlurmdLogFile={self.folder}/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
{nodes}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        env = self.env()
        self.daemons.append(self.cluster.start(
            0, ["slurmctld", "-D", "-i", "-f", self.conf], self.folder / "slurmctld.out",
            env=env))
        for node, host in enumerate(self.cluster.hosts):
            self.daemons.append(self.cluster.start(
                node, ["slurmd", "-D", "-N", host, "-f", self.conf],
                self.folder / f"slurmd-{host}.out", env=env))
        self._wait_idle(60)

    def _wait_idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({daemon.args[-4:]}):\n"
                                       + self.logs())
            states = self.command(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            if len(re.findall(r"\bidle\b", states)) == len(self.cluster.hosts):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm nodes are not idle after {seconds} s:\n{states}\n"
                                   + self.logs())
            time.sleep(0.5)

    def command(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
                env: dict = None) -> subprocess.CompletedProcess:
        """A Slurm command on node0."""
        result = self.cluster.run(0, argv, timeout=timeout, env=self.env(env))
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(map(str, argv))}: {result.stderr}{result.stdout}")
        return result

    def sbatch(self, argv: Sequence[str], env: dict = None, cwd: Path = None) -> int:
        """Submit (on node0, from `cwd`); returns the job id."""
        command = ["sbatch", "--parsable", *argv]
        if cwd is not None:
            command = ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *command]
        out = self.command(command, env=env).stdout.strip()
        return int(out.split(";")[0])

    def wait(self, job: int, timeout: float) -> str:
        """The job's final state (COMPLETED, FAILED, ...) once it has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = self.command(["scontrol", "show", "job", str(job)], check=False).stdout
            state = re.search(r"JobState=(\w+)", shown)
            if state and state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING",
                                                "COMPLETING"):
                return state.group(1)
            time.sleep(1)
        raise TimeoutError(f"Slurm job {job} still running after {timeout:.0f} s")

    def logs(self) -> str:
        out = []
        for path in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for daemon in self.daemons:
            _kill_group(daemon)
