"""Adversarial code in the python sandbox, at every isolation level this machine offers: every attack
is contained, reported as an observation, and the trainer (this process) carries on unaffected.

Levels: ``bwrap`` (the OS boundary with the audit hook on top), ``bwrap-os-only`` (the same with the
audit hook switched off, so the OS boundary alone is what is tested) and ``process`` (audit hook and
resource limits only: the attacks it is documented not to stop are not run there)."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from forkrl.envs.sandbox import (
    PythonSandbox,
    SandboxLimits,
    bwrap_available,
    cgroups_available,
)

REQUIRE_BWRAP = os.environ.get("FORKRL_REQUIRE_BWRAP") == "1"
SECRET = "forkrl-fake-secret-7f3a9c"
LIMITS = dict(timeout_s=4, cpu_s=4, memory_mb=256, file_size_mb=4, disk_mb=16, workers=4)

# Attacks every level stops with its audit hook: name -> (code, error kind, text the observation has)
HOOKED = {
    "read_outside": ("print(open('/etc/hostname').read())", "denied", "no access"),
    "read_project": (f"print(open({os.path.abspath('README.md')!r}).read())", "denied", "no access"),
    "list_outside": ("import os; print(os.listdir('/usr/..'))", "denied", "outside the working directory"),
    "write_outside": ("open('/var/tmp/forkrl-sandbox-escape', 'w').write('x')", "denied", "no access"),
    "network": ("import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)", "denied", "not allowed"),
    "http": ("import urllib.request; urllib.request.urlopen('http://example.com', timeout=2)", "denied",
             "not allowed"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "denied", "os.fork is not allowed"),
    "subprocess": ("import subprocess; subprocess.run(['sh', '-c', 'echo pwned'])", "denied", "not allowed"),
    "memory_bomb": ("x = bytearray(8 * 1024 ** 3)", "memory", "MemoryError"),
    "memory_creep": ("x = []\nwhile True:\n    x.append('y' * 10 ** 6)", "memory", ""),
    "infinite_loop": ("while True:\n    pass", "timeout", "killed"),
    "print_gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)", "output_limit", "stopped"),
    "kill_parent": ("import os, signal; os.kill(os.getppid(), signal.SIGKILL)", "denied", "os.kill is not allowed"),
    "ctypes_crash": ("import ctypes; ctypes.string_at(0)", "denied", "ctypes is not allowed"),
    "raise_limits": ("import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "denied", "not allowed"),
    "switch_off_hook": ("import __main__\nfor n in ('_BLOCKED', '_hook', '_make_hook'):\n"
                        "    getattr(__main__, n, set()).clear() if hasattr(getattr(__main__, n, None), 'clear') else None\n"
                        "import os; os.fork()", "denied", "os.fork is not allowed"),
    "exit_code": ("import sys; sys.exit(3)", "exception", ""),
}


def _levels():
    have = bwrap_available()
    if REQUIRE_BWRAP and not have:
        raise RuntimeError("FORKRL_REQUIRE_BWRAP=1 but bubblewrap cannot build the sandbox here")
    skip = [] if have else [pytest.mark.skip(reason="bubblewrap cannot create namespaces here")]
    return [pytest.param("bwrap", id="bwrap", marks=skip), pytest.param("bwrap-os-only", id="bwrap-os-only", marks=skip),
            pytest.param("process", id="process")]


def _make(level: str, **overrides) -> PythonSandbox:
    limits = SandboxLimits(**{**LIMITS, **overrides})
    if level == "process":
        return PythonSandbox(limits, isolation="process")
    return PythonSandbox(limits, isolation="bwrap", audit_hook=level == "bwrap")


@pytest.fixture(scope="module", params=_levels())
def level(request):
    return request.param


@pytest.fixture(scope="module")
def sandbox(level):
    sb = _make(level)
    yield sb
    sb.close()


def os_level(level):
    if level == "process":
        pytest.skip("process isolation does not stop this (stated in the README's security section)")


def test_hooked_attacks_are_contained_and_reported(sandbox, level):
    if level == "bwrap-os-only":
        pytest.skip("these are the audit hook's own cases")
    parent = os.getpid()
    names = list(HOOKED)
    start = time.perf_counter()
    results = sandbox.run_many([HOOKED[n][0] for n in names])   # concurrently, as in training
    elapsed = time.perf_counter() - start
    for name, r in zip(names, results):
        _, error, text = HOOKED[name]
        assert not r.ok, name
        assert r.error == error, f"{name}: {r.error} {r.text[-200:]!r}"
        assert text in r.text, f"{name}: {r.text[-300:]!r}"
        assert len(r.text) < 2500, name                           # observation truncated
    assert os.getpid() == parent and not os.path.exists("/var/tmp/forkrl-sandbox-escape")
    assert elapsed < 30
    assert sandbox.run("print(6 * 7)").text == "42"               # and it still works afterwards


def test_working_directory_is_private_and_empty(sandbox):
    r = sandbox.run("import os\nprint(sorted(os.listdir('.')))\nopen('scratch.txt', 'w').write('ok')\n"
                    "print(open('scratch.txt').read())")
    assert r.ok and r.text.splitlines() == ["[]", "ok"], r.text
    assert sandbox.run("import os\nprint(os.path.exists('scratch.txt'))").text == "False"


def test_standard_library_still_works(sandbox):
    r = sandbox.run("import math, fractions, itertools, json\nprint(math.factorial(20), fractions.Fraction(3, 6))")
    assert r.ok and r.text == "2432902008176640000 1/2"


# -- the OS boundary: what the audit hook alone never stopped ------------------------------------------
def test_parent_secrets_stay_out_of_reach(sandbox, level, monkeypatch):
    """Environment, command line and memory of the trainer: not inherited and not visible."""
    os_level(level)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    trainer = os.getpid()
    code = f"""
import os
found = [k for k, v in os.environ.items() if {SECRET!r} in v]
seen = []
for pid in os.listdir('/proc'):
    if pid.isdigit():
        for part in ('environ', 'cmdline'):
            try:
                if {SECRET!r}.encode() in open(f'/proc/{{pid}}/{{part}}', 'rb').read():
                    seen.append((pid, part))
            except OSError:
                pass
try:
    open('/proc/{trainer}/mem', 'rb'); mem = 'open'
except OSError as e:
    mem = type(e).__name__
print(found, seen, mem, os.environ.get('HOME'))
"""
    r = sandbox.run(code)
    assert SECRET not in r.text
    if level == "bwrap-os-only":
        assert r.ok and r.text == "[] [] FileNotFoundError /sandbox", r.text
    else:
        assert r.error == "denied"


def test_ptrace_and_signals_cannot_reach_the_trainer_or_other_users(level):
    os_level(level)
    sb = _make(level)
    bystander = _spawn_nobody_sleeper()
    trainer = os.getpid()
    try:
        code = f"""
import os, signal
out = []
for name, fn in [('kill', lambda: os.kill({trainer}, signal.SIGKILL)),
                 ('pidfd', lambda: signal.pidfd_send_signal(os.pidfd_open({trainer}), signal.SIGKILL)),
                 ('kill_bystander', lambda: os.kill({bystander.pid}, signal.SIGKILL))]:
    try:
        fn(); out.append(name + ':sent')
    except Exception as e:
        out.append(name + ':' + type(e).__name__)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
out.append('ptrace:' + str(libc.ptrace(16, {trainer}, 0, 0)) + ':' + str(ctypes.get_errno()))
print(' '.join(out)); os.kill(-1, signal.SIGKILL)
"""
        r = sb.run(code)
        assert "sent" not in r.text, r.text
        if level == "bwrap-os-only":
            assert "kill:ProcessLookupError pidfd:ProcessLookupError kill_bystander:ProcessLookupError ptrace:-1:3" in r.text
        time.sleep(0.2)
        assert bystander.poll() is None                     # kill(-1) stayed inside the call
        assert sb.run("print('alive')").text == "alive"
    finally:
        bystander.kill()
        bystander.wait()
        sb.close()


def _spawn_nobody_sleeper() -> subprocess.Popen:
    prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"] if os.geteuid() == 0 else []
    return subprocess.Popen(prefix + ["sleep", "60"])


def test_files_the_path_check_cannot_see(sandbox, level):
    """dir_fd-relative reads and writes, from the root of the sandbox's view."""
    os_level(level)
    marker = Path(tempfile.gettempdir()) / f"forkrl-host-file-{os.getpid()}"
    marker.write_text(SECRET)
    try:
        code = f"""
import os
root = os.open('/', os.O_RDONLY)
out = []
for rel in ({str(marker).lstrip('/')!r}, 'etc/shadow', 'etc/hostname', 'root/.bashrc'):
    try:
        out.append(os.read(os.open(rel, os.O_RDONLY, dir_fd=root), 100).decode())
    except OSError as e:
        out.append(type(e).__name__)
try:
    os.write(os.open('var/tmp/forkrl-escape', os.O_WRONLY | os.O_CREAT, dir_fd=root), b'x'); out.append('wrote')
except OSError as e:
    out.append(type(e).__name__)
print(out)
"""
        r = sandbox.run(code)
        assert SECRET not in r.text and "wrote" not in r.text
        assert not Path("/var/tmp/forkrl-escape").exists()
        if level == "bwrap-os-only":
            assert r.text.count("FileNotFoundError") == 5, r.text   # four reads and the write
    finally:
        marker.unlink()


def test_local_services_and_unix_sockets_are_unreachable(sandbox, level):
    os_level(level)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.settimeout(0.1)
    path = Path(tempfile.mkdtemp()) / "world.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    os.chmod(path.parent, 0o777)
    os.chmod(path, 0o777)
    unix.listen()
    unix.settimeout(0.1)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0forkrl-test-{os.getpid()}")
    abstract.listen()
    abstract.settimeout(0.1)
    try:
        code = f"""
import socket
out = []
for family, addr in [(socket.AF_INET, ('127.0.0.1', {tcp.getsockname()[1]})), (socket.AF_UNIX, {str(path)!r}),
                     (socket.AF_UNIX, '\\0forkrl-test-{os.getpid()}'), (socket.AF_INET, ('10.0.0.1', 80))]:
    s = socket.socket(family)
    s.settimeout(1)
    try:
        s.connect(addr); out.append('connected')
    except OSError as e:
        out.append(type(e).__name__)
print(out)
"""
        r = sandbox.run(code)
        assert "connected" not in r.text, r.text
        for server in (tcp, unix, abstract):
            with pytest.raises((socket.timeout, BlockingIOError)):
                server.accept()
    finally:
        for s in (tcp, unix, abstract):
            s.close()
        shutil.rmtree(path.parent, ignore_errors=True)


def _sandbox_processes() -> list[int]:
    """Host processes that belong to a sandbox call (bwrap's or the prelude's command line)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"--die-with-parent" in cmd or b"_make_hook" in cmd:
            found.append(int(pid))
    return found


def test_no_process_survives_its_call(level):
    """Forked children and a setsid daemon are gone when the call returns (normally or by timeout), and
    after 50 calls nothing of the sandbox is left: no process, no file outside its directories."""
    os_level(level)
    sb = _make(level, timeout_s=2)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    daemon = """
import os, time
for _ in range(20):
    if os.fork() == 0:
        os.setsid()
        time.sleep(60)
        os._exit(0)
print('forked')
"""
    hang = daemon.replace("print('forked')", "time.sleep(60)")
    try:
        results = sb.run_many([daemon, hang] * 2 + ["print(1)"] * 46)
        if level == "bwrap-os-only":
            assert results[0].text == "forked" and results[1].error == "timeout"
        else:   # the audit hook refuses the fork first
            assert results[0].error == results[1].error == "denied"
        assert all(r.text == "1" for r in results[4:])
        time.sleep(0.3)
        assert _sandbox_processes() == []
        assert set(os.listdir(tempfile.gettempdir())) - tmp_before == set()
    finally:
        sb.close()


def test_calls_do_not_see_each_others_files(level):
    os_level(level)
    sb = _make(level)
    write = ("import os\nfor d in ('.', os.environ.get('HOME', '.'), '/dev/shm'):\n"
             "    try:\n        open(os.path.join(d, 'left-behind'), 'w').write('x')\n    except OSError:\n        pass\n"
             "import time; time.sleep(0.5)")
    read = ("import os, time\ntime.sleep(0.2)\n"
            "print([os.path.exists(os.path.join(d, 'left-behind')) for d in ('.', os.environ.get('HOME', '.'), '/dev/shm')])")
    try:
        concurrent = sb.run_many([write, read])
        later = sb.run(read)
        for r in (concurrent[1], later):
            assert r.text == "[False, False, False]", r.text
    finally:
        sb.close()


@pytest.mark.skipif(not cgroups_available(), reason="no cgroup for a whole-call memory limit here")
def test_memory_holds_for_the_whole_call(level):
    """Four processes touching 200 MB each against a 256 MB call: the call is stopped, not 800 MB."""
    os_level(level)
    sb = _make(level, memory_mb=256, timeout_s=10)
    code = """
import os
kids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        b = bytearray(200 * 1024 * 1024)
        for j in range(0, len(b), 4096):
            b[j] = 1
        os._exit(0)
    kids.append(pid)
ok = sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in kids)
print('all four' if ok == 4 else f'{ok} of 4')
"""
    try:
        r = sb.run(code)
        assert "all four" not in r.text, r.text
        if level == "bwrap-os-only":
            assert r.error == "memory" or "of 4" in r.text, r
    finally:
        sb.close()


def test_disk_is_a_small_private_tmpfs(sandbox, level):
    os_level(level)
    code = ("import os\nn = 0\ntry:\n    while True:\n        open(f'f{n}', 'wb').write(b'x' * 3_000_000); n += 1\n"
            "except OSError as e:\n    print(n, e.strerror)")
    r = sandbox.run(code)
    written, _, reason = r.text.partition(" ")
    assert reason == "No space left on device" and int(written) <= 6, r.text   # disk_mb=16


def test_the_trainer_reads_nothing_back_by_path(sandbox, level):
    """Symlinks, FIFOs and device files where an output file used to be change nothing."""
    os_level(level)
    code = ("import os\nfor n, t in (('.output', '/etc/shadow'), ('out', '/dev/zero')):\n    os.symlink(t, n)\n"
            "os.mkfifo('.fifo')\nprint('planted')")
    start = time.perf_counter()
    r = sandbox.run(code)
    assert time.perf_counter() - start < 3 and "root:" not in r.text
    assert r.text == "planted" if level == "bwrap-os-only" else r.error == "denied"


def test_one_failing_call_never_fails_its_batch(sandbox, level):
    codes = ["print(1)", "import os, signal; os.kill(os.getpid(), signal.SIGRTMIN + 3)" if level != "bwrap"
             else "import sys; sys.exit(0 / 0)", "print(2)", "\xff\x00 not python", "print(3)"]
    if level == "process":
        codes[1] = "import sys; sys.exit(0 / 0)"
    r = sandbox.run_many(codes)
    assert [x.text for x in (r[0], r[2], r[4])] == ["1", "2", "3"]
    assert not r[1].ok and not r[3].ok
    if level == "bwrap-os-only":
        assert r[1].error == "crashed" and "signal 37" in r[1].text, r[1]


def test_unprivileged_trainer_gets_the_same_boundary():
    """The same checks with the trainer as an unprivileged user (nobody): bwrap without root, limits
    without a cgroup."""
    if os.geteuid() != 0 or not bwrap_available() or shutil.which("setpriv") is None:
        pytest.skip("needs root to become another user, and bubblewrap")
    import forkrl.envs.sandbox as module
    tmp = Path(tempfile.mkdtemp())
    try:
        os.chmod(tmp, 0o755)
        shutil.copy(module.__file__, tmp / "sandbox.py")
        script = tmp / "check.py"
        script.write_text(f"""
import json, sys
sys.path.insert(0, {str(tmp)!r})
from sandbox import PythonSandbox, SandboxLimits
sb = PythonSandbox(SandboxLimits(timeout_s=3, cpu_s=3, memory_mb=256, file_size_mb=4, disk_mb=16), isolation='bwrap',
                   audit_hook=False)
codes = {{
    'identity': "import os; print(os.getuid(), sorted(os.listdir('/')))",
    'environment': "import os; print(sorted(os.environ))",
    'fork_bomb': "import os\\nn = 0\\ntry:\\n    while True:\\n        if os.fork() == 0:\\n            import time; time.sleep(5); os._exit(0)\\n        n += 1\\nexcept OSError as e:\\n    print(n, e.strerror)",
    'memory': "x = bytearray(1024 ** 3)",
}}
print(json.dumps({{k: [r.text, r.error] for k, r in zip(codes, sb.run_many(list(codes.values())))}}))
""")
        os.chmod(script, 0o644)
        out = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3",
                              "-I", str(script)], capture_output=True, text=True, timeout=60, cwd=tmp,
                             env={"PATH": "/usr/bin:/bin", "WANDB_API_KEY": SECRET})
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        uid, _, root = res["identity"][0].partition(" ")
        assert uid == "65534" and "'sandbox'" in root and "'root'" not in root and "'etc'" not in root, res
        assert "WANDB_API_KEY" not in res["environment"][0]
        n, _, reason = res["fork_bomb"][0].partition(" ")
        assert reason == "Resource temporarily unavailable" and int(n) <= 64, res["fork_bomb"]
        assert res["memory"][1] == "memory", res["memory"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_no_isolation_is_refused_unless_asked_for(monkeypatch):
    import forkrl.envs.sandbox as module
    from forkrl.errors import UserError
    monkeypatch.setattr(module, "bwrap_available", lambda: False)
    with pytest.raises(UserError, match="isolation: process"):
        PythonSandbox(isolation="auto")
    monkeypatch.setattr(module, "_process_warned", False)
    with pytest.warns(RuntimeWarning, match="does not|only an audit hook"):
        PythonSandbox(isolation="process").close()


def test_limits_are_checked():
    with pytest.raises(ValueError, match="memory_mb must be a positive whole number"):
        SandboxLimits(memory_mb=0)
    with pytest.raises(ValueError, match="isolation must be one of auto, bwrap, process"):
        PythonSandbox(isolation="namespace")


def test_concurrent_callers_share_one_pool_safely(sandbox):
    out = []
    threads = [threading.Thread(target=lambda i=i: out.append(sandbox.run(f"print({i})").text)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out, key=int) == [str(i) for i in range(8)]
