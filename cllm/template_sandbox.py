"""The Jinja environment that chat templates render in: transformers' own (a sandboxed environment with
trim_blocks and lstrip_blocks, loop controls, a `tojson` filter that keeps non-ASCII text, `raise_exception(message)`
and `strftime_now(format)`; `{% generation %}` blocks render their body), bounded in what a render may cost.

A template comes with a model, from anyone, and runs on every chat request; the sandbox stops attribute
escapes, and these bound what a template may cost (TemplateLimitExceeded, a UsageError naming the limit):
- MAX_TEMPLATE_CHARS: the template's source; a longer one, or one nested too deeply to compile, is refused when
  the model is loaded (a ChatTemplate compiles when it is made).
- MAX_RENDERED_CHARS: the prompt a render makes, and any one value (string, list) a template makes or prints,
  counted as the characters it would print as.
- MAX_RENDER_STEPS: the steps of one render: loop iterations, calls, filters, tests, operators and lookups.
- MAX_RENDER_WORK: the characters of all the values one render makes, summed (what repeated concatenation costs).
- MAX_RANGE: the items of one range(); MAX_INT_BITS: the size of an integer that `*` or `**` makes.
- RENDER_SECONDS: a render's deadline. Every step checks it, so a runaway render ends itself, and the thread that
  runs it, within about that time.
The calls that can make a value much longer than their inputs in one step are sized before they run: repetition
(`*`), `**`, %-formatting and str.format, the filters center, indent, replace, format, wordwrap, join, tojson,
batch and slice, and the string methods that pad, replace, translate, join or expand tabs. The debugging helpers
pprint and lipsum are left out: no chat template uses them, and their output grows with nesting.
"""
from __future__ import annotations

import functools
import json
import re
import string
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from .errors import UsageError

MAX_TEMPLATE_CHARS = 200_000
MAX_RENDERED_CHARS = 1 << 20
MAX_RENDER_STEPS = 1_000_000
MAX_RENDER_WORK = 16 * MAX_RENDERED_CHARS
MAX_RANGE = 100_000
MAX_INT_BITS = 1 << 16
RENDER_SECONDS = 1.0


class TemplateLimitExceeded(UsageError):
    """A chat template went past one of its limits (module notes)."""


def exceeded(what: str, limit: str) -> TemplateLimitExceeded:
    """The refusal of a template that `what`, past `limit`: one of this module's constants, or another limit."""
    name = f"{__name__}.{limit}" if limit in globals() else limit
    return TemplateLimitExceeded(f"the model's chat template {what} (limit: {name})")


class _Budget:
    """One render's account: its steps, the characters it has made, its deadline."""

    def __init__(self):
        self.steps = 0
        self.work = 0
        self.deadline = time.monotonic() + RENDER_SECONDS
        self._sizes: dict[int, tuple[object, int]] = {}  # id -> (container, its printed size), the container kept

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_RENDER_STEPS:
            raise exceeded(f"takes more than {MAX_RENDER_STEPS:,} steps to render", "MAX_RENDER_STEPS")
        if time.monotonic() > self.deadline:
            raise exceeded(f"takes more than {RENDER_SECONDS:g} s to render", "RENDER_SECONDS")

    def expect(self, size: int) -> None:
        """Before a value of about `size` characters is made: refuses it if it is too long, or if the render has
        made too much already."""
        if size > MAX_RENDERED_CHARS:
            raise _too_long(size)
        if self.work + size > MAX_RENDER_WORK:
            raise exceeded(f"makes more than {MAX_RENDER_WORK:,} characters in one render",
                            "MAX_RENDER_WORK")

    def made(self, value):
        """value, once it is checked and counted as made."""
        size = self.printed_size(value)
        self.expect(size)
        self.work += size
        return value

    def check(self, value) -> None:
        """Refuses a value too long to take part in a call or an operation: a template can write a list that holds
        one long string many times, which prints it each time."""
        size = self.printed_size(value)
        if size > MAX_RENDERED_CHARS:
            raise _too_long(size)

    def printed_size(self, value) -> int:
        """_printed_size, kept for the containers a render has measured: a sandboxed template cannot change them."""
        if isinstance(value, str) or not isinstance(value, Collection):
            return _printed_size(value)
        known = self._sizes.get(id(value))
        if known is None or known[0] is not value:
            known = self._sizes[id(value)] = (value, _printed_size(value))
        return known[1]


def _too_long(size: int) -> TemplateLimitExceeded:
    return exceeded(f"makes a value of {size:,} characters, more than {MAX_RENDERED_CHARS:,}",
                     "MAX_RENDERED_CHARS")


def _printed_size(value) -> int:
    """About how many characters str(value) has: a string's length, summed through the items of lists, tuples,
    dicts and namespaces (a list that holds one long string many times prints it each time); counted only until it
    is past MAX_RENDERED_CHARS."""
    size, pending = 0, [value]
    while pending and size <= MAX_RENDERED_CHARS:
        item = pending.pop()
        if isinstance(item, (str, bytes, range)):
            size += len(item)
        elif isinstance(item, Mapping):
            size += 4 * len(item) + 2
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, Collection):
            size += 2 * len(item) + 2
            pending += item
        elif isinstance(item, _BoundedNamespace):
            pending.append(item._Namespace__attrs)
        elif isinstance(item, int):
            size += item.bit_length() // 3 + 2
        else:
            size += 24  # a float, None, an undefined, a macro: short when printed
    return size


_BUDGET: ContextVar[_Budget] = ContextVar("cllm_template_budget")


def _budget() -> _Budget:
    """The budget of the render under way; a LookupError outside one, so that nothing renders unbounded."""
    return _BUDGET.get()


@contextmanager
def render_budget():
    token = _BUDGET.set(_Budget())
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _range(*args) -> range:
    items = range(*args)
    if len(items) > MAX_RANGE:
        raise exceeded(f"asks for a range of {len(items):,} items, more than {MAX_RANGE:,}", "MAX_RANGE")
    return items


def _iterated(items) -> Iterator:
    """A for loop's items, each one a step (the code generator puts every loop's items through it)."""
    budget = _budget()
    for item in items:
        budget.step()
        yield item


class _BoundedNamespace(Namespace):
    """namespace(): what a template assigns to it is checked and counted as made, so that a loop which doubles a
    string in a namespace stops at MAX_RENDERED_CHARS."""

    def __setitem__(self, name, value):
        budget = _budget()
        budget.step()
        super().__setitem__(name, budget.made(value))


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    _budget().expect(16 * len(format))  # a directive of two characters makes at most a few dozen ("%c")
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlocks(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} (marks the assistant's text for training masks): its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


# The sizes of what the calls that can make a value much longer than their inputs will make, computed from their
# arguments before they run: each takes the call's own parameters (a filter's without the context jinja passes).


def _replaced_size(text: str, old: str, new: str, count) -> int:
    occurrences = text.count(old)  # the empty string occurs len(text) + 1 times
    if count is not None and count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * max(len(new) - len(old), 0)


def _translated_size(text: str, table) -> int:
    values = table.values() if isinstance(table, Mapping) else table if isinstance(table, Collection) else ()
    return len(text) * max((len(v) for v in values if isinstance(v, str)), default=1)


def _joined_size(items, separator: str) -> int:
    """An iterable that cannot tell its length (a loop; a filter's lazy result is a list by then) counts as the
    longest there may be."""
    count = len(items) if isinstance(items, Collection) else MAX_RENDERED_CHARS
    return _budget().printed_size(items) + count * len(separator)


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= 9 else 10 ** 9


_PERCENT_FIELD = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|[0-9]+)?(?:\.(\*|[0-9]+))?[hlL]?(.)", re.DOTALL)


def _percent_size(form: str, values) -> int:
    """At most what form % values makes: each field's value as printed, and its width and precision."""
    budget, size, position = _budget(), len(form), 0
    positional = list(values) if isinstance(values, tuple) else [values]

    def next_value():
        nonlocal position
        position += 1
        return positional[position - 1] if position <= len(positional) else None

    for key, width, precision, kind in _PERCENT_FIELD.findall(form):
        if kind == "%":
            continue
        for number in (width, precision):
            if number == "*":
                star = next_value()
                size += abs(star) if isinstance(star, int) else 0
            elif number:
                size += _number(number)
        value = (values.get(key) if isinstance(values, Mapping) else None) if key else next_value()
        size += budget.printed_size(value)
    return size


_FORMATTER = string.Formatter()


def _format_size(form: str, args: Sequence, kwargs: Mapping) -> int:
    """At most what form.format(*args, **kwargs) makes: each field's value as printed (fields may name one value
    many times), and the numbers in its spec, where a nested field counts as the largest integer argument."""
    budget, size, automatic = _budget(), len(form), 0
    largest = max((abs(v) for v in (*args, *kwargs.values()) if isinstance(v, int)), default=0)
    for _, field, spec, _ in _FORMATTER.parse(form):
        if field is None:
            continue
        name = re.match(r"[^.\[]*", field)[0]
        if not name:
            key, automatic = automatic, automatic + 1
        else:
            key = int(name) if name.isdigit() else name
        value = (args[key] if key < len(args) else None) if isinstance(key, int) else kwargs.get(key)
        size += budget.printed_size(value) + sum(_number(n) for n in re.findall("[0-9]+", spec))
        for _, nested, _, _ in _FORMATTER.parse(spec):
            if nested is not None:
                size += largest
                automatic += nested == ""
    return size


def _json_size(value, indent, separators) -> int:
    """At most what json.dumps makes of value, escapes aside (they at most multiply it by six, and it is checked
    once made): its printed size, and each item's separators and, with an indent, a new line indented to its
    depth."""
    width = len(indent) if isinstance(indent, str) else max(indent or 0, 0)
    item_separator, key_separator = separators if separators is not None else (", ", ": ")
    per_item = len(item_separator) + len(key_separator) + (indent is not None)
    size, pending = _budget().printed_size(value), [(value, 1)]
    while pending and size <= MAX_RENDERED_CHARS:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, (list, tuple)) else ()
        for child in children:
            size += per_item + depth * width
            pending.append((child, depth + 1))
    return size


_WRAP_POINTS = re.compile(r"[\s-]+")


def _wrapped_size(text: str, width: int, wrapstring: str) -> int:
    """At most what wordwrap makes: a line break at every run of spaces or hyphens, and every `width` characters."""
    breaks = sum(1 for _ in _WRAP_POINTS.finditer(text)) + len(text) // max(width, 1) + 1
    return len(text) + breaks * len(wrapstring)


_STR_METHOD_SIZES = {
    "center": lambda text, width, fillchar=" ": max(len(text), width),
    "ljust": lambda text, width, fillchar=" ": max(len(text), width),
    "rjust": lambda text, width, fillchar=" ": max(len(text), width),
    "zfill": lambda text, width: max(len(text), width),
    "expandtabs": lambda text, tabsize=8: len(text) + text.count("\t") * max(tabsize, 0),
    "replace": lambda text, old, new, count=-1: _replaced_size(text, old, new, count),
    "translate": _translated_size,
    "join": lambda text, iterable: _joined_size(iterable, text),
    "format": lambda text, *args, **kwargs: _format_size(text, args, kwargs),
    "format_map": lambda text, mapping: _format_size(text, (), mapping),
}
_FILTER_SIZES = {
    "center": lambda value, width=80: max(_budget().printed_size(value), width),
    "indent": lambda s, width=4, first=False, blank=False: len(str(s)) + (str(s).count("\n") + 1) * (
        len(width) if isinstance(width, str) else width),
    "replace": lambda s, old, new, count=None: _replaced_size(str(s), str(old), str(new), count),
    "format": lambda value, *args, **kwargs: _percent_size(str(value), kwargs or args),
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True: _wrapped_size(
        str(s), width, wrapstring or "\n"),
    "join": lambda value, d="", attribute=None: _joined_size(value, str(d)),
    "tojson": lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: _json_size(
        value, indent, separators),
    "batch": lambda value, linecount, fill_with=None: linecount,
    "slice": lambda value, slices, fill_with=None: slices,
}


def _call_size(function, args: tuple, kwargs: dict) -> int:
    """What a call of a str method will make (_STR_METHOD_SIZES; str.format as the sandbox wraps it), else 0."""
    method = getattr(function, "__wrapped__", function)
    text = getattr(method, "__self__", None)
    size = _STR_METHOD_SIZES.get(getattr(method, "__name__", "")) if isinstance(text, str) else None
    return 0 if size is None else size(text, *args, **kwargs)


def _bounded_filter(name: str, function):
    """The filter as a step of the render: its arguments checked, what it makes sized first (_FILTER_SIZES) and
    counted as made. A lazy result is taken into a list at once, so that whatever uses it next can size it."""
    size = _FILTER_SIZES.get(name)
    passed = getattr(function, "jinja_pass_arg", None) is not None  # jinja passes the context (or ...) first

    @functools.wraps(function)  # keeps that mark
    def bounded(*args, **kwargs):
        budget = _budget()
        budget.step()
        for value in (*args[passed:], *kwargs.values()):
            budget.check(value)
        if size is not None:
            budget.expect(size(*args[passed:], **kwargs))
        result = function(*args, **kwargs)
        return budget.made(list(result) if isinstance(result, Iterator) else result)

    return bounded


def _stepping(test):
    @functools.wraps(test)
    def stepping(*args, **kwargs):
        _budget().step()
        return test(*args, **kwargs)

    return stepping


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, but every for loop takes its items through _iterated (a step each), and the ~
    operator joins through the environment's concat, which checks what it joins."""

    def visit_Template(self, node, frame=None):
        for loop in node.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Call(jinja2.nodes.ImportedName(f"{__name__}._iterated"), [loop.iter], [], None,
                                          None)
        super().visit_Template(node, frame)

    def visit_Concat(self, node, frame):
        self.write("environment.concat((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' environment (module notes), bounded: every hook of the sandbox (calls, operators, lookups,
    output) and every filter, test and loop item is a step of the render's budget, and checks the values that pass
    through it. Templates make text: `encode` and `to_bytes`, whose bytes no check sizes, are out of reach."""

    intercepted_binops = frozenset(ImmutableSandboxedEnvironment.default_binop_table)
    code_generator_class = _BoundedCodeGenerator

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self._output,
                         extensions=[jinja2.ext.loopcontrols, _GenerationBlocks])
        del self.filters["pprint"], self.globals["lipsum"]
        self.filters = {name: _bounded_filter(name, f) for name, f in {**self.filters, "tojson": _tojson}.items()}
        self.tests = {name: _stepping(test) for name, test in self.tests.items()}
        self.globals.update(range=_range, namespace=_BoundedNamespace, raise_exception=_raise_exception,
                            strftime_now=_strftime_now)

    def is_safe_attribute(self, obj, attr, value) -> bool:
        return attr not in ("encode", "to_bytes") and super().is_safe_attribute(obj, attr, value)

    def call(self, context, function, /, *args, **kwargs):  # positional: any name is free for a template's kwargs
        budget = _budget()
        budget.step()
        for value in (*args, *kwargs.values()):
            budget.check(value)
        budget.expect(_call_size(function, args, kwargs))
        return budget.made(super().call(context, function, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        budget.step()
        budget.expect(_binop_size(operator, left, right))
        return budget.made(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        _budget().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        budget = _budget()
        budget.step()
        value = super().getitem(obj, argument)
        return budget.made(value) if isinstance(argument, slice) else value

    def concat(self, parts) -> str:
        """A template's pieces joined (its ~ operator, a macro's or a block's output), each checked first."""
        budget, texts, size = _budget(), [], 0
        for part in parts:
            budget.check(part)
            text = part if isinstance(part, str) else str(part)
            size += len(text)
            budget.expect(size)
            texts.append(text)
        return budget.made("".join(texts))

    def _output(self, value):
        """Each {{ ... }}'s value, checked before it is printed."""
        budget = _budget()
        budget.step()
        budget.check(value)
        return value


def _binop_size(operator: str, left, right) -> int:
    """What left <operator> right will make, before it is made: repetition's, and %-formatting's; a product or a
    power of integers past MAX_INT_BITS is refused."""
    if operator == "*" and isinstance(left, int) and not isinstance(right, int):
        left, right = right, left
    if operator == "*" and isinstance(right, int):
        if isinstance(left, int):
            _check_bits(left.bit_length() + right.bit_length())
        elif isinstance(left, (str, list, tuple)):
            return _budget().printed_size(left) * max(right, 0)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        _check_bits(left.bit_length() * right)
    elif operator == "%" and isinstance(left, str):
        return _percent_size(left, right)
    return 0


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise exceeded(f"makes an integer of about {bits:,} bits, more than {MAX_INT_BITS:,}",
                        "MAX_INT_BITS")
