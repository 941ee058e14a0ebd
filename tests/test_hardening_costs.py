"""Chat-template cost bounds (issue 15, item 4): filters and methods that allocate by an argument are refused fast.

Each template would build hundreds of MB (or run for long) if rendered; each must fail with ChatTemplateError in
well under a second, with no large allocation (tracemalloc peak). Leaves out: num_beams caps (compat/generate_args.py).
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

from llava_next.errors import ChatTemplateError
from llava_next.preprocess.chat_template import render_chat_template

COSTLY = [
    "{{ 'a'|center(300000000) }}",
    "{{ 'a'|center(3e8) }}",
    "{{ ' ' * 10**9 }}",
    "{{ range(10**9)|list|length }}",
    "{{ '%0300000000d'|format(1) }}",
    "{{ '%*d'|format(300000000, 1) }}",
    "{{ '%0300000000d' % 1 }}",
    "{{ '%*d' % (300000000, 1) }}",
    "{{ '{:>300000000}'.format(1) }}",
    "{{ '{:>{w}}'.format(1, w=300000000) }}",
    "{{ 'a'.ljust(300000000) }}",
    "{{ 'a'.rjust(300000000) }}",
    "{{ 'a'.zfill(300000000) }}",
    "{{ 'a'.center(300000000) }}",
    "{{ 'a\nb'|indent(300000000) }}",
    "{{ [1]|batch(300000000, 0)|list }}",
    "{{ [1]|slice(300000000)|list }}",
    "{{ lipsum(n=1000000) }}",
    "{% set s = 'a' * 5000000 %}{{ s|replace('a', 'bbbbbbbbbb') }}",
    "{% set s = 'a' * 5000000 %}{{ s.replace('a', 'bbbbbbbbbb') }}",
    "{% set s = '\t' * 1000000 %}{{ s.expandtabs(100) }}",
]


@pytest.mark.parametrize("template", COSTLY)
def test_costly_template_is_refused_fast_without_allocating(template):
    chat = [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ChatTemplateError):
            render_chat_template(chat, template)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 200_000_000  # the refused values are 300 MB and more; the 5 MB inputs are allowed


@pytest.mark.parametrize("template,expected", [
    ("{{ 'ab'|center(6) }}", "  ab  "), ("{{ '%05d'|format(42) }}", "00042"), ("{{ '%-4s|' % 'a' }}", "a   |"),
    ("{{ '{:>4}'.format(7) }}", "   7"), ("{{ 'x'|indent(2, true) }}", "  x"), ("{{ 'a-b'|replace('-', '+') }}", "a+b"),
    ("{{ [1, 2, 3]|batch(2)|list }}", "[[1, 2], [3]]"), ("{{ 'A'.ljust(3) }}|", "A  |"),
    ("{{ 'order %d of %d' % (1, 12345678901) }}", "order 1 of 12345678901"),
])
def test_ordinary_uses_still_render(template, expected):
    chat = [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]]
    assert render_chat_template(chat, template)[0] == expected
