"""Score generated programs without ever running them: parse with ``ast`` and interpret arithmetic.

Accepted: ``def solution():`` (no arguments, decorators or annotations) whose body holds only
assignments to plain names (``x = ...``, ``x += ...``) of arithmetic expressions over integer or
float literals and already-assigned names (+, -, *, /, //, %, unary +/-), and ends with ``return``.
Everything else (calls, attributes, imports, subscripts, loops, ``**``, strings, ...) is refused.
Magnitudes are capped so that ``x = x * x`` repeated cannot exhaust memory.
"""

from __future__ import annotations

import ast
import operator
import re

MAX_STATEMENTS = 32
MAX_ABS = 10**30
BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class Refused(ValueError):
    """The program uses something other than arithmetic, or is not a ``solution()`` function."""


def _value(node: ast.AST, env: dict[str, float]) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        if node.id not in env:
            raise Refused(f"name '{node.id}' used before assignment")
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
        left, right = _value(node.left, env), _value(node.right, env)
        try:
            out = BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise Refused("division by zero") from None
        return _bounded(out)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_value(node.operand, env))
    raise Refused(f"'{type(node).__name__}' is not arithmetic")


def _bounded(value: float) -> float:
    if abs(value) > MAX_ABS:
        raise Refused("a value exceeds 1e30")
    return value


def _function(source: str) -> ast.FunctionDef:
    try:
        tree = ast.parse(source, mode="exec")
    except SyntaxError as err:
        raise Refused(f"syntax error: {err.msg}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        raise Refused("expected exactly one function definition")
    fn = tree.body[0]
    args = fn.args
    if fn.name != "solution" or fn.decorator_list or fn.returns is not None:
        raise Refused("expected a plain 'def solution():'")
    if args.args or args.posonlyargs or args.kwonlyargs or args.vararg or args.kwarg:
        raise Refused("solution() takes no arguments")
    if len(fn.body) > MAX_STATEMENTS:
        raise Refused("too many statements")
    return fn


def evaluate_program(source: str) -> float:
    """Interpret ``def solution(): ...`` and return its value; raise ``Refused`` otherwise."""
    env: dict[str, float] = {}
    fn = _function(source)
    for stmt in fn.body:
        if isinstance(stmt, ast.Return):
            if stmt.value is None:
                raise Refused("bare return")
            return _value(stmt.value, env)
        if isinstance(stmt, ast.Assign):
            if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
                raise Refused("only 'name = expression' assignments")
            env[stmt.targets[0].id] = _value(stmt.value, env)
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and type(stmt.op) in BINOPS:
            current = _value(ast.Name(stmt.target.id, ast.Load()), env)
            env[stmt.target.id] = _bounded(BINOPS[type(stmt.op)](current, _value(stmt.value, env)))
        else:
            raise Refused(f"'{type(stmt).__name__}' statement is not allowed")
    raise Refused("no return statement")


def extract_program(generated: str) -> str | None:
    """The ``def solution():`` block of a generation, up to and including its first return line."""
    start = generated.find("def solution():")
    if start < 0:
        return None
    lines = generated[start:].split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip().startswith("return"):
            return "\n".join(lines[: i + 1])
    return None


def score_program(generated: str, answer: float) -> tuple[bool, bool]:
    """(is a valid arithmetic program, returns ``answer``)."""
    source = extract_program(generated)
    if source is None:
        return False, False
    try:
        value = evaluate_program(source)
    except (Refused, RecursionError):
        return False, False
    return True, abs(value - answer) < 1e-6


ANSWER = re.compile(r"The answer is (-?\d+)")


def score_math(generated: str, answer: int) -> tuple[bool, bool]:
    """(has 'The answer is N', N equals ``answer``)."""
    match = ANSWER.search(generated)
    return match is not None, match is not None and int(match.group(1)) == answer


STEP = re.compile(r"^\s*x = x ([-+*/]) (-?\d+)\s*$")
START = re.compile(r"^\s*x = (-?\d+)\s*$")


def program_shape(generated: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """(operators, numbers) of a ``x = N; x = x op N; ...`` program, for partial-credit diagnostics:
    the operators say whether the story was read right, the numbers whether they were copied."""
    source = extract_program(generated)
    if source is None:
        return None
    ops, numbers = [], []
    for line in source.split("\n")[1:-1]:
        if (m := START.match(line)) and not ops and not numbers:
            numbers.append(int(m.group(1)))
        elif m := STEP.match(line):
            ops.append(m.group(1))
            numbers.append(int(m.group(2)))
        else:
            return None
    return tuple(ops), tuple(numbers)
