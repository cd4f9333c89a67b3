"""Rule-based instrumentation of a model-written program (RL for ML-engineering agents, arXiv
2509.01684; algorithms.md §22): before the program runs, marker prints are inserted after the
statements that reach progress milestones, each carrying a fresh random nonce, so a program's output
shows how far it got and the program cannot print a marker itself (it never sees the nonce's value
before it runs; it could only dig it out of its own code object at run time).

The paper has a frozen LLM insert the markers; here rules over the program's top-level statements
(its syntax tree) do, which makes the credit reproducible:

    started      before the first statement (the program parsed and began)
    data_loaded  after the first assignment of a literal collection, or of a call whose name opens,
                 reads or loads (open, read_csv, json.load, ...)
    computed     after the first later statement that computes from it: an assignment or augmented
                 assignment with a call, an operator or a comprehension, or a loop
    printed      after the first print(...) statement at top level

A program that does not parse reaches no milestone.
"""
from __future__ import annotations

import ast
import re
import secrets

MILESTONES = ("started", "data_loaded", "computed", "printed")
_LOADERS = re.compile(r"open|read|load", re.IGNORECASE)


def _call_name(node: ast.AST) -> str:
    f = node.func if isinstance(node, ast.Call) else None
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return ""


def _loads_data(stmt: ast.stmt) -> bool:
    if not isinstance(stmt, (ast.Assign, ast.AnnAssign)) or stmt.value is None:
        return False
    return any(isinstance(n, (ast.List, ast.Tuple, ast.Dict, ast.Set)) or
               (isinstance(n, ast.Call) and _LOADERS.search(_call_name(n))) for n in ast.walk(stmt.value))


def _computes(stmt: ast.stmt) -> bool:
    if isinstance(stmt, (ast.For, ast.While)):
        return True
    if isinstance(stmt, ast.AugAssign):
        return True
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
        return any(isinstance(n, (ast.Call, ast.BinOp, ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp))
                   for n in ast.walk(stmt.value))
    return False


def _prints(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and _call_name(stmt.value) == "print"


def instrument(code: str, nonce: str | None = None) -> tuple[str | None, str]:
    """(instrumented source, nonce); source None when the program does not parse."""
    nonce = nonce or secrets.token_hex(8)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None, nonce
    body = tree.body
    after: dict[int, list[str]] = {}
    loaded = next((i for i, s in enumerate(body) if _loads_data(s)), None)
    if loaded is not None:
        after.setdefault(loaded, []).append("data_loaded")
        computed = next((i for i, s in enumerate(body) if i > loaded and _computes(s)), None)
        if computed is not None:
            after.setdefault(computed, []).append("computed")
    printed = next((i for i, s in enumerate(body) if _prints(s)), None)
    if printed is not None:
        after.setdefault(printed, []).append("printed")

    def marker(name: str) -> ast.stmt:
        return ast.parse(f"print('<<milestone {nonce} {name}>>', flush=True)").body[0]

    out = [marker("started")]
    for i, stmt in enumerate(body):
        out.append(stmt)
        out.extend(marker(name) for name in after.get(i, []))
    tree.body = out
    return ast.unparse(ast.fix_missing_locations(tree)), nonce


def read_milestones(output: str, nonce: str) -> tuple[list[str], str]:
    """(milestones reached, in order, each once; the output without the marker lines). Only markers
    with this run's nonce count."""
    reached, kept = [], []
    pattern = re.compile(rf"^<<milestone {re.escape(nonce)} (\w+)>>$")
    for line in output.splitlines():
        m = pattern.match(line.strip())
        if m and m.group(1) in MILESTONES:
            if m.group(1) not in reached:
                reached.append(m.group(1))
        else:
            kept.append(line)
    return reached, "\n".join(kept)
