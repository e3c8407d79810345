"""A tiny supervisor between the search and a vLLM server: no server outlives the search.

Run as ``python -I path/to/_guard.py --parent PID --grace S [--pid-file F] -- cmd ...``
(or ``-m evo_compress.fitness.vllm._guard``). Standard library only until it stops a tree
(psutil lists the processes then), so it starts in milliseconds. It starts ``cmd`` in a new
session (its own process group), becomes a child subreaper so that whatever the server
starts stays below it, and stops the whole tree when asked (SIGTERM, SIGINT, SIGHUP) or when
the search process dies (``PR_SET_PDEATHSIG`` and a ``getppid()`` poll). When the server
exits on its own, the guard exits with its code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# The parent-death signal is not SIGTERM: the kernel also sends it when the *thread* that
# started the guard exits while the process lives on, so its handler checks getppid() first,
# while a SIGTERM always means "stop".
PARENT_DEATH_SIGNAL = signal.SIGUSR1
POLL_S = 0.1
TAG = "[evo-compress guard]"


def _say(message: str) -> None:
    print(f"{TAG} {message}", file=sys.stderr, flush=True)


def _prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.prctl
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int

    def call(option: int, value: int) -> int:
        return int(function(ctypes.c_int(option), ctypes.c_ulong(value), 0, 0, 0))

    return call


def live_processes(root: int, pgid: int) -> list[int] | None:
    """Processes still running (zombies left out) below ``root`` or in group ``pgid``, read
    with psutil; a process that exits while they are read is left out. None where the
    processes cannot be listed (psutil missing, or no /proc)."""
    try:
        import psutil  # here, not at the top: the guard starts before anything is stopped
    except ImportError:
        return None
    table: dict[int, tuple[int, int, str]] = {}  # pid -> (ppid, pgid, status)
    try:
        for process in psutil.process_iter(["ppid", "status"]):
            with contextlib.suppress(OSError):  # exited while we looked
                table[process.pid] = (
                    process.info["ppid"],
                    os.getpgid(process.pid),
                    process.info["status"],
                )
    except (OSError, psutil.Error):
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, group, _) in table.items() if group == pgid}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    dead = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    return sorted(pid for pid in found if pid != root and table[pid][2] not in dead)


class Guard:
    """Starts the server, forwards its exit code, and takes its whole tree down on request or
    when the search process goes away."""

    def __init__(
        self, parent: int, grace_s: float, command: Sequence[str], pid_file: str | None = None
    ) -> None:
        self.parent = parent
        self.pid_file = pid_file
        self.grace_s = grace_s
        self.command = list(command)
        self.me = os.getpid()
        self.server_pid = 0
        self.server_status: int | None = None
        self.stop_reason: str | None = None

    # -------------------------------------------------------------- signals
    def _on_stop(self, signum: int, _frame: object) -> None:
        if self.stop_reason is None:
            self.stop_reason = f"received {signal.Signals(signum).name}"

    def _on_parent_death(self, _signum: int, _frame: object) -> None:
        if os.getppid() != self.parent and self.stop_reason is None:
            self.stop_reason = f"the search process {self.parent} exited"

    def _parent_gone(self) -> bool:
        return os.getppid() != self.parent

    # -------------------------------------------------------------- children
    def _reap(self) -> bool:
        """Collect every exited child: the server (its status is kept) and, as a subreaper,
        orphans of the server reparented to us. True when no child is left at all."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return False
            if pid == self.server_pid and self.server_status is None:
                self.server_status = os.waitstatus_to_exitcode(status)

    def _remaining(self) -> list[int]:
        self._reap()
        pids = live_processes(self.me, self.server_pid)
        if pids is not None:
            return pids
        try:  # the processes cannot be listed: the group is all we can see
            os.killpg(self.server_pid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [self.server_pid]

    def _signal_all(self, sig: signal.Signals, pids: Sequence[int]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.server_pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def shutdown(self, reason: str) -> None:
        """SIGTERM to the server's group, SIGKILL to everything left after the grace period,
        and reap it all: when this returns, nothing the server started is running."""
        remaining = self._remaining()
        if remaining:
            self._stop_tree(reason, remaining)
        self._reap_all(time.monotonic() + 5.0)

    def _stop_tree(self, reason: str, remaining: list[int]) -> None:
        _say(
            f"{reason}: SIGTERM to the server's process group {self.server_pid}, SIGKILL "
            f"after {self.grace_s:g}s"
        )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.server_pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        termed_orphans = False
        while remaining and time.monotonic() < deadline:
            if self.server_status is not None and not termed_orphans:
                # The server is gone; what is left escaped its group (setsid): ask it too.
                self._signal_all(signal.SIGTERM, remaining)
                termed_orphans = True
            time.sleep(0.05)
            remaining = self._remaining()
        if remaining:
            _say(f"still running after {self.grace_s:g}s: SIGKILL to {remaining}")
        kill_deadline = time.monotonic() + 30.0
        while remaining and time.monotonic() < kill_deadline:
            self._signal_all(signal.SIGKILL, remaining)
            time.sleep(0.05)
            remaining = self._remaining()
        if remaining:
            _say(f"processes {remaining} survived SIGKILL (stuck in the kernel?)")

    def _reap_all(self, deadline: float) -> None:
        """Wait for the last children to become zombies and collect them: an unreaped one
        would pass to init, which in some containers never reaps, and keep its group alive."""
        while not self._reap() and time.monotonic() < deadline:
            time.sleep(0.02)

    # -------------------------------------------------------------- main loop
    def _exit_code(self) -> int:
        status = self.server_status if self.server_status is not None else 1
        return 128 - status if status < 0 else status

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        signal.signal(PARENT_DEATH_SIGNAL, self._on_parent_death)
        prctl = _prctl()
        if prctl is not None:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
            prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
        if self._parent_gone():  # it died before the death signal was armed
            _say(f"the search process {self.parent} is gone: not starting the server")
            return 1
        me = self.me

        def arm_child() -> None:
            # The server gets SIGTERM if the guard itself is killed (SIGKILL, OOM killer).
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != me:
                os._exit(1)

        try:
            process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=arm_child,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            _say(f"cannot start {self.command[0]!r}: {exc}")
            return 127
        self.server_pid = process.pid
        if self.pid_file is not None:
            # Names the server's process group for the search's own last-resort kill.
            try:
                write_pid_file(self.pid_file, process.pid)
            except OSError as exc:
                _say(f"cannot write {self.pid_file}: {exc}")
        _say(f"server pid {process.pid} (its own process group), guard pid {me}")
        try:
            while True:
                self._reap()
                if self.server_status is not None:
                    process.returncode = self.server_status
                    # Whatever the server left behind goes with it.
                    self.shutdown(f"the server exited with code {self.server_status}")
                    return self._exit_code()
                if self.stop_reason is None and self._parent_gone():
                    self.stop_reason = f"the search process {self.parent} exited"
                if self.stop_reason is not None:
                    self.shutdown(self.stop_reason)
                    process.returncode = self.server_status
                    return self._exit_code()
                time.sleep(POLL_S)
        except BaseException:
            self.shutdown("the guard failed")
            raise


def write_pid_file(path: str, pid: int) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(f"{pid}\n")
    os.replace(temporary, path)


def parse_args(argv: Sequence[str]) -> tuple[int, float, str | None, list[str]]:
    """``--parent PID --grace S [--pid-file F] -- cmd ...`` (argparse would be slower to import
    and would swallow options of the command)."""
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit(f"{TAG} usage: --parent PID --grace S [--pid-file F] -- cmd ...")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    values: dict[str, str] = {}
    for i in range(0, len(options) - 1, 2):
        values[options[i]] = options[i + 1]
    if len(options) % 2 or set(values) - {"--parent", "--grace", "--pid-file"} or not command:
        raise SystemExit(f"{TAG} bad arguments {argv!r}")
    parent = int(values.get("--parent", os.getppid()))
    return parent, float(values.get("--grace", "30")), values.get("--pid-file"), command


def main(argv: Sequence[str] | None = None) -> int:
    parent, grace, pid_file, command = parse_args(sys.argv[1:] if argv is None else argv)
    return Guard(parent, grace, command, pid_file).run()


if __name__ == "__main__":
    sys.exit(main())
