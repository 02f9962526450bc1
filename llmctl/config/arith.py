"""Safe integer arithmetic for `total_batch_size_str` ('2**11', '8*1024', '(4+4)*256').

Parsed with `ast` and evaluated by walking the tree: only integer literals and
+ - * // ** and parentheses are accepted, so no string can ever run code.
"""

from __future__ import annotations

import ast
import operator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_VALUE = 2**62  # far beyond any sensible batch; stops '9**9**9' from eating the CPU
MAX_LENGTH = 100


def parse_int_expression(text: str) -> int:
    """Value of an integer expression; ValueError with a reason otherwise."""
    text = str(text).strip()
    if not text:
        raise ValueError("empty expression")
    if len(text) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(
            f"{text!r} is not an arithmetic expression (use digits, + - * // ** and parentheses)"
        ) from None
    return _walk(tree.body, text)


def _walk(node: ast.AST, text: str) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left, text), _walk(node.right, text)
        if isinstance(node.op, ast.Pow) and (right < 0 or right > 64 or abs(left) > MAX_VALUE):
            raise ValueError(f"exponent out of range in {text!r}")
        if isinstance(node.op, ast.FloorDiv) and right == 0:
            raise ValueError(f"division by zero in {text!r}")
        value = _BINARY[type(node.op)](left, right)
        if abs(value) > MAX_VALUE:
            raise ValueError(f"{text!r} is too large")
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand, text))
    raise ValueError(
        f"{text!r} is not allowed: only integers, + - * // ** and parentheses may appear"
    )
