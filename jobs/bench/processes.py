"""Process statistics from /proc (CPU ticks of a process tree, its threads, the machine) and the
processes a run measures: the job, a job on a standalone cluster, the bench's own broker and Redis."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
from pathlib import Path

from infra.stack import ManagedProcess, create_topics, free_ports, start_broker, start_redis
from jobs.bench import PROJECT_ROOT


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(parent pid, CPU ticks) from /proc/<pid>/stat: utime + stime of the process and cutime +
    cstime of its children that have exited and been waited for. The command name (field 2) may
    hold spaces and parentheses, so fields are counted after its last ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field k is rest[k - 3]; ppid 4, utime 14, stime 15, cutime 16, cstime 17
    return int(rest[1]), int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])


def process_tree_ticks(root_pid: int, stats: dict[int, str]) -> int:
    """CPU ticks of root_pid and all its descendants, from {pid: stat text}."""
    parsed = {}
    for pid, text in stats.items():
        try:
            parsed[pid] = parse_proc_stat(text)
        except (ValueError, IndexError):
            continue
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in parsed.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        if pid in parsed:
            total += parsed[pid][1]
        stack.extend(children.get(pid, ()))
    return total


def read_proc_stats(proc: Path = Path("/proc")) -> dict[int, str]:
    stats = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text()
            except OSError:  # exited while we looked
                continue
    return stats


def tree_cpu_seconds(pid: int) -> float:
    return process_tree_ticks(pid, read_proc_stats()) / os.sysconf("SC_CLK_TCK")


def tree_pids(root_pid: int) -> list[int]:
    stats = read_proc_stats()
    children: dict[int, list[int]] = {}
    for pid, text in stats.items():
        try:
            children.setdefault(parse_proc_stat(text)[0], []).append(pid)
        except (ValueError, IndexError):
            continue
    out, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def parse_thread_stat(text: str) -> tuple[str, int]:
    """(thread name, utime + stime ticks) from /proc/<pid>/task/<tid>/stat."""
    name = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return name, int(rest[11]) + int(rest[12])


def thread_ticks(root_pid: int) -> dict[int, tuple[str, int]]:
    """{tid: (name, ticks)} of every thread of the process tree (Flink names its task threads after
    their operators, truncated by the kernel to 15 characters)."""
    out = {}
    for pid in tree_pids(root_pid):
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                out[int(task.name)] = parse_thread_stat((task / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    return out


def busiest_threads(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], top: int = 5
) -> list[tuple[str, float]]:
    """The threads that used the most CPU between two samples, by name (threads of one name summed)."""
    by_name: dict[str, int] = {}
    for tid, (name, ticks) in after.items():
        by_name[name] = by_name.get(name, 0) + ticks - before.get(tid, (name, 0))[1]
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return [(name, round(ticks / os.sysconf("SC_CLK_TCK"), 1)) for name, ticks in ranked if ticks > 0]


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr
        java_version = java.splitlines()[0].strip() if java else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        java_version = "not found"
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "java": java_version,
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg()[0],
    }


class MeasuredProcess(ManagedProcess):
    """A process the bench starts (from the project's root) and measures: CPU seconds and threads of
    its tree. Its stop also kills the descendants that left its process group (the JVM a job
    starts is in its tree)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], work: Path):
        super().__init__(name, work)
        self.cpu_last = 0.0
        self.start(argv, env=env, cwd=PROJECT_ROOT)

    def cpu_seconds(self) -> float:
        if self.running():
            self.cpu_last = tree_cpu_seconds(self.pid())
        return self.cpu_last

    def threads(self) -> dict[int, tuple[str, int]]:
        return thread_ticks(self.pid())

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        if not self.running():
            return
        self.cpu_seconds()
        members = tree_pids(self.pid())
        super().stop(sig, timeout_s)
        for pid in members[1:]:  # a descendant that left the group or ignored the signal
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class ClusterJob(MeasuredProcess):
    """`segments submit` to a standalone cluster started for the run: the job's CPU and threads are
    the cluster's processes (JobManager and TaskManagers, from Flink's pid files), not the
    client's, which only submits and waits."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], work: Path, cluster_root: Path):
        super().__init__(name, argv, env, work)
        self.cluster_root = cluster_root

    def cluster_pids(self) -> list[int]:
        pids = []
        for pid_file in (self.cluster_root / "pids").glob("flink-*.pid"):
            pids += [
                int(word) for word in pid_file.read_text().split() if word.isdigit() and Path(f"/proc/{word}").exists()
            ]
        return pids

    def cpu_seconds(self) -> float:
        pids = self.cluster_pids()
        if pids:
            self.cpu_last = sum(tree_cpu_seconds(pid) for pid in pids)
        return self.cpu_last

    def threads(self) -> dict[int, tuple[str, int]]:
        merged: dict[int, tuple[str, int]] = {}
        for pid in self.cluster_pids():
            merged.update(thread_ticks(pid))
        return merged


class BenchStack:
    """A private tansu broker and redis-server on free ports, under a temporary directory."""

    def __init__(self, root: Path):
        self.root = root
        self.broker_port, self.redis_port = free_ports(2)
        self.redis = None
        self.broker = start_broker(root, self.broker_port)
        try:
            self.redis = start_redis(root, self.redis_port)
        except BaseException:
            self.stop()
            raise
        self.bootstrap = f"127.0.0.1:{self.broker_port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def create_topics(self, partitions: dict[str, int]) -> None:
        create_topics(self.bootstrap, partitions)

    def cpu_seconds(self) -> float:
        stats = read_proc_stats()
        ticks = sum(process_tree_ticks(p.pid(), stats) for p in (self.broker, self.redis) if p and p.pid())
        return ticks / os.sysconf("SC_CLK_TCK")

    def redis_client(self):
        import redis

        return redis.Redis.from_url(self.redis_url)

    def stop(self) -> None:
        for proc in (self.redis, self.broker):
            if proc is not None:
                proc.stop()
