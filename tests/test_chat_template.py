"""llava_next.chat_template: byte-identical rendering with transformers 5.23, template discovery, the sandbox."""

import base64
import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from chat_templates import CHAT_TEMPLATES, FAMILIES, MULTILINE_TEMPLATE
from processor_fixtures import make_processor_folder, reference_processor, shared_processor_folder
from llava_next.preprocess.chat_template import load_chat_template, render_chat_template
from llava_next.errors import ChatTemplateError
from llava_next.preprocess.processor import LlavaNextProcessor

SYSTEM = {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]}
USER_IMAGE = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}
ASSISTANT = {"role": "assistant", "content": [{"type": "text", "text": "A cat on a sofa."}]}
USER_TEXT = {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}
CONVERSATIONS = {
    "single_turn": [USER_IMAGE],
    "multi_image": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"}, {"type": "image"},
        {"type": "image"}]}],
    "multi_turn": [USER_IMAGE, ASSISTANT, USER_TEXT],
    "system": [SYSTEM, USER_IMAGE, ASSISTANT, USER_TEXT],
    "text_only": [USER_TEXT],
    "string_content": [{"role": "user", "content": "Plain string content."}],
    "unicode": [{"role": "user", "content": [{"type": "text", "text": "Ünïcödé 中文 🙂 <b>&amp;</b> \"quotes\"\n  spaces  "}]}],
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    folder = shared_processor_folder(request.param)
    return LlavaNextProcessor.from_pretrained(folder), reference_processor(folder), request.param


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_rendering_matches_transformers(pair, name):
    ours, ref, family = pair
    conversation = CONVERSATIONS[name]
    for add_generation_prompt in (False, True):
        expected = ref.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        got = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        assert got.encode("utf-8") == expected.encode("utf-8"), (family, name, add_generation_prompt)


def test_batched_and_continue_final_message_match_transformers(pair):
    ours, ref, family = pair
    batch = [CONVERSATIONS["single_turn"], CONVERSATIONS["multi_turn"]]
    assert ours.apply_chat_template(batch, add_generation_prompt=True) == ref.apply_chat_template(batch, add_generation_prompt=True)
    partial = [USER_IMAGE, {"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]
    expected = ref.apply_chat_template(partial, continue_final_message=True)
    assert ours.apply_chat_template(partial, continue_final_message=True) == expected
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(partial, continue_final_message=True, add_generation_prompt=True)


def _jinja_flags_matter(conversation, add_generation_prompt):
    """The multi-line template renders differently with trim_blocks or lstrip_blocks off (plain jinja2), so the
    byte comparisons below do check both flags."""
    import jinja2

    def render(**flags):
        return jinja2.Environment(**flags).from_string(MULTILINE_TEMPLATE).render(
            messages=conversation, add_generation_prompt=add_generation_prompt)

    both = render(trim_blocks=True, lstrip_blocks=True)
    assert render(trim_blocks=False, lstrip_blocks=True) != both
    assert render(trim_blocks=True, lstrip_blocks=False) != both


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if n != "string_content"])
def test_multiline_template_matches_transformers(name):
    """Block tags on their own lines, indented, with and without `{%-`/`-%}`: whitespace control
    (trim_blocks, lstrip_blocks) must be transformers' to the byte, passed as chat_template=."""
    folder = shared_processor_folder("vicuna")
    ours, ref = LlavaNextProcessor.from_pretrained(folder), reference_processor(folder)
    conversation = CONVERSATIONS[name]
    for add_generation_prompt in (False, True):
        _jinja_flags_matter(conversation, add_generation_prompt)
        expected = ref.apply_chat_template(conversation, chat_template=MULTILINE_TEMPLATE,
                                           add_generation_prompt=add_generation_prompt)
        got = ours.apply_chat_template(conversation, chat_template=MULTILINE_TEMPLATE,
                                       add_generation_prompt=add_generation_prompt)
        assert got.encode("utf-8") == expected.encode("utf-8"), (name, add_generation_prompt)


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_multiline_template_from_files_matches_transformers(tmp_path, layout):
    """The same template read from the folder (chat_template.json, or the chat_template.jinja transformers
    writes), rendered for a batch, must be byte-identical too."""
    folder = make_processor_folder(tmp_path, "mistral", layout, chat_template=MULTILINE_TEMPLATE)
    ours, ref = LlavaNextProcessor.from_pretrained(folder), reference_processor(folder)
    assert ours.chat_template == ref.chat_template == MULTILINE_TEMPLATE
    batch = [CONVERSATIONS["system"], CONVERSATIONS["multi_image"], CONVERSATIONS["unicode"]]
    expected = ref.apply_chat_template(batch, add_generation_prompt=True)
    assert [t.encode("utf-8") for t in ours.apply_chat_template(batch, add_generation_prompt=True)] == \
        [t.encode("utf-8") for t in expected]
    assert render_chat_template(batch, MULTILINE_TEMPLATE, add_generation_prompt=True) == expected


def test_known_renderings():
    """Spot checks of FACTS.md's description, independent of transformers."""
    def render(family, conversation, **kw):
        return render_chat_template([conversation], CHAT_TEMPLATES[family], **kw)[0]

    assert render("mistral", [USER_IMAGE]) == "[INST] <image>\nWhat is shown in this image? [/INST]"
    assert render("mistral", [USER_IMAGE, ASSISTANT]).endswith("[/INST] A cat on a sofa.<\\s> ")
    assert render("mistral-fixed", [USER_IMAGE, ASSISTANT]).endswith("[/INST] A cat on a sofa.</s> ")
    assert render("vicuna", [USER_IMAGE], add_generation_prompt=True) == "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    assert render("34b", [USER_IMAGE], add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\nWhat is shown in this image?<|im_end|>\n<|im_start|>assistant\n")
    assert render("llama3", [USER_IMAGE], add_generation_prompt=True) == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown in this image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render("72b", [USER_IMAGE]) == "<|im_start|>user\n<image>\nWhat is shown in this image?<|im_end|>\n"


def test_tokenize_with_images_in_messages_matches_transformers(tmp_path):
    ours = LlavaNextProcessor.from_pretrained(shared_processor_folder("mistral"))
    ref = reference_processor(shared_processor_folder("mistral"))
    rng = np.random.default_rng(1)
    pil = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (700, 200, 3), dtype=np.uint8)).save(path)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 900, 3), dtype=np.uint8)).save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": pil}, {"type": "image", "path": str(path)}, {"type": "image", "base64": b64},
        {"type": "text", "text": "Describe the three images."}]}]
    kwargs = {"add_generation_prompt": False, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    a, b = ours.apply_chat_template(conversation, **kwargs), ref.apply_chat_template(conversation, **kwargs)
    assert list(a.keys()) == list(b.keys()) == ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
    for key in ("input_ids", "attention_mask", "image_sizes"):
        assert torch.equal(a[key], b[key]), key
    assert torch.allclose(a["pixel_values"], b["pixel_values"])
    ids = ours.apply_chat_template(conversation, tokenize=True)
    assert ids == ref.apply_chat_template(conversation, tokenize=True)
    # a batch of conversations, padded; a kwarg the template does not read goes to the processor
    batch = [conversation, [{"role": "user", "content": [{"type": "text", "text": "No image here."}]}]]
    a = ours.apply_chat_template(batch, tokenize=True, return_dict=True, padding=True, return_tensors="pt")
    b = ref.apply_chat_template(batch, tokenize=True, return_dict=True, processor_kwargs={"padding": True}, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])


def test_template_files_are_found(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    assert load_chat_template(tmp_path) == template
    (tmp_path / "chat_templates").mkdir()
    (tmp_path / "chat_templates" / "tools.jinja").write_text("T")
    assert load_chat_template(tmp_path) == {"default": template, "tools": "T"}
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "legacy"}))
    assert load_chat_template(tmp_path) == "legacy"  # transformers reads the legacy processor file first
    other = tmp_path / "tok"
    other.mkdir()
    assert load_chat_template(other) is None
    (other / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer"}))
    assert load_chat_template(other) == "from tokenizer"
    (other / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "D"}, {"name": "rag", "template": "R"}]}))
    assert load_chat_template(other) == {"default": "D", "rag": "R"}


def test_named_templates_and_missing_template(tmp_path):
    folder = make_processor_folder(tmp_path, "vicuna", layout="hub")
    (folder / "chat_template.json").unlink()
    processor = LlavaNextProcessor.from_pretrained(folder)
    assert processor.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        processor.apply_chat_template(CONVERSATIONS["single_turn"])
    processor.chat_template = {"default": CHAT_TEMPLATES["vicuna"], "short": "{{ messages | length }}"}
    assert processor.apply_chat_template(CONVERSATIONS["multi_turn"], chat_template="short") == "3"
    assert processor.apply_chat_template(CONVERSATIONS["single_turn"]).startswith("USER: <image>")
    assert processor.apply_chat_template(CONVERSATIONS["single_turn"], chat_template="{{ bos_token }}x") == "<s>x"


@pytest.mark.parametrize("template", [
    "{{ messages.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages[0].__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{% set ns = namespace(_secret=1) %}",
    "{% set x = messages.append(1) %}",
    "{{ cycler.__init__.__globals__.os }}",
])
def test_sandbox_escapes_raise(template):
    with pytest.raises(ChatTemplateError):
        render_chat_template([CONVERSATIONS["text_only"]], template)


def test_environment_matches_transformers():
    ref = reference_processor(shared_processor_folder("vicuna"))
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}\n"
        "{% generation %}{{ m['role'] }}{% endgeneration %}{% endfor %}{{ {'a': '<&>'} | tojson(indent=2) }}"
        "{% set d = dict(x=1) %}{{ d.x }}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }}{{ bos_token }}{{ eos_token }}{{ pad_token }}{{ custom | default('none') }}"
        "{{ messages[0]['content'][0]['image'] }}{{ strftime_now('%Y') | length }}"
    )
    conversation = [{"role": "user", "content": [{"image": Image.new("RGB", (4, 4)), "type": "image"}]}, *CONVERSATIONS["multi_turn"]]
    expected = ref.apply_chat_template(conversation, chat_template=template, custom="<x>")
    ours = LlavaNextProcessor.from_pretrained(shared_processor_folder("vicuna"))
    assert ours.apply_chat_template(conversation, chat_template=template, custom="<x>") == expected
    assert "<Image>" in expected and '"<&>"' in expected
    with pytest.raises(ChatTemplateError, match="boom"):
        render_chat_template([CONVERSATIONS["text_only"]], "{{ raise_exception('boom') }}")
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat_template([CONVERSATIONS["text_only"]], "{% for %}")


def test_bad_conversations():
    with pytest.raises(ChatTemplateError):
        render_chat_template([[1, 2]], CHAT_TEMPLATES["vicuna"])
    processor = LlavaNextProcessor.from_pretrained(shared_processor_folder("mistral"))
    with pytest.raises(ChatTemplateError):
        processor.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="Only user and assistant"):
        processor.apply_chat_template([{"role": "tool", "content": [{"type": "text", "text": "x"}]}])


@pytest.mark.parametrize("template, match", [
    ("{{ 'a' * 10**9 }}", "repetition"),
    ("{{ [1, 2] * 10**8 }}", "repetition"),
    ("{{ 7 ** (10**7) }}", "bits"),
    ("{{ (10**50000) * (10**50000) }}", "bits"),
    ("{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}x", "loop iterations"),
    ("{% set r = range(2000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}", "calls"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "namespace"),
    ("{% macro d(n) %}{% if n %}{% set x = d(n - 1) %}{{ x }}{{ x }}{% else %}a{% endif %}{% endmacro %}{{ d(40) }}",
     "a value"),
    ("{% for i in range(100000) %}{{ 'a' * 200 }}{% endfor %}", "output"),
    ("{{ range(10**9) | length }}", "Range too big"),
])
def test_costly_templates_are_stopped_early(template, match):
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template([[{"role": "user", "content": "hi"}]], template)
    assert time.perf_counter() - start < 3
    assert render_chat_template([[{"role": "user", "content": "hi"}]], "{{ messages[0].content * 3 }}") == ["hihihi"]
