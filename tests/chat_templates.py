"""Chat templates of the llava-hf LLaVA-NeXT checkpoints, as test data (family -> Jinja template string).

Provenance (the hub itself is not reachable from here; see the report / FACTS.md):
- "mistral", "vicuna": verbatim. Both strings are listed as the exact `chat_template.json` contents of
  llava-v1.6-mistral-7b-hf and llava-v1.6-vicuna (and llava-1.5) in openvinotoolkit/openvino.genai's tokenizer
  (src/cpp/src/tokenizer.cpp, `chat_template_fallback_map`, matched by string equality), and identically in
  its Python tests. The mistral file really writes `<\\s>` (a typo for `</s>`); "mistral-fixed" is the later
  revision with `</s>`, from the same Python test list ("llava-next").
- "llama3": verbatim as several independent projects copy llama3-llava-next-8b-hf's template (e.g. a
  `chat_templates["LlavaNextForConditionalGeneration"]["LlamaForCausalLM"]` table written to chat_template.jinja).
- "34b", "72b": NOT found verbatim in the searchable sources. Written to FACTS.md's description in the style
  of the llava-hf templates above (chatml; 34b puts `<image>\\n` per image, 72b/110b `<image>` then `\\n{text}`).
  "110b" is the same template as "72b".
"""

from llava_next.entrypoints.demo import MISTRAL_CHAT_TEMPLATE  # the demo checkpoint ships the same file

CHAT_TEMPLATES: dict[str, str] = {
    # llava-hf/llava-v1.6-mistral-7b-hf (chat_template.json); note the `<\s>` typo, kept on purpose
    "mistral": MISTRAL_CHAT_TEMPLATE,
    # the later revision of the same file, with `</s>`
    "mistral-fixed": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text']"
        " + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
        "message['content'][0]['text'] + '</s> '}}{% else %}{{ raise_exception('Only user and assistant roles are "
        "supported!') }}{% endif %}{% endfor %}"
    ),
    # llava-hf/llava-v1.6-vicuna-7b-hf and -13b-hf (chat_template.json)
    "vicuna": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
        "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
        "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # llava-hf/llava-v1.6-34b-hf (reconstructed from FACTS.md, see the module docstring)
    "34b": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # llava-hf/llama3-llava-next-8b-hf
    "llama3": (
        "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
        "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # llava-hf/llava-next-72b-hf and llava-next-110b-hf (reconstructed from FACTS.md, see the module docstring)
    "72b": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ '\n' + content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
CHAT_TEMPLATES["110b"] = CHAT_TEMPLATES["72b"]

# The six checkpoint families the tests cover, and the hub ids they stand for.
FAMILIES: dict[str, str] = {
    "mistral": "llava-hf/llava-v1.6-mistral-7b-hf",
    "vicuna": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "34b": "llava-hf/llava-v1.6-34b-hf",
    "llama3": "llava-hf/llama3-llava-next-8b-hf",
    "72b": "llava-hf/llava-next-72b-hf",
    "110b": "llava-hf/llava-next-110b-hf",
}

# Control tokens each template writes; the test fixtures add them as special tokens to the Mistral vocabulary.
CONTROL_TOKENS: dict[str, list[str]] = {
    "mistral": [],
    "mistral-fixed": [],
    "vicuna": [],
    "34b": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "72b": ["<|im_start|>", "<|im_end|>"],
    "110b": ["<|im_start|>", "<|im_end|>"],
}

# A multi-line template in the style of hand-written hub .jinja files: block tags on their own lines, indented,
# some with `{%-` / `-%}`. Its output depends on jinja2's trim_blocks (the newline after `%}`) and lstrip_blocks
# (the indentation before `{%`), which the one-line llava-hf templates above never exercise.
MULTILINE_TEMPLATE = """{#- A system prompt first, if any -#}
{% for message in messages %}
    {% if message['role'] == 'system' %}
<<SYS>>
{{ message['content'][0]['text'] }}
<</SYS>>

    {% elif message['role'] == 'user' %}
[INST]
        {% for content in message['content'] | selectattr('type', 'equalto', 'image') %}
  <image>
        {% endfor %}
        {%- for content in message['content'] | selectattr('type', 'equalto', 'text') %}
    {{ content['text'] }}
        {% endfor -%}
 [/INST]
    {% else %}
        {{- ' ' + message['content'][0]['text'] + '</s>' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {% if messages[-1]['role'] == 'user' %}
ASSISTANT:
    {%- endif %}
{% endif %}
"""
