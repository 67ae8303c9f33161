"""The dev stack's child processes: started, recorded, watched and stopped for sure.

How "nothing is left running" is guaranteed:

- every child runs in a session (and process group) of its own, so the
  terminal's Ctrl-C reaches only `dnd-client dev`, which then stops the
  children in order: Celery first (warm shutdown), the servers last;
- a stop sends the child's own stop signal to its main process (SIGTERM: warm
  shutdown for Celery; SIGINT: fast shutdown for PostgreSQL), waits, then
  SIGKILLs its whole process group (pool processes, backends included), and
  finally sweeps the group again in case a grandchild outlived its parent;
- on Linux each child also gets its stop signal from the kernel when
  `dnd-client dev` itself dies, even of SIGKILL (``PR_SET_PDEATHSIG``);
- the PIDs are written to ``dev.pids`` in the data dir while they run; a later
  `dnd-client dev` on the same dir stops whatever an earlier one that was
  killed left running (matched by PID *and* start time, never by name).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to run one child process."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    log_path: Path
    # The signal that asks it to stop cleanly.
    stop_signal: int = signal.SIGTERM
    # Restart it when it dies unexpectedly (Celery's processes, not the servers).
    restart: bool = False
    # Run as this user and group (PostgreSQL when we are root).
    user: int | None = None
    group: int | None = None


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    create_time: float = 0.0
    # Where this start's output begins in the log (logs are appended to).
    log_offset: int = 0
    # When it was restarted (time.monotonic()), for the restart policy.
    restarts: list[float] = field(default_factory=list)
    # A restart is due at this time.monotonic() (None: none pending).
    restart_at: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        spec = self.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:
            self.log_offset = log.tell()
            self.proc = subprocess.Popen(
                list(spec.argv),
                cwd=spec.cwd,
                env=dict(spec.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal(spec.stop_signal),
                user=spec.user,
                group=spec.group,
                # Dropping root: drop root's supplementary groups too.
                extra_groups=[] if spec.user is not None else None,
            )
        self.restart_at = None
        try:
            self.create_time = float(psutil.Process(self.proc.pid).create_time())
        except psutil.Error:  # already gone: poll() will tell
            self.create_time = 0.0

    def poll(self) -> int | None:
        """Its exit status once it has exited (None while it runs or before it starts)."""
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        """Signal its main process only (it stops its own children)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL everything left in its process group."""
        if self.proc is not None:
            kill_group(self.proc.pid)

    def output(self) -> str:
        """What this start wrote to its log so far."""
        try:
            with self.spec.log_path.open("rb") as log:
                log.seek(self.log_offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def last_lines(self, count: int = 3) -> str:
        lines = [line.strip() for line in self.output().splitlines() if line.strip()]
        return " | ".join(lines[-count:])


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def parent_death_signal(sig: int) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to send ``sig`` when we die (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child after fork (and after dropping privileges, which
        # would otherwise clear the setting), before exec. Keep it minimal.
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # we already died between fork and prctl
            os.kill(os.getpid(), sig)

    return preexec


class Supervisor:
    """The children of one `dnd-client dev`, their PID file, and how they stop."""

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file
        self.children: dict[str, Child] = {}

    def start(self, spec: ChildSpec) -> Child:
        child = self.children.get(spec.name) or Child(spec)
        self.children[spec.name] = child
        child.start()
        self.record()
        return child

    def restart(self, child: Child) -> None:
        child.kill_group()  # whatever its dead main process left behind
        child.restarts.append(time.monotonic())
        child.start()
        self.record()

    def record(self) -> None:
        """Write the PIDs (with start times and stop signals) to the PID file."""
        entries = [
            {
                "name": c.name,
                "pid": c.pid,
                "create_time": c.create_time,
                "stop_signal": int(c.spec.stop_signal),
            }
            for c in self.children.values()
            if c.proc is not None
        ]
        payload = {"supervisor": os.getpid(), "children": entries}
        tmp = self.pid_file.with_name(self.pid_file.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(self.pid_file)

    def stop(
        self,
        names: Iterable[str],
        timeout: float,
        hurry: threading.Event,
        on_wait: Callable[[list[Child]], None] | None = None,
    ) -> list[Child]:
        """Stop these children together; returns those that had to be SIGKILLed."""
        chosen = [self.children[n] for n in names if n in self.children]
        for child in chosen:
            child.restart_at = None
            child.send(child.spec.stop_signal)
        started = time.monotonic()
        told = on_wait is None
        while any(c.running() for c in chosen):
            elapsed = time.monotonic() - started
            if hurry.is_set() or elapsed >= timeout:
                break
            if not told and elapsed >= 3 and on_wait is not None:
                # Taking a while (tasks finishing): say why we wait.
                on_wait([c for c in chosen if c.running()])
                told = True
            hurry.wait(0.1)
        killed = [c for c in chosen if c.running()]
        for child in chosen:
            # The main process is gone (or about to be): nothing of it may stay.
            child.kill_group()
        for child in chosen:
            if child.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(5)
                self._sweep(child.proc.pid)
        return killed

    def forget_pid_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    @staticmethod
    def _sweep(pgid: int) -> None:
        # A grandchild can outlive its parent for a moment after SIGKILL.
        for _ in range(50):
            if not group_exists(pgid):
                return
            kill_group(pgid)
            time.sleep(0.05)


def stop_leftovers(pid_file: Path, say: Callable[[str], None], timeout: float = 15) -> None:
    """Stop what an earlier `dnd-client dev` on this data dir left running, if anything.

    Only processes whose PID *and* start time match the PID file are touched:
    a PID reused by something else since is left alone.
    """
    try:
        payload = json.loads(pid_file.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    found: list[tuple[psutil.Process, int, str]] = []
    for entry in payload.get("children", []) if isinstance(payload, dict) else []:
        try:
            proc = psutil.Process(int(entry["pid"]))
            if abs(float(proc.create_time()) - float(entry["create_time"])) > 0.5:
                continue
            found.append(
                (proc, int(entry.get("stop_signal", signal.SIGTERM)), str(entry.get("name", "?")))
            )
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    if found:
        names = ", ".join(f"{name} (pid {proc.pid})" for proc, _, name in found)
        say(f"stopping what an earlier `dnd-client dev` left running: {names}")
        for proc, sig, _ in found:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs([proc for proc, _, _ in found], timeout=timeout)
        for proc, _, _ in found:
            kill_group(proc.pid)
        psutil.wait_procs(alive, timeout=5)
    pid_file.unlink(missing_ok=True)
