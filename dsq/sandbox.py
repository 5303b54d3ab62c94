"""A jinja2 sandbox for chat templates, which come with downloaded checkpoints and so are untrusted.

jinja2's ImmutableSandboxedEnvironment already refuses attribute tricks and mutation (no code runs); this
adds bounds on memory and time, since a template can otherwise ask for `'x' * 10**10`, `center(10**10)`, a
recursive macro or nested loops of 100,000 steps each. What it bounds, and where:
  - nothing is evaluated at compile time (optimized=False: jinja would otherwise fold `'x' * 10**10`);
  - every value a template builds is at most MAX_CHARS characters once rendered, checked *before* it is
    built wherever a builtin can multiply sizes: `*`, `**`, `+`, `%`, `~`, and the calls and filters that
    take a width, count or separator (center, ljust, replace, join, format, indent, batch, ...);
  - calls nest at most MAX_DEPTH deep (macros), loops take their items through a guard, and each render
    has a time budget that the guard, every call, operator, filter and output checks cooperatively
    (no signals or threads, so a refusal leaves no state behind). `lipsum` is removed.
Every refusal is a TemplateError, which the caller turns into one line.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from functools import wraps
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsq.template_size import FILTER_SIZE, MAX_BITS, fits, printf_size, size, small_int, str_call_size

MAX_TEMPLATE = 1 << 18  # published chat templates are a few KB
MAX_DEPTH = 64  # nested calls: templates recurse over message parts a few levels deep
MAX_RANGE = 100_000  # jinja's own sandbox limit for range(); a loop's items cost time through the budget
SECONDS = 2.0  # a chat template renders in well under a millisecond


class _Budget:
    def __init__(self) -> None:
        self.deadline, self.depth = time.monotonic() + SECONDS, 0


_budget: ContextVar[_Budget | None] = ContextVar("dsq_template_budget", default=None)


def _tick() -> None:
    """Refuse a render past its time budget (no budget outside a render, e.g. at compile time)."""
    b = _budget.get()
    if b is not None and time.monotonic() > b.deadline:
        raise TemplateError(f"rendering took more than {SECONDS:g} s")


def _bounded_filter(name: str, f: Callable) -> Callable:
    """A builtin filter whose int arguments, estimated result and result stay within the bounds."""
    estimate = FILTER_SIZE.get(name)
    lead = 0 if getattr(f, "jinja_pass_arg", None) is None else 1  # jinja passes eval_ctx / env first
    signature = inspect.signature(f) if estimate is not None else None  # the sync variant's, for async ones
    if signature is not None and next(iter(signature.parameters)) in ("eval_ctx", "environment", "context"):
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])

    @wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        for x in (*args, *kwargs.values()):
            small_int(x, f"filter {name}")
        if signature is not None:
            bound = signature.bind(*args[lead:], **kwargs)
            bound.apply_defaults()
            if name == "join":  # may be a generator: count it once, hand the same items on
                bound.arguments["value"] = list(bound.arguments["value"])
            fits(estimate(bound.arguments), f"filter {name}")
            args, kwargs = (*args[:lead], *bound.args), bound.kwargs
        out = f(*args, **kwargs)
        if isinstance(out, (str, list, tuple, dict)):
            fits(size(out), f"filter {name}")
        return out

    return bounded


def _guard(items: Iterable) -> Iterator:
    """A loop's items, checking the time budget at each one."""
    for x in items:
        _tick()
        yield x


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateError(f"range of {len(r):,} items is longer than {MAX_RANGE:,}")
    return r


def _raise(message: str) -> None:
    raise TemplateError(str(message))


class _CodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        """`a ~ b` through the environment's bounded concat (jinja writes a plain join)."""
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class ChatTemplateSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with the bounds in the module docstring, set up as HF chat templates
    expect (trim_blocks, lstrip_blocks, loop controls, `raise_exception`)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CodeGenerator

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], optimized=False,
                         finalize=self._finalize)
        del self.globals["lipsum"]
        self.globals.update(range=_range, raise_exception=_raise)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["dsq_guard"] = _guard

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Parse, then pass every for loop's items through the guard filter."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "dsq_guard", [], [], None, None, lineno=loop.lineno)
            loop.iter.set_environment(self)
        return tree

    def render(self, template: Any, **variables: Any) -> str:
        """Render within the budget; the output is bounded as it streams."""
        token = _budget.set(_Budget())
        try:
            out, n = [], 0
            for piece in template.generate(**variables):
                n += len(piece)
                fits(n, "the rendered text")
                _tick()
                out.append(piece)
            return "".join(out)
        finally:
            _budget.reset(token)

    # --- the bounded operations --------------------------------------------------------------------
    def concat(self, pieces: Iterable[Any]) -> str:  # jinja's join of `~`, macro bodies and block captures
        pieces = list(pieces)
        fits(sum(size(p) for p in pieces), "joining text")
        return "".join(map(str, pieces))

    @staticmethod
    def _finalize(value: Any) -> Any:
        """Every `{{ value }}` before it becomes text."""
        _tick()
        fits(size(value), "an output expression")
        return value

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and right > 0 and left not in (-1, 0, 1):
            if right * left.bit_length() > MAX_BITS:
                raise TemplateError(f"{left} ** {right} is larger than {MAX_BITS:,} bits")
        elif operator == "*" and ints:
            if left.bit_length() + right.bit_length() > MAX_BITS:
                raise TemplateError(f"a product is larger than {MAX_BITS:,} bits")
        elif operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and n > 0:
                fits(size(seq) * n, "repeating a value")
        elif operator == "%" and isinstance(left, str):
            fits(printf_size(left, right), "%-formatting")
        out = self.binop_table[operator](left, right)
        if operator == "+" and not ints:
            fits(size(out), "adding values")
        return out

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Every call a template makes (functions, methods, macros): depth, time and sizes."""
        _tick()
        what = getattr(__obj, "__name__", type(__obj).__name__)
        args = tuple(list(x) if isinstance(x, Iterator) else x for x in args)  # measured, then handed on
        for x in (*args, *kwargs.values()):
            small_int(x, what)
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            bound = str_call_size(owner, target.__name__, args, kwargs)
            if bound is not None:
                fits(bound, f"str.{target.__name__}")
        b = _budget.get()
        if b is not None:
            if b.depth >= MAX_DEPTH:
                raise TemplateError(f"calls nest deeper than {MAX_DEPTH} (a recursive macro?)")
            b.depth += 1
        try:
            out = super().call(__context, __obj, *args, **kwargs)
        finally:
            if b is not None:
                b.depth -= 1
        fits(size(out), what)
        return out
