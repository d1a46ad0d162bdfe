"""Render the real chat templates in __test__/fixtures/chat_templates/ with transformers.

    /work/venv-hf/bin/python __test__/scripts/make_chat_template_fixtures.py

For every template (`<model>.jinja`, the model's own `chat_template` as published) and every
conversation below, with `add_generation_prompt` false and true, this calls transformers'
`apply_chat_template(..., tokenize=False)` (and once with a tool schema) on a tokenizer built locally (no Hub access): a
`PreTrainedTokenizerFast` over a one-word WordLevel vocabulary that carries the model's special
tokens (what the template sees as `bos_token`, `eos_token`, ...) and has the template set.
The results, or the template's error message where it raises (Gemma refuses a system message,
Mistral and Gemma refuse non-alternating roles), go to `expected.json`, which
`crates/peft-core/tests/chat_templates.rs` compares byte for byte with peft-node's rendering.
"""

import json
import pathlib

import jinja2
import transformers
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

HERE = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "chat_templates"

# The special tokens of each model (its tokenizer_config.json / GGUF metadata), and extra
# template variables: Llama 3.2's template puts today's date in the system prompt unless
# `date_string` is given, so a fixed one keeps the fixture stable.
TEMPLATES = {
    "HuggingFaceTB-SmolLM2-135M-Instruct": {
        "special_tokens": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"},
        "kwargs": {},
    },
    "Qwen-Qwen2.5-7B-Instruct": {
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "kwargs": {},
    },
    "meta-llama-Llama-3.2-3B-Instruct": {
        "special_tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "kwargs": {"date_string": "26 Jul 2024"},
    },
    "mistralai-Mistral-Nemo-Instruct-2407": {
        "special_tokens": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "kwargs": {},
    },
    "google-gemma-2-2b-it": {
        "special_tokens": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
        "kwargs": {},
    },
}

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731

CONVERSATIONS = {
    "user": [U("What is the capital of France?")],
    "system_user": [S("You are terse."), U("What is 2+2?")],
    "multi_turn": [U("Hi!"), A("Hello. How can I help?"), U("Tell me a joke.")],
    "system_multi_turn": [S("Answer in French."), U("Hi!"), A("Bonjour !"), U("Thanks."), A("De rien.")],
    "ends_with_assistant": [U("Name a colour."), A("Blue.")],
    "whitespace_unicode_quotes": [
        U("  Spaces around, \"quotes\", 'apostrophes', tabs\tand ünïcödé 日本語 🙂\n"),
        A(" An answer with a leading space and a trailing newline.\n"),
        U("{{ not a template }} {% neither %} <|im_end|> ok?"),
    ],
    "not_alternating": [U("one"), U("two")],
}


# A tool schema (as transformers' get_json_schema writes one), rendered through `tojson` by the
# Qwen, Llama and Mistral templates (with `indent=4` in Llama's).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city, in °C.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city, e.g. \"Paris\""}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


# Templates with transformers' `{% generation %}` tags (written for this test, in the styles TRL
# patches into chat templates for `assistant_only_loss`), with each kind of whitespace control
# around the tags. transformers' `return_assistant_tokens_mask` reports the character ranges of
# the tagged text; generation_expected.json keeps the rendering and those texts.
GENERATION_TEMPLATES = {
    "inline": (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "dash_controls": (
        "{%- for message in messages %}\n"
        "    {%- if message.role == 'assistant' %}\n"
        "        {{- '<|im_start|>assistant\\n' }}\n"
        "        {%- generation %}\n"
        "        {{- message.content | trim }}<|im_end|>\n"
        "        {%- endgeneration %}\n"
        "        {{- '\\n' }}\n"
        "    {%- else %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
    ),
    "block_lines": (
        "{% for m in messages %}\n"
        "{% if m.role == 'assistant' %}\n"
        "<|im_start|>assistant\n"
        "  {% generation %}\n"
        "{{ m.content }}<|im_end|>\n"
        "  {% endgeneration %}\n"
        "\n"
        "{% else %}\n"
        "<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n"
        "{% endif %}\n"
        "{% endfor %}\n"
    ),
}


def make_generation_fixtures():
    from transformers.utils.chat_template_utils import render_jinja_template

    cases = []
    for name, template in GENERATION_TEMPLATES.items():
        for conv_name in ("multi_turn", "system_multi_turn", "whitespace_unicode_quotes"):
            messages = CONVERSATIONS[conv_name]
            rendered, indices = render_jinja_template(
                conversations=[messages], chat_template=template, return_assistant_tokens_mask=True, add_generation_prompt=False
            )
            text = rendered[0]
            cases.append(
                {
                    "name": name,
                    "template": template,
                    "conversation": conv_name,
                    "messages": messages,
                    "rendered": text,
                    "assistant_texts": [text[a:b] for a, b in indices[0]],
                }
            )
    out = {"made_with": f"transformers {transformers.__version__}, jinja2 {jinja2.__version__}", "cases": cases}
    (HERE / "generation_expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} {{% generation %}} cases to {HERE / 'generation_expected.json'}")


def make_tokenizer(special_tokens, template):
    vocab = {"x": 0, **{t: i + 1 for i, t in enumerate(sorted(set(special_tokens.values())))}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="x")), **special_tokens)
    tok.chat_template = template
    return tok


def main():
    cases = []
    for name, spec in TEMPLATES.items():
        template = (HERE / f"{name}.jinja").read_text(encoding="utf-8")
        tok = make_tokenizer(spec["special_tokens"], template)
        for conv_name, messages in CONVERSATIONS.items():
            for gen in (False, True):
                case = {
                    "template": f"{name}.jinja",
                    "conversation": conv_name,
                    "special_tokens": spec["special_tokens"],
                    "kwargs": spec["kwargs"],
                    "messages": messages,
                    "add_generation_prompt": gen,
                }
                try:
                    case["rendered"] = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **spec["kwargs"])
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                cases.append(case)
        case = {
            "template": f"{name}.jinja",
            "conversation": "user_with_tools",
            "special_tokens": spec["special_tokens"],
            "kwargs": spec["kwargs"],
            "messages": CONVERSATIONS["user"],
            "tools": TOOLS,
            "add_generation_prompt": True,
        }
        case["rendered"] = tok.apply_chat_template(CONVERSATIONS["user"], tools=TOOLS, tokenize=False, add_generation_prompt=True, **spec["kwargs"])
        cases.append(case)
    out = {
        "made_with": f"transformers {transformers.__version__}, jinja2 {jinja2.__version__}",
        "script": "__test__/scripts/make_chat_template_fixtures.py",
        "cases": cases,
    }
    (HERE / "expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    n_err = sum("error" in c for c in cases)
    print(f"wrote {len(cases)} cases ({n_err} raising) to {HERE / 'expected.json'}")
    make_generation_fixtures()


if __name__ == "__main__":
    main()
