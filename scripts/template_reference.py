#!/usr/bin/env python3
"""Render real chat templates (tests/data/templates/*.jinja) the way Hugging Face transformers
does, for tests/template_reference.rs to compare qnode's renderer against.

transformers compiles a chat template in a sandboxed jinja2 environment with `trim_blocks`,
`lstrip_blocks` and the loop-controls extension; `tojson` is `json.dumps(x, ensure_ascii=False,
indent=..., separators=..., sort_keys=...)`; `raise_exception` and `strftime_now` are globals;
special tokens (`bos_token`, `eos_token`) and the caller's options are variables. Messages are
in transformers' shape: a call's `arguments` are an object. This script re-creates that setup
with jinja2 itself (no transformers install needed) and writes the prompts, or the error, per
template and case.

    python3 scripts/template_reference.py > tests/data/templates/reference.json
"""
import datetime
import json
import os
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox

HERE = os.path.dirname(os.path.abspath(__file__))
DIR = os.path.join(HERE, "..", "tests", "data", "templates")

# What strftime_now returns here; the Rust test writes the same instant's text in its place.
FIXED_NOW = datetime.datetime(2026, 12, 1, 9, 30, 0)

# bos/eos strings of each template's model (its tokenizer_config.json).
SPECIAL = {
    "Qwen-Qwen2.5-7B-Instruct": ("", "<|im_end|>"),
    "Qwen-Qwen3-0.6B": ("", "<|im_end|>"),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>"),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"),
    "ibm-granite-granite-3.3-2B-Instruct": ("", "<|end_of_text|>"),
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city; \"units\" <metric> & more.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. São Paulo"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"},
                           "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                           "score": {"type": "number", "default": 0.5}},
            "required": ["query"],
        },
    },
}
CALL = {"id": "abc123XYZ", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}

CASES = [
    ("chat", [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Hi!"},
              {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "What is 2+2?"}], None, {}),
    ("tools", [{"role": "system", "content": "You are a weather bot."},
               {"role": "user", "content": "Weather in Paris?"}], [WEATHER, SEARCH], {}),
    ("tools_no_system", [{"role": "user", "content": "Weather in Paris?"}], [WEATHER], {}),
    ("tool_loop", [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "abc123XYZ",
                    "content": "{\"temp\": 18.5, \"sky\": \"clear\"}"}],
     [WEATHER], {}),
    ("llama_date", [{"role": "user", "content": "Hi"}], [WEATHER], {"date_string": "01 Dec 2026"}),
]


def render(source, bos, eos, messages, tools, kwargs):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: FIXED_NOW.strftime(fmt)
    template = env.from_string(source)
    return template.render(messages=messages, tools=tools, add_generation_prompt=True,
                           bos_token=bos, eos_token=eos, **kwargs)


def main():
    out = {"made_with": "scripts/template_reference.py (jinja2 %s, transformers' setup)"
                        % jinja2.__version__,
           "now": FIXED_NOW.isoformat(), "templates": []}
    for name, (bos, eos) in SPECIAL.items():
        with open(os.path.join(DIR, name + ".jinja"), encoding="utf-8") as f:
            source = f.read()
        cases = []
        for case, messages, tools, kwargs in CASES:
            if "date_string" in kwargs and "date_string" not in source:
                continue
            try:
                prompt, error = render(source, bos, eos, messages, tools, kwargs), None
            except Exception as e:  # a template error, or a template that cannot take the input
                prompt, error = None, "%s: %s" % (type(e).__name__, e)
            cases.append({"case": case, "messages": messages, "tools": tools,
                          "kwargs": kwargs, "prompt": prompt, "error": error})
        out["templates"].append({"name": name, "bos_token": bos, "eos_token": eos,
                                 "cases": cases})
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
