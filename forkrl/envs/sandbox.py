"""Running model-written Python in a separate, locked-down process — never in the trainer's.

Layers, outermost first:
1. a fresh network namespace with no interfaces and an unprivileged user (nobody), via util-linux
   `unshare`, when this process may create one (root, as on CI) and an interpreter exists that the
   unprivileged user can run (the system Python: only the standard library is importable);
   otherwise the trainer's own interpreter as the current user ("process" isolation);
2. resource limits (soft = hard, so the code cannot raise them): CPU seconds, address space, file
   size, open files, processes;
3. its own empty working directory, a minimal environment, its own session (killed as a group);
4. an audit hook installed before the code runs: no fork/exec/spawn, no signals to other
   processes, no sockets, no ctypes, no file writes or reads outside its directory (reads of the
   standard library excepted);
5. a wall-clock timeout; output goes to a file capped by the file-size limit, then truncated.

Whatever the code does — loop, allocate, print gigabytes, crash — the caller gets a `ToolResult`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

NOBODY = 65534

# runs in the sandboxed interpreter before the model's code; `exec` there is the point
_PRELUDE = r'''
import os, sys, resource
for _r, _v in zip((resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE,
                   resource.RLIMIT_NPROC, resource.RLIMIT_CORE), [int(x) for x in sys.argv[1:6]] + [0]):
    resource.setrlimit(_r, (_v, _v))
sys.argv = ["main.py"]
_ROOT = os.path.realpath(os.getcwd())
_STD = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix) if p})
_BLOCKED = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.__new__",
            "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "socket.gethostbyname",
            "os.chroot", "os.setuid", "sys.addaudithook", "os.putenv", "os.unsetenv", "mmap.__new__",
            "resource.setrlimit", "resource.prlimit"}
_BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "multiprocessing", "mmap"}
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                "os.symlink", "os.truncate", "os.utime", "os.listdir", "os.scandir", "shutil.rmtree",
                "shutil.copyfile", "shutil.move", "os.chdir"}

def _inside(path, roots):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return any(p == r or p.startswith(r + os.sep) for r in roots)

def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in _BLOCKED_MODULES:
        raise ImportError(f"sandbox: import of {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        if isinstance(path, int) or path is None:
            return
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)
        if not _inside(path, (_ROOT,)) and (writing or not _inside(path, _STD)):
            raise PermissionError(f"sandbox: no access to {path}")
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a, (_ROOT,) + (_STD if event in ("os.listdir", "os.scandir") else ())):
                raise PermissionError(f"sandbox: {event} outside the working directory")

sys.addaudithook(_hook)
del _hook
with open("main.py") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class ToolResult:
    """What a tool returns: the observation text, whether it ran cleanly, and how long it took."""
    text: str
    ok: bool = True
    seconds: float = 0.0
    error: str | None = None   # timeout | memory | output_limit | crashed | exception | denied | ...


@dataclass
class SandboxLimits:
    timeout_s: float = 5.0        # wall clock
    cpu_s: int = 5
    memory_mb: int = 512          # address space
    file_size_mb: int = 8         # any file it writes, its output included
    max_open_files: int = 64
    max_processes: int = 64       # per user; only binding under the unprivileged user
    max_output_chars: int = 2000  # observation length after truncation
    workers: int = 4              # concurrent sandboxes


def _probe_namespace(interpreter: str) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return False
    try:
        out = subprocess.run([unshare, "-n", "-S", str(NOBODY), "-G", str(NOBODY), interpreter, "-I", "-S", "-c",
                              "print('ok')"], capture_output=True, timeout=10, text=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "ok"


class PythonSandbox:
    """Runs code strings in sandboxed interpreters; `run_many` runs them concurrently (bounded pool)."""

    _probe_cache: dict[str, bool] = {}

    def __init__(self, limits: SandboxLimits | None = None, isolation: str = "auto"):
        self.limits = limits or SandboxLimits()
        if isolation not in ("auto", "namespace", "process"):
            raise ValueError(f"isolation must be auto, namespace or process; got {isolation!r}")
        system_python = shutil.which("python3", path="/usr/bin:/bin") or ""
        use_ns = False
        if isolation in ("auto", "namespace") and system_python:
            if system_python not in self._probe_cache:
                self._probe_cache[system_python] = _probe_namespace(system_python)
            use_ns = self._probe_cache[system_python]
        if isolation == "namespace" and not use_ns:
            raise RuntimeError("namespace isolation needs root, util-linux `unshare` and a system python3 "
                               "that the nobody user can run")
        self.isolation = "namespace" if use_ns else "process"
        self.interpreter = system_python if use_ns else sys.executable
        self._pool = ThreadPoolExecutor(max_workers=self.limits.workers, thread_name_prefix="sandbox")

    def run(self, code: str) -> ToolResult:
        lim = self.limits
        start = time.perf_counter()
        workdir = tempfile.mkdtemp(prefix="forkrl-sandbox-")
        try:
            with open(os.path.join(workdir, "main.py"), "w") as f:
                f.write(code)
            out_path = os.path.join(workdir, ".output")
            mb = 1024 * 1024
            cmd = [self.interpreter, "-I", "-S", "-c", _PRELUDE, str(lim.cpu_s), str(lim.memory_mb * mb),
                   str(lim.file_size_mb * mb), str(lim.max_open_files), str(lim.max_processes)]
            if self.isolation == "namespace":
                for p in (workdir, os.path.join(workdir, "main.py")):
                    os.chown(p, NOBODY, NOBODY)
                cmd = [shutil.which("unshare"), "-n", "-S", str(NOBODY), "-G", str(NOBODY), *cmd]
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
                   "PYTHONIOENCODING": "utf-8"}
            with open(out_path, "wb") as out:
                proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
                timed_out = False
                try:
                    proc.wait(timeout=lim.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(proc)
                    proc.wait()
            text = _read_capped(out_path, lim.max_output_chars * 4)
            full = os.path.getsize(out_path) >= lim.file_size_mb * mb
            return self._result(proc.returncode, timed_out, full, text, time.perf_counter() - start)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def run_many(self, codes: list[str]) -> list[ToolResult]:
        return list(self._pool.map(self.run, codes))

    def _result(self, rc: int, timed_out: bool, output_full: bool, text: str, seconds: float) -> ToolResult:
        lim = self.limits
        error = None
        # the prelude's frames are not the model's business
        text = "\n".join(line for line in text.splitlines() if not line.startswith('  File "<string>"'))
        if output_full:
            # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG (or the signal kills)
            error, note = "output_limit", f"[stopped: output larger than {lim.file_size_mb} MB]"
        elif timed_out:
            error, note = "timeout", f"[killed: no result after {lim.timeout_s:g} s]"
        elif rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
            error, note = "timeout", f"[killed: CPU time limit of {lim.cpu_s} s]"
        elif rc == -signal.SIGXFSZ:
            error, note = "output_limit", f"[killed: output or file larger than {lim.file_size_mb} MB]"
        elif rc < 0:
            error, note = "crashed", f"[killed by signal {signal.Signals(-rc).name}]"
        elif rc != 0:
            error = "memory" if "MemoryError" in text else "denied" if "sandbox:" in text else "exception"
            note = ""
        else:
            note = ""
        text = truncate(text.strip(), lim.max_output_chars)
        if note:
            text = f"{text}\n{note}" if text else note
        return ToolResult(text=text, ok=error is None, seconds=seconds, error=error)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _read_capped(path: str, cap: int) -> str:
    """The file's text, or its head and tail with the size of the middle that was skipped."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= cap:
            return f.read().decode("utf-8", errors="replace")
        head = f.read(cap // 2)
        f.seek(size - cap // 2)
        tail = f.read()
    return (head.decode("utf-8", errors="replace") + f"\n...[{size - cap} bytes cut]...\n"
            + tail.decode("utf-8", errors="replace"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def truncate(text: str, limit: int) -> str:
    """At most `limit` characters: the head and the tail, with how much was cut."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n...[{len(text) - limit} characters cut]...\n{text[-tail:]}"
