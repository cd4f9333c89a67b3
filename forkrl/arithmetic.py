"""Arithmetic without `eval`: numbers, + - * / // % **, parentheses and unary signs, evaluated by
walking Python's syntax tree with bounds on sizes. The `calculator` tool and FAPO's rule-based
detector use it."""
from __future__ import annotations

import ast
import operator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
LIMIT = 1e15


def eval_arithmetic(expr: str, allow_pow: bool = False) -> float | None:
    """Value of the expression, or None for anything that is not bounded arithmetic (names, calls,
    attributes, a division by zero, a result beyond 1e15, ** unless allowed, exponents beyond 64)."""
    expr = expr.strip().replace("×", "*").replace("÷", "/").replace("^", "**" if allow_pow else "^")
    expr = expr.replace(" x ", " * ")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and not allow_pow:
                raise ValueError("power")
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise OverflowError
            out = _OPS[type(node.op)](a, b)
            if isinstance(out, complex) or abs(out) > LIMIT:
                raise OverflowError
            return out
        raise ValueError(f"not arithmetic: {type(node).__name__}")

    try:
        value = walk(tree)
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    return float(value)
