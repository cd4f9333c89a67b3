"""Running model-written Python outside the trainer's process, behind an operating-system boundary.

Isolation levels (`isolation`):

- ``bwrap`` (what ``auto`` picks wherever bubblewrap can create namespaces): each call runs in its own
  user, PID, mount, IPC, UTS, cgroup and network namespaces with every capability dropped, as an
  unprivileged user (``nobody`` outside the namespace when the trainer is root), a read-only view of
  a Python runtime (``/usr``), a private size-limited tmpfs as its only writable place (its working
  directory, ``$HOME`` and ``/dev/shm``), a ``/proc`` of its own PID namespace, an empty environment,
  its own session and ``--die-with-parent``. When the call ends, normally or not, its PID namespace
  ends and the kernel kills every process left in it. Memory (tmpfs pages included) and the number
  of processes are capped for the whole call by a cgroup where this process may create one (root,
  or a delegated cgroup); otherwise by per-process limits together with the process count, which a
  fresh user namespace counts per call (Linux >= 5.14).
- ``process``: the trainer's own interpreter as the trainer's user, with resource limits and an
  audit hook. It does NOT protect the trainer's files, network, environment or processes from a
  determined program; it runs only when asked for by name and warns once per process.

In both, code arrives on stdin and output returns through a pipe this process opened (nothing is
re-opened by path), capped in size; a wall-clock deadline and CPU, file-size, open-file and
address-space limits apply; and the audit hook (no fork/exec, sockets, ctypes or files outside the
working directory) stays as an extra layer. Whatever the code does, the caller gets a `ToolResult`,
and one call's failure never fails its neighbours in `run_many`.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

NOBODY = 65534
ISOLATIONS = ("auto", "bwrap", "process")
WORKDIR = "/sandbox"   # the call's tmpfs inside the bwrap sandbox: no host path lies under it

# Runs in the sandboxed interpreter before the model's code. The hook's tables live in a closure, not
# in globals the model's code could reach and clear.
_PRELUDE = r'''
import os, sys, resource
for _r, _v in zip((resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE,
                   resource.RLIMIT_NPROC, resource.RLIMIT_CORE), [int(x) for x in sys.argv[1:6]] + [0]):
    resource.setrlimit(_r, (_v, _v))
_hooked = sys.argv[6] == "1"
_code = compile(sys.stdin.read(), "main.py", "exec")
sys.stdin.close()
sys.argv = ["main.py"]

def _make_hook():
    root = os.path.realpath(os.getcwd())
    std = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix) if p})
    blocked = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen",
        "ctypes.dlsym", "ctypes.cdata", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "socket.sendto", "socket.gethostbyname", "os.chroot", "os.setuid", "sys.addaudithook", "os.putenv",
        "os.unsetenv", "mmap.__new__", "resource.setrlimit", "resource.prlimit"})
    blocked_modules = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "multiprocessing", "mmap"})
    path_events = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.truncate", "os.utime", "os.listdir", "os.scandir", "shutil.rmtree", "shutil.copyfile",
        "shutil.move", "os.chdir"})
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def inside(path, roots):
        try:
            p = realpath(fsdecode(path))
        except Exception:
            return False
        return any(p == r or p.startswith(r + sep) for r in roots)

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args and str(args[0]).split(".")[0] in blocked_modules:
            raise ImportError(f"sandbox: import of {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = (list(args) + [None, None, 0])[:3]
            if path is None or isinstance(path, int):
                return
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & write_flags
            if not inside(path, (root,)) and (writing or not inside(path, std)):
                raise PermissionError(f"sandbox: no access to {path}")
        elif event in path_events:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a, (root,) + (std if event in ("os.listdir", "os.scandir") else ())):
                    raise PermissionError(f"sandbox: {event} outside the working directory")
    return hook

if _hooked:
    sys.addaudithook(_make_hook())
del _make_hook
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class ToolResult:
    """What a tool returns: the observation text, whether it ran cleanly, and how long it took."""
    text: str
    ok: bool = True
    seconds: float = 0.0
    error: str | None = None   # timeout | memory | output_limit | crashed | exception | denied | sandbox
    cost: float = 0.0          # what the call cost in the tool's own currency (Router-R1: USD of routed tokens)


@dataclass
class SandboxLimits:
    """Per-call limits. Memory and processes hold for the whole call under a cgroup, else per process."""
    timeout_s: float = 5.0        # wall clock
    cpu_s: int = 5                # CPU seconds per process
    memory_mb: int = 512          # the call's memory (cgroup); also each process's address space
    file_size_mb: int = 8         # any file it writes, and its output
    disk_mb: int = 64             # its private tmpfs (working directory, $HOME, /dev/shm)
    max_open_files: int = 64
    max_processes: int = 64       # processes and threads of the call
    max_output_chars: int = 2000  # observation length after truncation
    workers: int = 4              # concurrent calls

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            whole = f.type == "int"
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value <= 0:
                kind = "a positive whole number" if whole else "a positive number"
                raise ValueError(f"sandbox limit {f.name} must be {kind}; got {value!r}")


def limit_names() -> list[str]:
    return [f.name for f in fields(SandboxLimits)]


# -- what the machine offers -----------------------------------------------------------------------
def _runtime() -> tuple[str, list[str]]:
    """The interpreter the sandbox runs and the read-only paths it needs: the system Python in /usr
    (standard library only), else the trainer's base interpreter with its prefix bound as well."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system and os.path.realpath(system).startswith("/usr/"):
        return os.path.realpath(system), []
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.realpath(sys.base_prefix)
    return base, [] if prefix.startswith("/usr") else [prefix]


def _as_nobody() -> list[str]:
    """Drop to nobody before bwrap when the trainer is root, so the sandbox's processes belong to an
    unprivileged user outside their namespace too."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"] if setpriv else []


def _bwrap_command(interpreter: str, extra_ro: list[str], disk_bytes: int) -> list[str] | None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
           "--uid", str(NOBODY), "--gid", str(NOBODY), "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            cmd += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        elif os.path.isdir(f"/{link}"):
            cmd += ["--ro-bind", f"/{link}", f"/{link}"]
    for path in extra_ro:
        cmd += ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(disk_bytes), "--tmpfs", "/dev/shm",
            "--size", str(disk_bytes), "--tmpfs", WORKDIR, "--chdir", WORKDIR,
            "--setenv", "HOME", WORKDIR, "--setenv", "TMPDIR", WORKDIR, "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONIOENCODING", "utf-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1", interpreter]
    return cmd


_probed: dict[tuple, bool] = {}


def bwrap_available() -> bool:
    """Whether bubblewrap can build the sandbox on this machine (cached per process)."""
    interpreter, extra = _runtime()
    key = (interpreter, os.geteuid())
    if key not in _probed:
        cmd = _bwrap_command(interpreter, extra, 1 << 20)
        ok = False
        if cmd is not None:
            try:
                out = subprocess.run(_as_nobody() + cmd + ["-I", "-S", "-c", "print('ok')"], capture_output=True,
                                     timeout=20, text=True, env={"PATH": "/usr/bin:/bin"})
                ok = out.returncode == 0 and out.stdout.strip() == "ok"
            except (OSError, subprocess.SubprocessError):
                ok = False
        _probed[key] = ok
    return _probed[key]


class _CallCgroup:
    """A memory + pids cgroup for one call, below this process's own (cgroup v1 or v2), when this
    process may create one; `prefix` is the command that moves the call into it before it starts."""

    _counter = 0
    _lock = threading.Lock()

    def __init__(self, memory_bytes: int, max_pids: int):
        with self._lock:
            _CallCgroup._counter += 1
            name = f"forkrl-sandbox-{os.getpid()}-{self._counter}"
        self.dirs: list[Path] = []
        self.oom_file: Path | None = None
        try:
            for controller, settings in _cgroup_plan(memory_bytes, max_pids).items():
                d = controller / name
                d.mkdir()
                self.dirs.append(d)
                for key, value in settings.items():
                    (d / key).write_text(str(value))
                if (d / "memory.events").exists():
                    self.oom_file = d / "memory.events"
                elif (d / "memory.oom_control").exists():
                    self.oom_file = d / "memory.oom_control"
        except OSError:
            self.close()
            self.dirs = []

    @property
    def active(self) -> bool:
        return bool(self.dirs)

    def prefix(self) -> list[str]:
        if not self.dirs:
            return []
        moves = "; ".join(f'echo $$ > "{d}/cgroup.procs" || exit 125' for d in self.dirs)
        return ["/bin/sh", "-c", f'{moves}; exec "$@"', "sh"]

    def oom_killed(self) -> bool:
        try:
            for line in self.oom_file.read_text().splitlines() if self.oom_file else []:
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def close(self) -> None:
        """Kill whatever is still in the cgroup, then remove it."""
        for d in self.dirs:
            for _ in range(50):
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.01)
            try:
                d.rmdir()
            except OSError:
                pass


def _own_cgroup(controller: str) -> str | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if controller in names.split(",") or (controller == "" and names == ""):
                return path
    except OSError:
        pass
    return None


def _cgroup_plan(memory_bytes: int, max_pids: int) -> dict[Path, dict[str, int]]:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():   # v2: one hierarchy
        own = _own_cgroup("")
        if own is None:
            return {}
        return {root / own.lstrip("/"): {"memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": max_pids}}
    plan = {}
    mem, pids = _own_cgroup("memory"), _own_cgroup("pids")
    if mem is not None and (root / "memory").is_dir():
        plan[root / "memory" / mem.lstrip("/")] = {"memory.limit_in_bytes": memory_bytes}
    if pids is not None and (root / "pids").is_dir():
        plan[root / "pids" / pids.lstrip("/")] = {"pids.max": max_pids}
    return plan


def cgroups_available() -> bool:
    cg = _CallCgroup(64 << 20, 16)
    ok = cg.active
    cg.close()
    return ok


_process_warned = False


# -- the sandbox -----------------------------------------------------------------------------------
class PythonSandbox:
    """Runs code strings in sandboxed interpreters; `run_many` runs them concurrently (bounded pool)."""

    def __init__(self, limits: SandboxLimits | None = None, isolation: str = "auto", audit_hook: bool = True):
        """`audit_hook=False` leaves only the OS boundary (the tests use it to check that boundary alone)."""
        global _process_warned
        self.limits = limits or SandboxLimits()
        self.audit_hook = audit_hook or isolation == "process"
        if isolation not in ISOLATIONS:
            raise ValueError(f"sandbox isolation must be one of {', '.join(ISOLATIONS)}; got {isolation!r}")
        if isolation in ("auto", "bwrap") and not bwrap_available():
            from forkrl.errors import UserError
            raise UserError(
                "the python tool needs bubblewrap to isolate model-written code (apt-get install bubblewrap; "
                "user namespaces enabled); to run it with no OS isolation, set the tool's option "
                "isolation: process, which does not protect this machine's files, network or processes")
        self.isolation = "process" if isolation == "process" else "bwrap"
        if self.isolation == "process" and not _process_warned:
            _process_warned = True
            warnings.warn("python tool in process isolation: model-written code runs as this user with only an "
                          "audit hook and resource limits; it can read this user's files and environment, reach "
                          "the network and signal this user's processes", RuntimeWarning, stacklevel=2)
        interpreter, extra = _runtime()
        mb = 1024 * 1024
        self._base_cmd = (_as_nobody() + _bwrap_command(interpreter, extra, self.limits.disk_mb * mb)
                          if self.isolation == "bwrap" else [sys.executable])
        self._pool = ThreadPoolExecutor(max_workers=self.limits.workers, thread_name_prefix="sandbox")

    def run(self, code: str) -> ToolResult:
        start = time.perf_counter()
        try:
            return self._run(code, start)
        except Exception as e:   # a broken call is that call's observation, never its batch's failure
            return ToolResult(text=f"[sandbox error: {type(e).__name__}: {e}]", ok=False,
                              seconds=time.perf_counter() - start, error="sandbox")

    def run_many(self, codes: list[str]) -> list[ToolResult]:
        return list(self._pool.map(self.run, codes))

    def _run(self, code: str, start: float) -> ToolResult:
        lim = self.limits
        mb = 1024 * 1024
        limits = [str(lim.cpu_s), str(lim.memory_mb * mb), str(lim.file_size_mb * mb), str(lim.max_open_files),
                  str(lim.max_processes), "1" if self.audit_hook else "0"]
        python = ["-I", "-S", "-c", _PRELUDE, *limits]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
        workdir = None
        cgroup = _CallCgroup(lim.memory_mb * mb, lim.max_processes + 4)   # + setpriv/bwrap/its init/python
        try:
            if self.isolation == "bwrap":
                cmd, cwd = cgroup.prefix() + self._base_cmd + python, "/"
            else:
                workdir = tempfile.mkdtemp(prefix="forkrl-sandbox-")
                cmd, cwd = cgroup.prefix() + self._base_cmd + python, workdir
                env["HOME"] = workdir
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            try:
                feeder = threading.Thread(target=_feed, args=(proc.stdin, code.encode("utf-8", "replace")), daemon=True)
                feeder.start()
                output, total, timed_out = _collect(proc, lim.timeout_s, cap=lim.max_output_chars * 4,
                                                    limit=lim.file_size_mb * mb)
            finally:
                _kill_group(proc)
                proc.wait()
                proc.stdout.close()
            oom = cgroup.oom_killed()
        finally:
            cgroup.close()
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        return self._result(proc.returncode, timed_out, total > lim.file_size_mb * mb, oom, output, time.perf_counter() - start)

    def _result(self, rc: int, timed_out: bool, output_full: bool, oom: bool, text: str, seconds: float) -> ToolResult:
        lim = self.limits
        error = None
        # the prelude's frames are not the model's business
        text = "\n".join(line for line in text.splitlines() if not line.startswith('  File "<string>"'))
        if output_full:
            error, note = "output_limit", f"[stopped: output larger than {lim.file_size_mb} MB]"
        elif timed_out:
            error, note = "timeout", f"[killed: no result after {lim.timeout_s:g} s]"
        elif oom or "MemoryError" in text:
            error, note = "memory", f"[killed: more than {lim.memory_mb} MB of memory]" if oom else ""
        elif rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or (rc in (-signal.SIGKILL, 128 + signal.SIGKILL)):
            error, note = "timeout", f"[killed: CPU time limit of {lim.cpu_s} s]"
        elif rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
            error, note = "output_limit", f"[killed: output or file larger than {lim.file_size_mb} MB]"
        elif rc < 0 or rc > 128:
            error, note = "crashed", f"[killed by signal {_signal_name(-rc if rc < 0 else rc - 128)}]"
        elif rc != 0:
            error = "denied" if "sandbox:" in text else "exception"
            note = ""
        else:
            note = ""
        text = truncate(text.strip(), lim.max_output_chars)
        if note:
            text = f"{text}\n{note}" if text else note
        return ToolResult(text=text, ok=error is None, seconds=seconds, error=error)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _collect(proc: subprocess.Popen, timeout_s: float, cap: int, limit: int) -> tuple[str, int, bool]:
    """Read the call's output pipe until it closes, the deadline passes or it exceeds `limit` bytes.
    Keeps the head and the tail (`cap` bytes in all) and counts the rest."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    head, tail, total = bytearray(), bytearray(), 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return _join(head, tail, total, cap), total, True
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            # a process that left the pipe open after the main one ended (process isolation only)
            if proc.poll() is not None:
                return _join(head, tail, total, cap), total, False
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            return _join(head, tail, total, cap), total, False
        total += len(chunk)
        if len(head) < cap // 2:
            take = cap // 2 - len(head)
            head += chunk[:take]
            chunk = chunk[take:]
        if chunk:
            tail += chunk
            if len(tail) > cap // 2:
                del tail[:len(tail) - cap // 2]
        if total > limit:
            return _join(head, tail, total, cap), total, False


def _join(head: bytearray, tail: bytearray, total: int, cap: int) -> str:
    skipped = total - len(head) - len(tail)
    text = head.decode("utf-8", errors="replace")
    if skipped > 0:
        text += f"\n...[{skipped} bytes cut]...\n"
    return text + tail.decode("utf-8", errors="replace")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:   # real-time signals have no name in the enum
        return f"signal {number}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except OSError:
            pass


def truncate(text: str, limit: int) -> str:
    """At most `limit` characters: the head and the tail, with how much was cut."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n...[{len(text) - limit} characters cut]...\n{text[-tail:]}"
