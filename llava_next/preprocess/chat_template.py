"""Chat templates: find a checkpoint's own Jinja template and render it exactly as transformers 5.x does.

Rendering uses the same environment as transformers: `jinja2.sandbox.ImmutableSandboxedEnvironment` with
`trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension, a `{% generation %}` tag that renders its
body, a `tojson` filter that does not escape HTML, `raise_exception`, `strftime_now`, and `dict` / `namespace`
globals that cannot reach Python internals. One deliberate difference: reaching an unsafe attribute
(`__class__`, `__globals__`, ...) raises, where transformers renders it as an empty string. Everything a template sees is first rebuilt from plain JSON types
(images and arrays become inert placeholders such as "<Image>"), so a template can only read data. A template
that fails, or tries to leave the sandbox (`__class__`, ...), raises `ChatTemplateError` (a ValueError).

Cost limits, per render, also `ChatTemplateError`: `MAX_TEMPLATE_STEPS` loop iterations and calls (all loops and
macros together), `MAX_TEMPLATE_TEXT` characters (or items) for a `*` repetition, a call's result, a namespace
value and the rendered output, and `MAX_TEMPLATE_INT_BITS` for `*` / `**` on integers. Real chat templates are
orders of magnitude below these. Filters and str methods that build a large value from small arguments
(`center`, `indent`, `format`, `%`, `batch`, `slice`, `replace`, `ljust`/`rjust`/`zfill`, `expandtabs`,
`lipsum`) are checked against `MAX_TEMPLATE_TEXT` from their arguments, before they allocate; `range` is
jinja's sandboxed one (at most 100,000 items).

Where a template lives, in transformers' order: chat_template.json (legacy processor file), else
chat_template.jinja plus additional_chat_templates/*.jinja (and the older chat_templates/*.jinja), else the tokenizer's chat_template.jinja or the
"chat_template" key of tokenizer_config.json (a string, or a list of {"name", "template"}).

`{% generation %}` bodies are tracked for `return_assistant_tokens_mask` (preprocess/assistant_mask.py).
Leaves out: tools given as
Python functions (pass JSON schemas), and control-token sanitizing (`sanitize_control_tokens`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.runtime
import jinja2.utils
import numpy as np
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llava_next.errors import ChatTemplateError
from llava_next.loading.hub import read_json

# Where transformers 5.x writes named (non-default) templates; `chat_templates/` is read too (older saves).
CHAT_TEMPLATE_DIR = "additional_chat_templates"
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
MAX_TEMPLATE_STEPS = 250_000
MAX_TEMPLATE_TEXT = 10_000_000
MAX_TEMPLATE_INT_BITS = 100_000


# ---------------------------------------------------------------------- finding the template

def load_chat_template(folder: str | os.PathLike, processor_json: bool = True) -> str | dict[str, str] | None:
    """The checkpoint's template: one string, a {name: template} dict when there are several, or None.

    Named templates come from `additional_chat_templates/*.jinja` (transformers 5.x) and `chat_templates/*.jinja`.
    `processor_json=False` skips the processor's legacy chat_template.json (what a tokenizer reads).
    """
    folder = Path(folder)
    legacy = folder / "chat_template.json"
    if processor_json and legacy.is_file():
        return _read_json(legacy).get("chat_template")
    templates = {}
    for sub in ("chat_templates", CHAT_TEMPLATE_DIR):  # the newer folder wins a name clash
        templates.update({p.stem: p.read_text(encoding="utf-8") for p in sorted((folder / sub).glob("*.jinja"))})
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not templates and (folder / "tokenizer_config.json").is_file():
        value = _read_json(folder / "tokenizer_config.json").get("chat_template")
        if isinstance(value, list):
            templates = {item["name"]: item["template"] for item in value}
        elif isinstance(value, str):
            templates = {"default": value}
    if not templates:
        return None
    return templates["default"] if list(templates) == ["default"] else templates


def resolve_chat_template(templates: str | Mapping[str, str] | None, chat_template: str | None = None) -> str:
    """Pick the template to render: an explicit template string or name, else the default one."""
    if chat_template is not None:
        if isinstance(templates, Mapping) and chat_template in templates:
            return templates[chat_template]
        return chat_template
    if isinstance(templates, Mapping):
        if "default" in templates:
            return templates["default"]
        raise ChatTemplateError(
            f"this checkpoint has several chat templates and none is named 'default'; pass chat_template= one of {sorted(templates)}"
        )
    if templates is None:
        raise ChatTemplateError("this checkpoint has no chat template; pass chat_template= a Jinja template string")
    return templates


# ---------------------------------------------------------------------- the sandboxed environment

# `return_assistant_tokens_mask`: with this template variable set, `{% generation %}` bodies are wrapped in two
# private-use characters, which preprocess/assistant_mask.py turns into character spans and removes.
TRACK_GENERATION, GENERATION_START, GENERATION_END = "_llava_next_track_generation", "\ue000", "\ue001"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers uses it to mark assistant text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    @jinja2.pass_context
    def _render(self, context, caller):
        body = caller()
        if context.get(TRACK_GENERATION):  # preprocess/assistant_mask.py finds the spans by these marks
            return GENERATION_START + body + GENERATION_END
        return body


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        if isinstance(value, (str, list, tuple)):
            _check_size(len(value), "a namespace value")
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _check_size(length: int, what: str) -> None:
    if length > MAX_TEMPLATE_TEXT:
        raise ChatTemplateError(f"the chat template built {what} of {length:,} characters or items, over the "
                                f"limit of {MAX_TEMPLATE_TEXT:,}")


def _take_steps(eval_ctx, count: int = 1) -> None:
    """Charge loop iterations or calls to this render (its EvalContext) and stop it past MAX_TEMPLATE_STEPS."""
    eval_ctx.llava_steps = getattr(eval_ctx, "llava_steps", 0) + count
    if eval_ctx.llava_steps > MAX_TEMPLATE_STEPS:
        raise ChatTemplateError(f"the chat template ran more than {MAX_TEMPLATE_STEPS:,} loop iterations and calls")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
_NESTED_BRACE_SPEC = re.compile(r"\{[^{}]*:[^{}]*\{")


def _check_width(width, what: str) -> None:
    """A width, count or padding argument, refused before anything of that size is built."""
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        return  # the callee raises its own TypeError
    if width > MAX_TEMPLATE_TEXT:
        raise ChatTemplateError(f"the chat template asked for {what} of {width:,}, over the limit of "
                                f"{MAX_TEMPLATE_TEXT:,}")


def _check_format(fmt, args) -> None:
    """printf-style (`%`, |format) and str.format() strings: widths and precisions, written or taken from `*` /
    nested `{}` arguments, over the size limit are refused before the string is formatted."""
    if not isinstance(fmt, str):
        return
    star = False
    for match in _PERCENT_SPEC.finditer(fmt):
        for group in match.groups():
            if group == "*":
                star = True
            elif group:
                _check_width(int(group), "a format width")
    for match in _BRACE_SPEC.finditer(fmt):
        for digits in re.findall(r"\d+", match.group(1)):
            _check_width(int(digits), "a format width")
    if star or _NESTED_BRACE_SPEC.search(fmt):
        for value in args:
            _check_width(value, "a format width")


def _precheck_call(func, args, kwargs) -> None:
    """Size checks of str methods that build big strings from small arguments (center, ljust, rjust, zfill,
    expandtabs, replace, format), before they run."""
    if isinstance(func, jinja2.runtime.Macro):  # the common case, kept cheap (recursive macros call a lot)
        return
    target = getattr(func, "__wrapped__", func)  # the sandbox wraps str.format
    receiver = getattr(target, "__self__", None)
    if not isinstance(receiver, str):
        return
    name = target.__name__
    first = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_width(first, f"a {name}() width")
    elif name == "expandtabs":
        _check_width((first if isinstance(first, int) else 8) * receiver.count("\t"), "expandtabs() padding")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = receiver.count(args[0]) if args[0] else len(receiver) + 1
        _check_size(len(receiver) + count * max(0, len(args[1]) - len(args[0])), "a replace() result")
    elif name in ("format", "format_map"):
        _check_format(receiver, [*args, *kwargs.values()] if name == "format" else list(first.values())
                      if isinstance(first, Mapping) else [])


def _bounded_filters(filters: dict) -> dict:
    """Jinja's filters that allocate by an argument (center, indent, format, batch, slice, replace), checked first."""
    center, indent, fmt, batch, slice_, replace = (filters[n] for n in ("center", "indent", "format", "batch",
                                                                         "slice", "replace"))

    def checked_center(value, width=80):
        _check_width(width, "a center width")
        return center(value, width)

    def checked_indent(s, width=4, *args, **kwargs):
        _check_width(width if isinstance(width, int) else len(str(width)), "an indent width")
        lines = str(s).count("\n") + 1
        _check_size(len(str(s)) + lines * (width if isinstance(width, int) else len(str(width))), "an indent result")
        return indent(s, width, *args, **kwargs)

    def checked_format(value, *args, **kwargs):
        _check_format(value, [*args, *kwargs.values()])
        return fmt(value, *args, **kwargs)

    def checked_batch(value, linecount, *args, **kwargs):
        _check_width(linecount, "a batch size")
        return batch(value, linecount, *args, **kwargs)

    def checked_slice(value, slices, *args, **kwargs):
        _check_width(slices, "a slice count")
        return slice_(value, slices, *args, **kwargs)

    def checked_replace(eval_ctx, s, old, new, count=None):
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            n = s.count(old) if old else len(s) + 1
            _check_size(len(s) + n * max(0, len(new) - len(old)), "a replace result")
        return replace(eval_ctx, s, old, new, count)

    checked_replace = jinja2.pass_eval_context(checked_replace)
    return dict(center=checked_center, indent=checked_indent, format=checked_format, batch=checked_batch,
                slice=checked_slice, replace=checked_replace)


def _bounded_lipsum(lipsum):
    def checked_lipsum(n=5, *args, **kwargs):
        _check_width(n * 1000, "lorem ipsum text")
        return lipsum(n, *args, **kwargs)
    return checked_lipsum


@jinja2.pass_eval_context
def _loop_budget(eval_ctx, iterable):
    """Every `{% for %}` iterates through this filter (see _BudgetCodeGenerator), one step per item."""
    for item in iterable:
        _take_steps(eval_ctx)
        yield item


class _BudgetCodeGenerator(CodeGenerator):
    """Compiles each `{% for x in items %}` as `{% for x in items|_loop_budget %}`."""

    def visit_Template(self, node, frame=None):
        for loop in list(node.find_all(jinja2.nodes.For)):
            loop.iter = jinja2.nodes.Filter(loop.iter, "_loop_budget", [], [], None, None, lineno=loop.lineno)
        super().visit_Template(node, frame)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja2's own tojson, this does not HTML-escape (matches transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, except that reaching an unsafe attribute (`__class__`, `__globals__`, ...) raises at
    once instead of rendering as an empty string; templates that stay inside the sandbox render identically."""

    code_generator_class = _BudgetCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%"})

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context, operator, left, right):
        """`*` and `**`, refused before computing a result over the size limits."""
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * n, "a repetition")
            if ints and left.bit_length() + right.bit_length() > MAX_TEMPLATE_INT_BITS:
                raise ChatTemplateError(f"the chat template multiplied integers past {MAX_TEMPLATE_INT_BITS:,} bits")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else
                          list(right.values()) if isinstance(right, Mapping) else [right])
        elif operator == "**" and ints and abs(left) > 1 and right * left.bit_length() > MAX_TEMPLATE_INT_BITS:
            raise ChatTemplateError(f"the chat template raised an integer past {MAX_TEMPLATE_INT_BITS:,} bits")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        """A sandboxed call (function, method or macro) that costs one step; its text result is size-checked."""
        _take_steps(__context.eval_ctx)
        _precheck_call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            _check_size(len(result), "a value")
        return result


@lru_cache(maxsize=64)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per template string; a syntax error becomes a ChatTemplateError."""
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters.update(_bounded_filters(env.filters))
    env.globals["lipsum"] = _bounded_lipsum(env.globals["lipsum"])
    env.filters["tojson"] = _tojson
    env.filters["_loop_budget"] = _loop_budget
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        with warnings.catch_warnings():
            # NOTE: llava-v1.6-mistral's template writes '<\s>', an invalid escape Python warns about; harmless
            warnings.simplefilter("ignore", DeprecationWarning)
            return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc


@lru_cache(maxsize=64)
def template_variables(template: str) -> frozenset[str]:
    """Names a template reads that it does not define itself (messages, add_generation_prompt, bos_token, ...)."""
    env = compile_template(template).environment
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))


# ---------------------------------------------------------------------- what the template may see

def plain_data(value: Any) -> Any:
    """Rebuild `value` from JSON types only; anything else becomes a placeholder like "<Image>" (as transformers)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # (bool has no subclasses: exact bools returned above)
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# ---------------------------------------------------------------------- rendering

def render_chat_template(
    conversations: list[list[dict]],
    template: str,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **template_kwargs,
) -> list[str]:
    """Render each conversation with `template`; extra keyword arguments become template variables."""
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot be used together")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ChatTemplateError("tools must be JSON schemas (dicts); Python functions are not converted")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise ChatTemplateError("documents must be dicts with 'title' and 'text' keys")
    compiled = compile_template(template)
    tools, documents, template_kwargs = plain_data(tools), plain_data(documents), plain_data(template_kwargs)
    rendered = []
    for chat in conversations:
        chat = plain_data(list(chat))
        if not all(isinstance(message, dict) for message in chat):
            raise ChatTemplateError(f"chat messages must be dicts with 'role' and 'content', got {chat!r}")
        chat = _alias_reasoning(chat)
        final = None
        if continue_final_message:
            chat, final = _tag_final_message(chat, template, continue_final_message)
        try:
            pieces, size = [], 0
            for piece in compiled.generate(messages=chat, tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **template_kwargs):
                size += len(piece)
                _check_size(size, "an output")
                pieces.append(piece)
            text = "".join(pieces)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"the chat template tried to leave its sandbox: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError,
                MemoryError) as exc:  # ArithmeticError: OverflowError, jinja's range() cap among them
            raise ChatTemplateError(f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from exc
        if final is not None:
            text = _cut_at_final_message(text, final)
        rendered.append(text)
    return rendered


def _tag_final_message(chat: list[dict], template: str, field: bool | str) -> tuple[list[dict], str]:
    """Append a marker to the last message's text so the rendered prompt can be cut right after it."""
    if not chat:
        raise ChatTemplateError("continue_final_message is set but the conversation is empty")
    field = field if isinstance(field, str) else "content"
    final = chat[-1].get(field)
    if final is None:
        raise ChatTemplateError(f'continue_final_message is set but the final message has no "{field}"')
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise ChatTemplateError(f'continue_final_message is set to "{field}" but the template never reads it')
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                break
        else:
            raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")
    else:
        for f in fields:
            chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return chat, final


def _cut_at_final_message(text: str, final: str) -> str:
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ChatTemplateError("continue_final_message is set but the template dropped part of the final message")
    at = text.rindex(_CONTINUE_TAG.strip())
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()


def _read_json(path: Path) -> dict:
    try:
        return read_json(path)
    except ValueError as exc:  # a broken template file is a template error
        raise ChatTemplateError(str(exc)) from exc


__all__ = [
    "load_chat_template", "resolve_chat_template", "compile_template", "template_variables",
    "render_chat_template", "plain_data",
]
