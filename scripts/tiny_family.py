#!/usr/bin/env python3
"""Tiny random-weight GGUF models of the families qnode runs, with a real Qwen tokenizer, and the
llama.cpp reference outputs that tests/family_reference.rs compares qnode against.

    python3 scripts/tiny_family.py write FAMILY OUT.gguf [--header FILE]
    python3 scripts/tiny_family.py reference FAMILY OUT.json [--header FILE] [--llama-bin DIR]

FAMILY: qwen2 | qwen2-yarn | qwen3 | llama3 | llama3-no-add-bos | phi3 | mistral | mistral-nemo
(see FAMILIES). `write`
is deterministic: the same FAMILY and header give a byte-identical file on any machine (weights come
from an integer hash of the tensor name, written straight as Q8_0 blocks or as F32 values that are
exact in binary), so the tests regenerate the file llama.cpp ran and check its sha256 against the one
recorded in the reference. `reference` needs llama.cpp's `llama-server` (only to make the committed
JSON; tests never run llama.cpp).

The tokenizer (152,064 tokens, 151,387 merges) and the architecture metadata the tiny model keeps
(RoPE base, RMS epsilon) come from the header of DeepSeek-R1-Distill-Qwen-7B (models/manifest.toml,
id deepseek-r1-qwen-header: only its first 99 MB are published, but they hold the whole header).
The full vocabulary is kept, not a synthetic one: the point is to prove the real Qwen tokenizer and
a 152k-row embedding/head, and at width 64 in Q8_0 that is 10 MB per matrix. mistral and
mistral-nemo take their vocabularies from mistral-common instead (a SentencePiece model, and the
tekken tokenizer: models/manifest.toml ids mistral-tokenizer-v3, mistral-tekken).
"""
import argparse
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_HEADER = os.path.join(HERE, "..", "models", "deepseek-r1-qwen-header", "model_part_0000")
SEED = 17

# Shapes and switches of each tiny model. Both keep the header's 152,064-token vocabulary.
FAMILIES = {
    # Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: biases on Q, K, V; untied output head (as the 7B
    # distill); the header's own tokenizer metadata verbatim (pre = deepseek-r1-qwen, add_bos, the
    # R1 chat template).
    "qwen2": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, tied=False,
                  qkv_bias=True, qk_norm=False, rope_base=None, chatml=False),
    # Qwen2.5 long-context files (Qwen2.5-*-Instruct-128K GGUFs): the qwen2 model with YaRN
    # metadata, `rope.scaling.type = yarn`, factor 4 and an original context of 64 (not 32768), so
    # that at these short positions the interpolated, ramped and kept frequency bands all exist;
    # the file's context is factor x original (256), as a YaRN-extended model's is.
    "qwen2-yarn": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128,
                       tied=False, qkv_bias=True, qk_norm=False, rope_base=None, chatml=False,
                       yarn=dict(factor=4.0, original_context=64), context=256),
    # Qwen3: per-head RMSNorm on Q and K before RoPE, no biases, head width set apart from the
    # hidden size (4 x 32 = 128 != 64, as Qwen3's `attention.key_length`), tied output head, and
    # Qwen's ChatML control tokens at their Qwen2.5 ids (151643..151645) with a thinking template.
    "qwen3": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, ffn=128, tied=True,
                  qkv_bias=False, qk_norm=True, rope_base=1_000_000.0, chatml=True),
    # Llama 3.1 / 3.2 as GGUF files label it: architecture `llama`, `rope.dimension_count`, the
    # `llama-bpe` pre-tokenizer, Llama 3's control tokens and template, tied head (3.2 1B/3B),
    # and llama3 RoPE frequency scaling stored as `rope_freqs.weight` (what convert_hf_to_gguf.py
    # writes; no `rope.scaling.type` key). The factors come from Llama 3.1's formula
    # (LlamaModel.generate_extra_tensors) with factor 8, low 1, high 4, but an original context
    # of 64 instead of 8192, so that at these short positions the unscaled, smoothed and /8
    # frequency bands all exist and matter. The vocabulary is the Qwen header's (Llama 3's own
    # is not reachable here) with Llama 3's specials at ids 151643..151647.
    "llama3": dict(arch="llama", layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=256,
                   tied=True, rope_base=500_000.0, rms_eps=1e-5,
                   llama3_rope=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=64),
                   pre="llama-bpe", add_bos=True, bos=151646, eos=151647,
                   specials={151643: "<|end_of_text|>", 151644: "<|start_header_id|>",
                             151645: "<|end_header_id|>", 151646: "<|begin_of_text|>",
                             151647: "<|eot_id|>"},
                   template="llama3"),
    # Phi-3 / Phi-3.5 / Phi-4-mini: Q/K/V fused in `attn_qkv`, gate and up fused in `ffn_up`
    # (gate first), NeoX RoPE over the first 24 of a head's 32 values (Phi-4-mini rotates 3/4),
    # su/longrope: `rope.scaling.type = longrope`, long and short per-frequency factors and
    # `rope.scaling.attn_factor`. The original context (1024) is below the context llama.cpp ran
    # with (2048) and the file's (4096), so both sides apply the long factors. Untied head.
    # Phi-3's control tokens and template on the Qwen header's vocabulary.
    "phi3": dict(arch="phi3", layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=256,
                 tied=False, rope_base=10_000.0, rms_eps=1e-5, rope_dims=24,
                 longrope=dict(original_context=1024, attn_factor=1.1902380714238083),
                 pre="qwen2", add_bos=False, bos=151643, eos=151647,
                 specials={151643: "<|endoftext|>", 151644: "<|user|>", 151645: "<|assistant|>",
                           151646: "<|system|>", 151647: "<|end|>"},
                 template="phi3"),
    # Mistral 7B Instruct v0.3 as GGUF files label it: architecture `llama`, a SentencePiece
    # vocabulary (`tokenizer.ggml.model = llama`, 32,768 pieces with [INST]/[/INST] control
    # tokens and byte fallback), RoPE base 1e6, GQA, untied head, and v0.3's [INST] template.
    # The vocabulary is mistral-common's v3 SentencePiece model (models/manifest.toml, id
    # mistral-tokenizer-v3), written as convert_hf_to_gguf.py writes an SPM vocabulary.
    "mistral": dict(arch="llama", layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32,
                    ffn=256, tied=False, rope_base=1_000_000.0, rms_eps=1e-5,
                    spm="mistral-tokenizer-v3", template="mistral-v0.3"),
    # Mistral Nemo (12B, 2407) as GGUF files label it: architecture `llama` with a head width set
    # apart from the hidden size (Nemo: 32 heads x 128 = 4096 != 5120; here 8 x 16 = 128 != 160,
    # the same 0.8), GQA by 4 (Nemo: 8 KV heads), RoPE base 1e6, untied head, and the tekken
    # tokenizer: a tiktoken-style byte-level BPE (`tokenizer.ggml.model = gpt2`, pre `tekken`)
    # whose first 1,000 ids are reserved control tokens, written as convert_hf_to_gguf.py's
    # `_set_vocab_mistral` (gguf-py's MistralVocab) writes it, from mistral-common's
    # tekken_240718.json (models/manifest.toml, id mistral-tekken), with Nemo-Instruct-2407's
    # [INST] template (no space after [INST]).
    "mistral-nemo": dict(arch="llama", layers=2, hidden=160, heads=8, kv_heads=2, head_dim=16,
                         ffn=256, tied=False, rope_base=1_000_000.0, rms_eps=1e-5,
                         tekken="mistral-tekken", template="mistral-nemo"),
}
# The tiny llama3 with no `tokenizer.ggml.add_bos_token` key, tokenizer only (no forward
# reference). Llama 3's tokenizer_config.json has no add_bos_token (its BOS comes from the
# post-processor), so a converter that does not read the post-processor writes no key, and
# llama.cpp then adds BOS by its own default for the `llama-bpe` pre-tokenizer (llama-vocab.cpp:
# `add_bos = true`, with `ignore_merges`, for every name it maps to LLAMA3).
FAMILIES["llama3-no-add-bos"] = dict(FAMILIES["llama3"], add_bos=None, tokenizer_only=True)

# Mistral-7B-Instruct-v0.3's template (its tokenizer_config.json).
MISTRAL_V03_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    '    {%- set loop_messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set loop_messages = messages %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    '\n'
    '{#- This block checks for alternating user/assistant messages, skipping tool calling '
    'messages #}\n'
    '{%- set ns = namespace() %}\n'
    '{%- set ns.index = 0 %}\n'
    '{%- for message in loop_messages %}\n'
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or '
    '(message.tool_calls is defined and message.tool_calls is not none)) %}\n'
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles '
    'must alternate user/assistant/user/assistant/...") }}\n'
    '        {%- endif %}\n'
    '        {%- set ns.index = ns.index + 1 %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '\n'
    '{{- bos_token }}\n'
    '{%- for message in loop_messages %}\n'
    '    {%- if message["role"] == "user" %}\n'
    '        {%- if tools is not none and (message == user_messages[-1]) %}\n'
    '            {{- "[AVAILABLE_TOOLS] [" }}\n'
    '            {%- for tool in tools %}\n'
    '                {%- set tool = tool.function %}\n'
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    '                    {%- if val is string %}\n'
    '                        {{- \'"\' + key + \'": "\' + val + \'"\' }}\n'
    '                    {%- else %}\n'
    '                        {{- \'"\' + key + \'": \' + val|tojson }}\n'
    '                    {%- endif %}\n'
    '                    {%- if not loop.last %}\n'
    '                        {{- ", " }}\n'
    '                    {%- endif %}\n'
    '                {%- endfor %}\n'
    '                {{- "}}" }}\n'
    '                {%- if not loop.last %}\n'
    '                    {{- ", " }}\n'
    '                {%- else %}\n'
    '                    {{- "]" }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '            {{- "[/AVAILABLE_TOOLS]" }}\n'
    '            {%- endif %}\n'
    '        {%- if loop.last and system_message is defined %}\n'
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    '        {%- else %}\n'
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    '        {%- endif %}\n'
    '    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n'
    '        {{- "[TOOL_CALLS] [" }}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- set out = tool_call.function|tojson %}\n'
    '            {{- out[:-1] }}\n'
    '            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n'
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with '
    'length 9!") }}\n'
    '            {%- endif %}\n'
    '            {{- \', "id": "\' + tool_call.id + \'"}\' }}\n'
    '            {%- if not loop.last %}\n'
    '                {{- ", " }}\n'
    '            {%- else %}\n'
    '                {{- "]" + eos_token }}\n'
    '            {%- endif %}\n'
    '        {%- endfor %}\n'
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    '        {%- if message.content is defined and message.content.content is defined %}\n'
    '            {%- set content = message.content.content %}\n'
    '        {%- else %}\n'
    '            {%- set content = message.content %}\n'
    '        {%- endif %}\n'
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    '        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n'
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with length '
    '9!") }}\n'
    '        {%- endif %}\n'
    '        {{- \'"call_id": "\' + message.tool_call_id + \'"}[/TOOL_RESULTS]\' }}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Only user and assistant roles are supported, with the '
    'exception of an initial optional system message!") }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
)

# Llama 3 Instruct's template (Meta-Llama-3-8B-Instruct's tokenizer_config.json).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Phi-3-mini-4k-instruct's template.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Mistral-Nemo-Instruct-2407's template (its tokenizer_config.json; llama.cpp keeps a copy as
# models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja): v0.3's with no space after
# [INST], [AVAILABLE_TOOLS], [TOOL_CALLS] and [TOOL_RESULTS], and assistant turns untrimmed.
MISTRAL_NEMO_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    '    {%- set loop_messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set loop_messages = messages %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    '\n'
    '{#- This block checks for alternating user/assistant messages, skipping tool calling '
    'messages #}\n'
    '{%- set ns = namespace() %}\n'
    '{%- set ns.index = 0 %}\n'
    '{%- for message in loop_messages %}\n'
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or '
    '(message.tool_calls is defined and message.tool_calls is not none)) %}\n'
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles '
    'must alternate user/assistant/user/assistant/...") }}\n'
    '        {%- endif %}\n'
    '        {%- set ns.index = ns.index + 1 %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '\n'
    '{{- bos_token }}\n'
    '{%- for message in loop_messages %}\n'
    '    {%- if message["role"] == "user" %}\n'
    '        {%- if tools is not none and (message == user_messages[-1]) %}\n'
    '            {{- "[AVAILABLE_TOOLS][" }}\n'
    '            {%- for tool in tools %}\n'
    '                {%- set tool = tool.function %}\n'
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    '                    {%- if val is string %}\n'
    '                        {{- \'"\' + key + \'": "\' + val + \'"\' }}\n'
    '                    {%- else %}\n'
    '                        {{- \'"\' + key + \'": \' + val|tojson }}\n'
    '                    {%- endif %}\n'
    '                    {%- if not loop.last %}\n'
    '                        {{- ", " }}\n'
    '                    {%- endif %}\n'
    '                {%- endfor %}\n'
    '                {{- "}}" }}\n'
    '                {%- if not loop.last %}\n'
    '                    {{- ", " }}\n'
    '                {%- else %}\n'
    '                    {{- "]" }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '            {{- "[/AVAILABLE_TOOLS]" }}\n'
    '            {%- endif %}\n'
    '        {%- if loop.last and system_message is defined %}\n'
    '            {{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    '        {%- else %}\n'
    '            {{- "[INST]" + message["content"] + "[/INST]" }}\n'
    '        {%- endif %}\n'
    '    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}\n'
    '        {{- "[TOOL_CALLS][" }}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- set out = tool_call.function|tojson %}\n'
    '            {{- out[:-1] }}\n'
    '            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n'
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with '
    'length 9!") }}\n'
    '            {%- endif %}\n'
    '            {{- \', "id": "\' + tool_call.id + \'"}\' }}\n'
    '            {%- if not loop.last %}\n'
    '                {{- ", " }}\n'
    '            {%- else %}\n'
    '                {{- "]" + eos_token }}\n'
    '            {%- endif %}\n'
    '        {%- endfor %}\n'
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- message["content"] + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    '        {%- if message.content is defined and message.content.content is defined %}\n'
    '            {%- set content = message.content.content %}\n'
    '        {%- else %}\n'
    '            {%- set content = message.content %}\n'
    '        {%- endif %}\n'
    '        {{- \'[TOOL_RESULTS]{"content": \' + content|string + ", " }}\n'
    '        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n'
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with length '
    '9!") }}\n'
    '        {%- endif %}\n'
    '        {{- \'"call_id": "\' + message.tool_call_id + \'"}[/TOOL_RESULTS]\' }}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Only user and assistant roles are supported, with the '
    'exception of an initial optional system message!") }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
)

TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "phi3": PHI3_TEMPLATE,
             "mistral-v0.3": MISTRAL_V03_TEMPLATE, "mistral-nemo": MISTRAL_NEMO_TEMPLATE}

# Qwen3's template, reduced to what a chat gateway sends (no tools): ChatML turns, and an empty
# think block when `enable_thinking` is false.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

TOKENIZE_TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "I'm here; you're there. Isn't it? THEY'RE WE'LL I'D",
    "numbers: 3.14159 and 1,000,000 and 2026-11-23 and 1234567890",
    "你好，世界！今天天气怎么样？",
    "日本語のテキストと한국어 텍스트，混合English单词",
    "emoji: 😀👍🏽🚀 and a family 👨‍👩‍👧 ✨",
    'fn main() {\n    println!("{}", x + 1);\n}\n',
    "def f(a, b):\n\treturn a**2 + b  # comment\n",
    "\t tabs\tand\n\nnewlines\r\n  \n",
    "Ünïcödé façade naïve café — “quotes” ‘single’ … ©®™",
    "x=1;y=22;z=333;w=4444;v=55555",
    "a\u00a0b\u3000c",
    "<think>\nreasoning\n</think>\n\nanswer",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<｜User｜>你好<｜Assistant｜>",
    "   ",
]

# More strings for the tekken families: where tekken's split differs from the other pre-tokenizers
# (single digits; an upper-case run then lower case, `McDonald`, `XMLHttpRequest`; llama.cpp's
# tekken regex counts every letter outside ASCII as both upper and lower case and leaves combining
# marks out of words, unlike Mistral's own pattern; `/` and line breaks after punctuation, the one
# place where qwen2's regex gives other ids on this vocabulary: the last string), non-Latin
# scripts, and the control tokens tekken reserves ids 0..999 for.
TEKKEN_TEXTS = [
    "McDonald's iPhone XMLHttpRequest HTTPServer camelCaseWord ALLCAPS iOS",
    "ÉCOLE École éA Ωμέγα ΑΘΗΝΑ Straße СЛОВО слово ǅemal aÉb żÓłw dasHAUS",
    "cafe\u0301 e\u0301E\u0301 नमस्ते दुनिया ภาษาไทย",
    "مرحبا بالعالم שָׁלוֹם עולם",
    "3.14159 1,000,000 ٣٤٥ ①②③ 12345678901234567890 v2.0.1-rc3",
    "path/to/file.rs // comment /* c */ a/b\n/c http://x.y/z?q=1&r=2",
    "a    b\t\t\tc \n \n  d   \u3000\u3000e\u00a0\u00a0f\r\n\r\n\n",
    "x+=1;\n\n\n    return {a:[1,2]}; // 😀👍🏽",
    "[INST]hi[/INST]</s><s>[TOOL_CALLS]<SPECIAL_20>[IMG]<pad>",
    "<unk>text<SPECIAL_999> [INST] spaced [/INST] <s",
    "end.\n// next;\n/* c */\n/x",
]

PROMPTS = [
    "Hello, world!",
    "你好，世界！",
    "def add(a, b):\n    return",
    "The year 2024 had 366 days; 😀🚀",
    "Once upon a time, in a land far away, there lived a programmer who wrote a tiny "
    "transformer, tested it against llama.cpp and found every token equal.",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "<think>greet</think>你好！"},
        {"role": "user", "content": "Tell me a joke."},
    ],
]

N_PREDICT = 24
N_PROBS = 5

# --- reading the header -----------------------------------------------------------------------

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}


def read_header(path):
    """The key/value section of a GGUF file as [(key, type, subtype, value)], in file order. Reads
    only the header, so a file cut after it (as the published part is) is fine."""
    with open(path, "rb") as f:
        data = f.read(16 << 20)
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = data[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            sub = take("I")
            return [value(sub) for _ in range(take("Q"))]
        return take(_SCALAR[t])

    if data[:4] != b"GGUF":
        sys.exit(f"{path}: not a GGUF file")
    pos = 4
    take("I")  # version
    take("Q")  # tensor count
    out = []
    for _ in range(take("Q")):
        key = string()
        t = take("I")
        if t == 9:
            sub = struct.unpack_from("<I", data, pos)[0]
            out.append((key, t, sub, value(t)))
        else:
            out.append((key, t, None, value(t)))
    return out


# --- reading a SentencePiece model ------------------------------------------------------------

SPM_FILES = {"mistral-tokenizer-v3": "tokenizer.model.v3"}


def _varint(b, i):
    out = shift = 0
    while True:
        c = b[i]
        i += 1
        out |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return out, i


def _proto_fields(b):
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        wire = key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            sys.exit(f"unsupported protobuf wire type {wire}")
        yield key >> 3, v


def spm_vocab(model_id):
    """Pieces, scores and GGUF token types of a SentencePiece model, as convert_hf_to_gguf.py's
    `_create_vocab_sentencepiece` makes them (unknown, control, unused and byte pieces keep their
    type, every other piece is normal), read from the model's protobuf directly so that the
    tests need no sentencepiece package."""
    path = os.path.join(HERE, "..", "models", model_id, SPM_FILES[model_id])
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run `python3 models/fetch.py {model_id}`")
    tokens, scores, types = [], [], []
    for field, piece in _proto_fields(open(path, "rb").read()):
        if field != 1:  # ModelProto.pieces
            continue
        text, score, kind = "", 0.0, 1
        for f, v in _proto_fields(piece):
            if f == 1:
                text = v.decode("utf-8")
            elif f == 2:
                score = struct.unpack("<f", v)[0]
            elif f == 3:
                kind = v
        tokens.append(text)
        scores.append(score)
        # SentencePiece's types (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6)
        # are GGUF's numbers; the converter does not test for user-defined pieces.
        types.append(kind if kind in (2, 3, 5, 6) else 1)
    return tokens, scores, types


# --- reading a tekken tokenizer ---------------------------------------------------------------

TEKKEN_FILES = {"mistral-tekken": "tekken_240718.json"}

# The control tokens of a tekken file that lists none (version v3 and older, as tekken_240718.json):
# mistral-common's `Tekkenizer.DEPRECATED_SPECIAL_TOKENS`, ids 0..19; ids 20 up to
# `default_num_special_tokens` are `<SPECIAL_{id}>` fillers.
TEKKEN_DEFAULT_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]


def _byte_chars():
    """GPT-2's byte -> printable character map (bytes_to_unicode)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = [""] * 256
    for b, c in zip(bs, cs):
        table[b] = chr(c)
    return table


def tekken_vocab(model_id):
    """Tokens, GGUF token types, merges and (bos, eos, unk, pad) ids of a tekken tokenizer, as
    gguf-py's MistralVocab and convert_hf_to_gguf.py's `_set_vocab_mistral` write them: the
    `default_num_special_tokens` control tokens first (type CONTROL), then the first
    `default_vocab_size - default_num_special_tokens` ranked byte sequences as GPT-2 byte-level
    strings (type NORMAL); the merges reconstructed from the ranks (MistralVocab's
    `extract_vocab_merges_from_model`): for each token from rank 256 up, every split into two
    ranked halves, ordered by the halves' ranks, tokens in rank order. Read from the JSON directly
    so that the tests need neither mistral-common nor tiktoken."""
    import base64
    path = os.path.join(HERE, "..", "models", model_id, TEKKEN_FILES[model_id])
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run `python3 models/fetch.py {model_id}`")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    config = data["config"]
    n_special = config["default_num_special_tokens"]
    n_inner = config["default_vocab_size"] - n_special
    listed = data.get("special_tokens")
    if listed is None:
        specials = list(TEKKEN_DEFAULT_SPECIALS)
    else:
        specials = [t["token_str"] for t in sorted(listed, key=lambda t: t["rank"])]
    specials += [f"<SPECIAL_{i}>" for i in range(len(specials), n_special)]
    inner = []
    for i, entry in enumerate(data["vocab"][:n_inner]):
        assert entry["rank"] == i
        inner.append(base64.b64decode(entry["token_bytes"]))
    ranks = {b: i for i, b in enumerate(inner)}
    assert len(ranks) == n_inner and all(inner[i] == bytes([i]) for i in range(256))

    chars = _byte_chars()
    text = lambda b: "".join(chars[x] for x in b)
    merges = []
    for i in range(256, n_inner):
        token = inner[i]
        splits = sorted((ranks[token[:j]], ranks[token[j:]], j) for j in range(1, len(token))
                        if token[:j] in ranks and token[j:] in ranks)
        if not splits:
            sys.exit(f"{path}: no merge makes the token of rank {i}")
        merges += [f"{text(token[:j])} {text(token[j:])}" for _, _, j in splits]
    tokens = specials + [text(b) for b in inner]
    types = [3] * n_special + [1] * n_inner
    special_id = {t: i for i, t in enumerate(specials)}
    ids = tuple(special_id[t] for t in ("<s>", "</s>", "<unk>", "<pad>"))
    return tokens, types, merges, ids


# --- deterministic weights --------------------------------------------------------------------

def _hash(name, n):
    """n pseudo-random uint64 from the tensor name (splitmix64 of the index): the same on every
    machine and numpy version."""
    seed = np.uint64((zlib.crc32(name.encode()) << 8) ^ SEED)
    with np.errstate(over="ignore"):
        x = seed + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def q8_0(name, rows, cols, std):
    """A [rows, cols] matrix written directly as Q8_0 blocks (f16 scale + 32 int8): uniform int8 in
    -127..127 (std ~73) times a per-block scale around std / 73."""
    assert cols % 32 == 0
    blocks = rows * cols // 32
    h = _hash(name, blocks * 33)
    q = ((h[:blocks * 32] % np.uint64(255)).astype(np.int64) - 127).astype(np.int8)
    u = (h[blocks * 32:] % np.uint64(1024)).astype(np.float64) / 1024.0
    d = (std / 73.0 * (0.75 + 0.5 * u)).astype(np.float16)
    out = np.empty((blocks, 34), dtype=np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(blocks, 2)
    out[:, 2:] = q.view(np.uint8).reshape(blocks, 32)
    return out.reshape(rows, cols // 32 * 34)


def f32(name, n, center, spread):
    """n F32 values center + spread * k / 128 for k in -128..127: exact in binary."""
    k = (_hash(name, n) % np.uint64(256)).astype(np.int64) - 128
    return (center + spread * k.astype(np.float64) / 128.0).astype(np.float32)


# --- writing ----------------------------------------------------------------------------------

def llama3_rope_factors(head_dim, base, factor, low_freq_factor, high_freq_factor,
                        original_max_position_embeddings):
    """Llama 3.1's per-frequency RoPE divisors, as convert_hf_to_gguf.py computes them
    (LlamaModel.generate_extra_tensors, in float32 as torch does)."""
    import math
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                         / np.float32(head_dim)))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for freq in freqs.astype(np.float32):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = ((original_max_position_embeddings / wavelen - low_freq_factor)
                      / (high_freq_factor - low_freq_factor))
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write(family, out, header):
    if "arch" in FAMILIES[family]:
        return write_family(family, out, header)
    import gguf

    cfg = FAMILIES[family]
    kv = read_header(header)
    meta = {k: (t, s, v) for k, t, s, v in kv}
    tokens = meta["tokenizer.ggml.tokens"][2]
    vocab = len(tokens)
    arch = "qwen2" if family == "qwen2-yarn" else family
    w = gguf.GGUFWriter(out, arch)
    T = gguf.GGUFValueType
    w.add_key_value("general.name", f"qnode tiny {family} (random weights, {SEED})", T.STRING)
    u32 = lambda k, v: w.add_key_value(f"{arch}.{k}", v, T.UINT32)
    u32("block_count", cfg["layers"])
    u32("context_length", cfg.get("context", 4096))
    u32("embedding_length", cfg["hidden"])
    u32("feed_forward_length", cfg["ffn"])
    u32("attention.head_count", cfg["heads"])
    u32("attention.head_count_kv", cfg["kv_heads"])
    if cfg["head_dim"] * cfg["heads"] != cfg["hidden"]:
        u32("attention.key_length", cfg["head_dim"])
        u32("attention.value_length", cfg["head_dim"])
    rope = cfg["rope_base"] or meta["qwen2.rope.freq_base"][2]
    w.add_key_value(f"{arch}.rope.freq_base", rope, T.FLOAT32)
    w.add_key_value(f"{arch}.attention.layer_norm_rms_epsilon",
                    meta["qwen2.attention.layer_norm_rms_epsilon"][2], T.FLOAT32)
    if "yarn" in cfg:
        # What convert_hf_to_gguf.py writes for `rope_scaling: {type: yarn, factor,
        # original_max_position_embeddings}` (Qwen2.5's config has no beta/extrapolation keys).
        w.add_key_value(f"{arch}.rope.scaling.type", "yarn", T.STRING)
        w.add_key_value(f"{arch}.rope.scaling.factor", cfg["yarn"]["factor"], T.FLOAT32)
        u32("rope.scaling.original_context_length", cfg["yarn"]["original_context"])
    for key, t, sub, value in kv:
        if not key.startswith("tokenizer."):
            continue
        if cfg["chatml"]:
            if key == "tokenizer.ggml.tokens":
                value = list(value)
                value[151643:151646] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            elif key == "tokenizer.ggml.pre":
                value = "qwen2"
            elif key == "tokenizer.ggml.bos_token_id":
                value = 151643
            elif key == "tokenizer.ggml.eos_token_id":
                value = 151645
            elif key == "tokenizer.ggml.add_bos_token":
                value = False
            elif key == "tokenizer.chat_template":
                value = QWEN3_TEMPLATE
        w.add_key_value(key, value, T(t), T(sub) if sub is not None else None)

    Q8 = gguf.GGMLQuantizationType.Q8_0
    hd, hidden, ffn = cfg["head_dim"], cfg["hidden"], cfg["ffn"]
    q_dim, kv_dim = cfg["heads"] * hd, cfg["kv_heads"] * hd

    def mat(name, rows, cols, std):
        w.add_tensor(name, q8_0(name, rows, cols, std), raw_dtype=Q8)

    mat("token_embd.weight", vocab, hidden, 1.0)
    w.add_tensor("output_norm.weight", f32("output_norm.weight", hidden, 1.0, 0.25))
    if not cfg["tied"]:
        mat("output.weight", vocab, hidden, 0.4)
    for i in range(cfg["layers"]):
        p = lambda n: f"blk.{i}.{n}"
        w.add_tensor(p("attn_norm.weight"), f32(p("attn_norm.weight"), hidden, 1.0, 0.25))
        mat(p("attn_q.weight"), q_dim, hidden, 0.25)
        mat(p("attn_k.weight"), kv_dim, hidden, 0.25)
        mat(p("attn_v.weight"), kv_dim, hidden, 0.15)
        if cfg["qkv_bias"]:
            w.add_tensor(p("attn_q.bias"), f32(p("attn_q.bias"), q_dim, 0.0, 1.0))
            w.add_tensor(p("attn_k.bias"), f32(p("attn_k.bias"), kv_dim, 0.0, 1.0))
            w.add_tensor(p("attn_v.bias"), f32(p("attn_v.bias"), kv_dim, 0.0, 0.5))
        if cfg["qk_norm"]:
            w.add_tensor(p("attn_q_norm.weight"), f32(p("attn_q_norm.weight"), hd, 1.0, 0.5))
            w.add_tensor(p("attn_k_norm.weight"), f32(p("attn_k_norm.weight"), hd, 1.0, 0.5))
        mat(p("attn_output.weight"), hidden, q_dim, 0.12)
        w.add_tensor(p("ffn_norm.weight"), f32(p("ffn_norm.weight"), hidden, 1.0, 0.25))
        mat(p("ffn_gate.weight"), ffn, hidden, 0.2)
        mat(p("ffn_up.weight"), ffn, hidden, 0.2)
        mat(p("ffn_down.weight"), hidden, ffn, 0.12)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_family(family, out, header):
    """The families after qwen2/qwen3 (llama3, phi3): the header's tokenizer with the family's
    pre-tokenizer, control tokens and template, and the family's own tensor layout."""
    import gguf

    cfg = FAMILIES[family]
    kv = read_header(header)
    meta = {k: (t, s, v) for k, t, s, v in kv}
    vocab = len(meta["tokenizer.ggml.tokens"][2])
    arch = cfg["arch"]
    w = gguf.GGUFWriter(out, arch)
    T = gguf.GGUFValueType
    # Not `phi3` in the name: llama.cpp gives every control token of a model whose general.name
    # contains "phi3" or "phi-3" the rstrip attribute (whitespace after it is dropped), which qnode
    # does not mirror yet.
    w.add_key_value("general.name", f"qnode tiny {family.replace('phi3', 'phi')} (random weights, "
                    f"{SEED})", T.STRING)
    u32 = lambda k, v: w.add_key_value(f"{arch}.{k}", v, T.UINT32)
    f32v = lambda k, v: w.add_key_value(f"{arch}.{k}", v, T.FLOAT32)
    hd, hidden, ffn = cfg["head_dim"], cfg["hidden"], cfg["ffn"]
    q_dim, kv_dim = cfg["heads"] * hd, cfg["kv_heads"] * hd
    rope_dims = cfg.get("rope_dims", hd)
    u32("block_count", cfg["layers"])
    u32("context_length", 4096)
    u32("embedding_length", hidden)
    u32("feed_forward_length", ffn)
    u32("attention.head_count", cfg["heads"])
    u32("attention.head_count_kv", cfg["kv_heads"])
    u32("rope.dimension_count", rope_dims)
    if q_dim != hidden:
        u32("attention.key_length", hd)
        u32("attention.value_length", hd)
    f32v("rope.freq_base", cfg["rope_base"])
    f32v("attention.layer_norm_rms_epsilon", cfg["rms_eps"])
    if "longrope" in cfg:
        w.add_key_value(f"{arch}.rope.scaling.type", "longrope", T.STRING)
        u32("rope.scaling.original_context_length", cfg["longrope"]["original_context"])
        f32v("rope.scaling.attn_factor", cfg["longrope"]["attn_factor"])
    if "spm" in cfg:
        # What convert_hf_to_gguf.py's `_set_vocab_sentencepiece` and SpecialVocab write for
        # Mistral-7B-Instruct-v0.3 (no add_space_prefix key: llama.cpp's SPM default applies).
        tokens, scores, types = spm_vocab(cfg["spm"])
        vocab = len(tokens)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(TEMPLATES[cfg["template"]])
        kv = []
    if "tekken" in cfg:
        # What `_set_vocab_mistral` writes for a tekken tokenizer, in its order: scores are the
        # int 0 it yields for every token (so an INT32 array; llama.cpp ignores scores for gpt2
        # vocabularies), add_bos true, add_eos false. The template is Nemo-Instruct-2407's own
        # Jinja (what a file converted from the Hugging Face checkpoint carries) instead of the
        # name `mistral-v3-tekken` the converter writes for Mistral-format checkpoints.
        tokens, types, merges, (bos, eos, unk, pad) = tekken_vocab(cfg["tekken"])
        vocab = len(tokens)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("tekken")
        w.add_token_merges(merges)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        w.add_unk_token_id(unk)
        w.add_pad_token_id(pad)
        w.add_token_list(tokens)
        w.add_token_scores([0] * vocab)
        w.add_token_types(types)
        w.add_vocab_size(vocab)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(TEMPLATES[cfg["template"]])
        kv = []
    for key, t, sub, value in kv:
        if not key.startswith("tokenizer."):
            continue
        if key == "tokenizer.ggml.tokens":
            value = list(value)
            for i, name in cfg["specials"].items():
                value[i] = name
        elif key == "tokenizer.ggml.pre":
            value = cfg["pre"]
        elif key == "tokenizer.ggml.bos_token_id":
            value = cfg["bos"]
        elif key == "tokenizer.ggml.eos_token_id":
            value = cfg["eos"]
        elif key == "tokenizer.ggml.add_bos_token":
            if cfg["add_bos"] is None:
                continue
            value = cfg["add_bos"]
        elif key == "tokenizer.chat_template":
            value = TEMPLATES[cfg["template"]]
        w.add_key_value(key, value, T(t), T(sub) if sub is not None else None)

    Q8 = gguf.GGMLQuantizationType.Q8_0

    def mat(name, rows, cols, std):
        w.add_tensor(name, q8_0(name, rows, cols, std), raw_dtype=Q8)

    mat("token_embd.weight", vocab, hidden, 1.0)
    w.add_tensor("output_norm.weight", f32("output_norm.weight", hidden, 1.0, 0.25))
    if not cfg["tied"]:
        mat("output.weight", vocab, hidden, 0.4)
    if "llama3_rope" in cfg:
        w.add_tensor("rope_freqs.weight",
                     llama3_rope_factors(hd, cfg["rope_base"], **cfg["llama3_rope"]))
    if "longrope" in cfg:
        # Exact in binary: long factors 1..12.5 (the low frequencies stretched most, as Phi-3's),
        # short ones close to 1.
        k = np.arange(rope_dims // 2, dtype=np.float64)
        w.add_tensor("rope_factors_long.weight", (1.0 + k * k / 8.0).astype(np.float32))
        w.add_tensor("rope_factors_short.weight", (1.0 + k / 64.0).astype(np.float32))
    for i in range(cfg["layers"]):
        p = lambda n: f"blk.{i}.{n}"
        w.add_tensor(p("attn_norm.weight"), f32(p("attn_norm.weight"), hidden, 1.0, 0.25))
        if arch == "phi3":
            mat(p("attn_qkv.weight"), q_dim + 2 * kv_dim, hidden, 0.25)
        else:
            mat(p("attn_q.weight"), q_dim, hidden, 0.25)
            mat(p("attn_k.weight"), kv_dim, hidden, 0.25)
            mat(p("attn_v.weight"), kv_dim, hidden, 0.15)
        mat(p("attn_output.weight"), hidden, q_dim, 0.12)
        w.add_tensor(p("ffn_norm.weight"), f32(p("ffn_norm.weight"), hidden, 1.0, 0.25))
        if arch == "phi3":
            mat(p("ffn_up.weight"), 2 * ffn, hidden, 0.2)
        else:
            mat(p("ffn_gate.weight"), ffn, hidden, 0.2)
            mat(p("ffn_up.weight"), ffn, hidden, 0.2)
        mat(p("ffn_down.weight"), hidden, ffn, 0.12)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the llama.cpp reference ------------------------------------------------------------------

def _post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


class _Server:
    """llama-server on `model` with a context of `ctx` (one slot, f32 caches, no flash
    attention), on a free port, for the `with` block."""

    def __init__(self, model, ctx, llama_bin, log):
        self.model, self.ctx, self.llama_bin, self.log = model, ctx, llama_bin, log

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, LD_LIBRARY_PATH=self.llama_bin)
        self.proc = subprocess.Popen(
            [os.path.join(self.llama_bin, "llama-server"), "-m", self.model, "-t", "2", "-c",
             str(self.ctx), "-np", "1", "-fa", "off", "-ctk", "f32", "-ctv", "f32", "--host",
             "127.0.0.1", "--port", str(self.port), "--no-webui"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health") as r:
                    if r.status == 200:
                        return self.port
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        sys.exit(open(self.log).read())

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def _greedy(port):
    greedy = []
    for prompt in PROMPTS:
        ids = _post(port, "/tokenize", {"content": prompt, "add_special": True})["tokens"]
        r = _post(port, "/completion", {
            "prompt": ids, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1,
            "n_probs": N_PROBS, "cache_prompt": False, "seed": 0, "return_tokens": True,
        })
        # The server leaves out of `completion_probabilities` a token whose text ends inside a
        # UTF-8 character (server-context.cpp, process_token): align the probabilities with every
        # generated token (`tokens`), null where they were left out.
        tokens, probs, tops = r["tokens"], r["completion_probabilities"], []
        for tok in tokens:
            if probs and probs[0]["id"] == tok:
                p = probs.pop(0)
                tops.append([[t["id"], t["logprob"]] for t in p["top_logprobs"]])
            else:
                tops.append(None)
        assert not probs, "probabilities out of order with the tokens"
        greedy.append({
            "prompt": prompt,
            "prompt_ids": ids,
            "completion_ids": tokens,
            "completion_text": r["content"],
            # llama.cpp's log-softmax over the raw logits: the top N_PROBS at each step (null
            # where the server did not report them).
            "top_logprobs": tops,
        })
    return greedy


def reference(family, out, header, llama_bin):
    cfg = FAMILIES[family]
    extra = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, f"tiny-{family}.gguf")
        write(family, model, header)
        digest = sha256_of(model)
        log = os.path.join(tmp, "log")
        with _Server(model, 2048, llama_bin, log) as port:
            tokenize = [{"text": t, "ids": _post(port, "/tokenize",
                                                 {"content": t, "add_special": False})["tokens"]}
                        for t in TOKENIZE_TEXTS + (TEKKEN_TEXTS if "tekken" in cfg else [])]
            if cfg.get("tokenizer_only"):
                # The prompts with add_special = true (BOS as llama.cpp decides it), nothing run.
                extra["tokenize_add_special"] = [
                    {"text": t, "ids": _post(port, "/tokenize",
                                             {"content": t, "add_special": True})["tokens"]}
                    for t in PROMPTS]
                ref = {"family": family,
                       "made_with": "scripts/tiny_family.py reference: llama.cpp server /tokenize "
                                    "with add_special false (tokenize) and true "
                                    "(tokenize_add_special)",
                       "gguf_sha256": digest, "config": cfg, "tokenize": tokenize, **extra}
                with open(out, "w") as f:
                    json.dump(ref, f, ensure_ascii=False, indent=1)
                    f.write("\n")
                return
            greedy = _greedy(port)
            chats = []
            # Qwen3's template reads `enable_thinking`: record both settings.
            kwargs = ([{"enable_thinking": True}, {"enable_thinking": False}]
                      if cfg.get("chatml") else [{}])
            for messages in CHATS:
                for kw in kwargs:
                    r = _post(port, "/apply-template",
                              {"messages": messages, "chat_template_kwargs": kw})
                    # llama.cpp drops a leading BOS string from the rendered text and adds
                    # the token when tokenizing (add_special): the ids are what both must agree on.
                    ids = _post(port, "/tokenize", {"content": r["prompt"],
                                                    "add_special": True})["tokens"]
                    chats.append({"messages": messages, "kwargs": kw, "prompt": r["prompt"],
                                  "prompt_ids": ids})
        if "longrope" in cfg:
            # su/longrope: a context up to the original one runs on the short factors.
            short = cfg["longrope"]["original_context"]
            with _Server(model, short, llama_bin, log) as port:
                extra["greedy_short_context"] = {"context": short, "greedy": _greedy(port)}
    ref = {
        "family": family,
        "made_with": "scripts/tiny_family.py reference: llama.cpp server -c 2048 -np 1 -fa off "
                     "-ctk f32 -ctv f32 (/tokenize add_special=false; /completion on the prompt's "
                     f"ids with add_special, temperature 0, top_k 1, n_probs {N_PROBS}; "
                     "/apply-template)",
        "gguf_sha256": digest,
        "config": cfg,
        "tokenize": tokenize,
        "greedy": greedy,
        "chat_template": chats,
        **extra,
    }
    with open(out, "w") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["write", "reference"])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("out")
    ap.add_argument("--header", default=DEFAULT_HEADER)
    ap.add_argument("--llama-bin", default=os.environ.get(
        "LLAMA_BIN", "/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"))
    a = ap.parse_args()
    if not os.path.exists(a.header):
        sys.exit(f"{a.header} is missing: run `python3 models/fetch.py deepseek-r1-qwen-header`")
    if a.command == "write":
        write(a.family, a.out, a.header)
    else:
        reference(a.family, a.out, a.header, a.llama_bin)


if __name__ == "__main__":
    main()
