"""Adversarial code in the python sandbox: every attack is contained, reported as an observation, and
the process that called the sandbox (the trainer) carries on unaffected."""
import os
import time

import pytest

from forkrl.envs.sandbox import PythonSandbox, SandboxLimits

ATTACKS = {
    # name: (code, expected error kind, text the observation must contain)
    "read_outside": ("print(open('/etc/hostname').read())", "denied", "no access"),
    "read_project": (f"print(open({os.path.abspath('README.md')!r}).read())", "denied", "no access"),
    "list_outside": ("import os; print(os.listdir('/work'))", "denied", "outside the working directory"),
    "write_outside": ("open('/tmp/forkrl-sandbox-escape', 'w').write('x')", "denied", "no access"),
    "network": ("import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)", "denied", "not allowed"),
    "http": ("import urllib.request; urllib.request.urlopen('http://example.com', timeout=2)", "denied",
             "not allowed"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "denied", "os.fork is not allowed"),
    "subprocess": ("import subprocess; subprocess.run(['sh', '-c', 'echo pwned'])", "denied", "not allowed"),
    "memory_bomb": ("x = bytearray(8 * 1024 ** 3)", "memory", "MemoryError"),
    "memory_creep": ("x = []\nwhile True:\n    x.append('y' * 10 ** 6)", "memory", "MemoryError"),
    "infinite_loop": ("while True:\n    pass", "timeout", "killed"),
    "print_gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)", "output_limit", "stopped"),
    "kill_parent": ("import os, signal; os.kill(os.getppid(), signal.SIGKILL)", "denied", "os.kill is not allowed"),
    "ctypes_crash": ("import ctypes; ctypes.string_at(0)", "denied", "ctypes is not allowed"),
    "raise_limits": ("import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "denied", "not allowed"),
    "exit_code": ("import sys; sys.exit(3)", "exception", ""),
}


def _sandboxes():
    out = [pytest.param("process", id="process")]
    probe = PythonSandbox(isolation="auto")
    marks = [] if probe.isolation == "namespace" else [pytest.mark.skip(reason="no namespace isolation here")]
    probe.close()
    return [pytest.param("namespace", id="namespace", marks=marks), *out]


@pytest.fixture(scope="module", params=_sandboxes())
def sandbox(request):
    sb = PythonSandbox(SandboxLimits(timeout_s=3, cpu_s=3, memory_mb=256, file_size_mb=4, workers=4),
                       isolation=request.param)
    yield sb
    sb.close()


def test_every_attack_is_contained_and_reported(sandbox):
    parent = os.getpid()
    names = list(ATTACKS)
    start = time.perf_counter()
    results = sandbox.run_many([ATTACKS[n][0] for n in names])   # concurrently, as in training
    elapsed = time.perf_counter() - start
    for name, r in zip(names, results):
        _, error, text = ATTACKS[name]
        assert not r.ok, name
        assert r.error == error, f"{name}: {r.error} {r.text[-200:]!r}"
        assert text in r.text, f"{name}: {r.text[-300:]!r}"
        assert len(r.text) < 2500, name                           # observation truncated
    assert os.getpid() == parent and not os.path.exists("/tmp/forkrl-sandbox-escape")
    assert elapsed < 30
    # and the sandbox still works afterwards
    assert sandbox.run("print(6 * 7)").text == "42"


def test_working_directory_is_private_and_empty(sandbox):
    r = sandbox.run("import os\nprint(sorted(os.listdir('.')))\nopen('scratch.txt', 'w').write('ok')\n"
                    "print(open('scratch.txt').read())")
    assert r.ok and r.text.splitlines() == ["['.output', 'main.py']", "ok"]
    r2 = sandbox.run("import os\nprint(os.path.exists('scratch.txt'))")
    assert r2.text == "False"


def test_standard_library_still_works(sandbox):
    r = sandbox.run("import math, fractions, itertools, json\nprint(math.factorial(20), fractions.Fraction(3, 6))")
    assert r.ok and r.text == "2432902008176640000 1/2"
