"""How big a value a chat template builds will be once rendered, estimated before it is built, so that the
sandbox (dsq/sandbox.py) can refuse `'x' * 10**10` or `center(10**10)` without first allocating it."""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import Any

from jinja2 import TemplateError

# The longest published context (163,840 tokens for DeepSeek-V2) is about 0.65 M characters of text at
# the usual ~4 characters per token: a larger prompt cannot be run anyway. A value is then at most 4 MB.
MAX_CHARS = 1 << 20
MAX_BITS = 14_000  # ints: about Python's own 4300-digit limit on int -> str


def measure(x: Any, limit: int = MAX_CHARS) -> tuple[int, int]:
    """About how many characters `str(x)` takes, and how deeply x nests, counted up to just past `limit`
    (so the count's own cost is bounded); a container shared n times counts n times, as it renders."""
    level, n, depth = [x], 0, 0
    while level and n <= limit:
        below: list[Any] = []
        for v in level:
            if isinstance(v, (str, bytes)):
                n += len(v)
            elif isinstance(v, dict):
                n += 2 + 4 * len(v)
                below.extend(v)
                below.extend(v.values())
            elif isinstance(v, (list, tuple, set, frozenset)):
                n += 2 + 2 * len(v)
                below.extend(v)
            elif isinstance(v, int) and not isinstance(v, bool):
                n += v.bit_length() // 3 + 2
            else:
                n += 8
            if n > limit:
                break
        level, depth = below, depth + 1 if below else depth
    return n, depth


def size(x: Any) -> int:
    return measure(x)[0]


def fits(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise TemplateError(f"{what} would make more than {MAX_CHARS:,} characters")


def small_int(x: Any, what: str) -> None:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_CHARS:
        raise TemplateError(f"{what}: argument {x} is larger than {MAX_CHARS:,}")


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def printf_size(fmt: str, args: Any) -> int:
    """An upper bound on len(fmt % args): each spec adds its width and precision and a float's digits."""
    specs = _PRINTF.findall(fmt)
    values = args if isinstance(args, tuple) else (args,)
    n = len(fmt) + size(args) + 400 * len(specs)
    for width, prec in specs:
        for w in (width, prec):
            if w == "*":
                n += sum(abs(v) for v in values if isinstance(v, int))
            elif w:
                n += int(w)
    return n


def _format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on len(fmt.format(*args, **kwargs)): every field may render the largest argument."""
    largest = max((size(v) for v in (*args, *kwargs.values())), default=0)
    n = len(fmt)
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is not None:
            n += largest + 400 + sum(map(int, re.findall(r"\d+", spec or ""))) + (MAX_CHARS if "{" in (spec or "")
                                                                                  else 0)
    return n


def str_call_size(obj: str, method: str, args: tuple, kwargs: dict) -> int | None:
    """An upper bound on the length of a str method's result, for the methods that can grow a string."""
    a = [*args, *kwargs.values()]
    if method in ("center", "ljust", "rjust", "zfill"):
        return len(obj) + (a[0] if a and isinstance(a[0], int) else 0)
    if method == "expandtabs":
        return len(obj) + obj.count("\t") * (a[0] if a and isinstance(a[0], int) else 8)
    if method == "replace" and len(a) >= 2 and isinstance(a[0], str) and isinstance(a[1], str):
        return len(obj) + (obj.count(a[0]) if a[0] else len(obj) + 1) * len(a[1])
    if method == "join" and a:
        return size(a[0]) + len(obj) * len(a[0])
    if method in ("format", "format_map"):
        return _format_size(obj, args, kwargs if method == "format" else (args[0] if args else {}))
    if method == "translate":
        raise TemplateError("str.translate is not allowed in a chat template")
    return None


def _width(w: Any) -> int:
    return w if isinstance(w, int) else len(str(w))


def _replace_size(s: str, old: str, new: str) -> int:
    return len(s) + (s.count(old) if old else len(s) + 1) * len(new)


def _indent_size(s: Any, width: Any = 4) -> int:
    """Each line gets `width` more; a non-string could render with a line per character."""
    lines = s.count("\n") + 1 if isinstance(s, str) else size(s)
    return size(s) + lines * _width(width)


def _dump_size(value: Any, indent: Any = None) -> int:
    """json / pprint: each line (at most one per character) indented by `indent` per level."""
    n, depth = measure(value)
    return n * (2 + _width(indent or 1) * depth)


# builtin filter -> an upper bound on its result's size from its bound arguments, for the filters that can
# make more than they are given
FILTER_SIZE: dict[str, Callable[[dict[str, Any]], int]] = {
    "center": lambda a: size(a["value"]) + a["width"],
    "indent": lambda a: _indent_size(a["s"], a["width"]),
    "replace": lambda a: _replace_size(str(a["s"]), str(a["old"]), str(a["new"])),
    "join": lambda a: size(a["value"]) + len(a["value"]) * len(str(a["d"])),
    "format": lambda a: printf_size(str(a["value"]), a["kwargs"] or a["args"]),
    "batch": lambda a: size(a["value"]) + a["linecount"] * size(a["fill_with"]),
    "slice": lambda a: size(a["value"]) + a["slices"] * (2 + size(a["fill_with"])),
    "tojson": lambda a: _dump_size(a["value"], a["indent"]),
    "pprint": lambda a: _dump_size(a["value"]),
    "string": lambda a: size(a["s"]),
    "wordwrap": lambda a: size(a["s"]) * (2 + len(str(a["wrapstring"] or ""))),  # a break at every character
}
