"""The official `openai` Python client against a running qnode HTTP front.

Run by tests/openai_real_model.rs:
    python3 tests/openai_client.py REAL_BASE_URL STANDBY_BASE_URL SCRIPTED_BASE_URL API_KEY

REAL serves the real SmolLM2 model (`smollm2`) behind API_KEY; STANDBY is a node on standby over
the same pool (same key); SCRIPTED serves the scripted test backend with no key (its prompt
`queue_full` is refused with a full queue). Every check raises on failure; the process exits 0
only when all passed, and prints one line per check. Checks are explicit (`ensure`, never `assert`,
which `python3 -O` / PYTHONOPTIMIZE strips).
"""

import math
import sys

import openai

real_url, standby_url, scripted_url, key = sys.argv[1:5]


def client(url, api_key=key):
    # No retries: every status must reach the test as the server sent it.
    return openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=120)


class CheckFailed(Exception):
    """A check that did not hold (a plain Exception: `python3 -O` cannot strip it)."""


def ensure(cond, what, *context):
    """Raise CheckFailed saying `what` did not hold, with the values in `context`."""
    if not cond:
        raise CheckFailed(f"check failed: {what}; got {context!r}")


def expect(exc_type, fn, status, *needles):
    try:
        fn()
    except exc_type as e:
        ensure(e.status_code == status, 'e.status_code == status', (exc_type, e.status_code, e))
        for needle in needles:
            ensure(needle in str(e), 'needle in str(e)', (needle, str(e)))
        return e
    raise CheckFailed(f"expected {exc_type.__name__}, nothing was raised")


def check(name):
    print(f"ok {name}", flush=True)


real = client(real_url)
hello = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

# Chat completion, greedy.
r = real.chat.completions.create(model="smollm2", messages=hello, max_tokens=8, temperature=0)
ensure(r.object == "chat.completion", 'r.object == "chat.completion"', r)
ensure(r.id.startswith("chatcmpl-"), 'r.id.startswith("chatcmpl-")', r.id)
ensure(r.model == "smollm2", 'r.model == "smollm2"')
ensure(len(r.choices) == 1 and r.choices[0].index == 0, 'len(r.choices) == 1 and r.choices[0].index == 0')
ensure(r.choices[0].message.role == "assistant", 'r.choices[0].message.role == "assistant"')
ensure("Paris" in r.choices[0].message.content, '"Paris" in r.choices[0].message.content', r.choices[0].message.content)
ensure(r.choices[0].finish_reason in ("stop", "length"), 'r.choices[0].finish_reason in ("stop", "length")')
ensure(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, 'r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens')
ensure(r.usage.completion_tokens >= 1, 'r.usage.completion_tokens >= 1')
greedy = r.choices[0].message.content
check("chat completion")

# Streaming, with the usage chunk: same text as the unary answer.
stream = real.chat.completions.create(
    model="smollm2",
    messages=hello,
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, finish, usage, roles, prints = "", None, None, [], []
for chunk in stream:
    ensure(chunk.object == "chat.completion.chunk", 'chunk.object == "chat.completion.chunk"')
    ends = chunk.usage is not None or chunk.choices[0].finish_reason is not None
    prints.append((ends, chunk.system_fingerprint))
    if chunk.usage is not None:
        ensure(chunk.choices == [], 'chunk.choices == []', chunk)
        usage = chunk.usage
        continue
    delta = chunk.choices[0].delta
    if delta.role:
        roles.append(delta.role)
    text += delta.content or ""
    finish = chunk.choices[0].finish_reason or finish
ensure(text == greedy, 'text == greedy', (text, greedy))
ensure(roles == ["assistant"], 'roles == ["assistant"]', roles)
ensure(finish in ("stop", "length"), 'finish in ("stop", "length")')
ensure(usage is not None and usage.completion_tokens >= 1, 'usage is not None and usage.completion_tokens >= 1')
# Where the answer came from is known at its end: the finish and usage chunks say it.
ends = {fp for end, fp in prints if end}
ensure(len(ends) == 1 and str(ends.pop()).startswith("qnode-"), "finish and usage chunks carry one system_fingerprint", prints)
ensure(all(fp is None for end, fp in prints if not end), "other chunks carry none", prints)
check("chat streaming with usage")

# Seeded sampling: streamed and unary give the same text.
seeded = dict(model="smollm2", messages=hello, max_tokens=12, temperature=0.9, seed=7)
unary = real.chat.completions.create(**seeded).choices[0].message.content
streamed = "".join(
    c.choices[0].delta.content or "" for c in real.chat.completions.create(stream=True, **seeded)
)
ensure(unary == streamed, 'unary == streamed', (unary, streamed))
check("seeded stream == unary")

# Log-probabilities (greedy): streamed and unary give the same tokens and values; the chosen token
# is the most likely one; alternatives come most likely first and never hold more than all the
# mass; the tokens' bytes, joined, are the answer.
lp_args = dict(model="smollm2", messages=hello, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
r = real.chat.completions.create(**lp_args)
content = r.choices[0].message.content
entries = r.choices[0].logprobs.content
ensure(len(entries) >= 1, "logprobs.content is not empty", r)
ensure(len(entries) <= r.usage.completion_tokens, "one entry per generated token (end-of-turn not listed)", len(entries), r.usage)


def check_entries(entries, content):
    joined = b"".join(bytes(e.bytes) for e in entries).decode("utf-8")
    ensure(joined == content, "the tokens' bytes joined are the content", joined, content)
    ensure("".join(e.token for e in entries) == content, "the tokens joined are the content", [e.token for e in entries])
    for e in entries:
        ensure(e.token == bytes(e.bytes).decode("utf-8", "replace"), "token is its bytes decoded", e)
        ensure(len(e.top_logprobs) == 3, "3 alternatives", e)
        values = [t.logprob for t in e.top_logprobs]
        ensure(values == sorted(values, reverse=True), "alternatives most likely first", values)
        ensure(all(v <= 0 for v in values), "log-probabilities are <= 0", values)
        ensure(sum(math.exp(v) for v in values) <= 1.0001, "the alternatives hold at most all the mass", values)
        # Greedy: the chosen token is the argmax, with exactly the same value.
        ensure(e.top_logprobs[0].token == e.token, "greedy picks the most likely token", e)
        ensure(e.top_logprobs[0].logprob == e.logprob, "the chosen token's value is its alternative's", e)


check_entries(entries, content)
streamed, text = [], ""
for chunk in real.chat.completions.create(stream=True, **lp_args):
    if not chunk.choices:
        continue
    choice = chunk.choices[0]
    text += choice.delta.content or ""
    if choice.logprobs is not None:
        streamed.extend(choice.logprobs.content)
    elif choice.delta.content:
        raise CheckFailed(f"a chunk with text has no logprobs: {chunk}")
ensure(text == content, "streamed text == unary", text, content)
check_entries(streamed, text)
ensure([e.token for e in streamed] == [e.token for e in entries], "streamed tokens == unary", streamed, entries)
for a, b in zip(streamed, entries):
    ensure(abs(a.logprob - b.logprob) <= 1e-4, "streamed values == unary", a, b)
    for x, y in zip(a.top_logprobs, b.top_logprobs):
        ensure(x.token == y.token and abs(x.logprob - y.logprob) <= 1e-4, "streamed alternatives == unary", x, y)
# Asked for none: `logprobs` stays null.
plain = real.chat.completions.create(model="smollm2", messages=hello, max_tokens=2, temperature=0)
ensure(plain.choices[0].logprobs is None, "no logprobs unless asked", plain)
# Legacy completions: `logprobs: N`.
c = real.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
lp = c.choices[0].logprobs
ensure("".join(lp.tokens) == c.choices[0].text, "legacy tokens joined are the text", lp.tokens, c.choices[0].text)
ensure(len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset), "legacy lists align", lp)
ensure(lp.text_offset[0] == 0, "offsets start at 0", lp.text_offset)
for i, tok in enumerate(lp.tokens):
    ensure(tok in lp.top_logprobs[i] and len(lp.top_logprobs[i]) <= 3, "the chosen token is among the alternatives", lp.top_logprobs[i])
    ensure(max(lp.top_logprobs[i].values()) == lp.token_logprobs[i], "greedy: chosen is the most likely", lp)
    if i > 0:
        ensure(lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1]), "offsets advance by the token", lp.text_offset)
# Refusals, as OpenAI: alternatives without `logprobs: true`, more than 20.
e = expect(openai.BadRequestError, lambda: real.chat.completions.create(model="smollm2", messages=hello, top_logprobs=3), 400, "top_logprobs", "logprobs: true")
ensure(e.body["param"] == "top_logprobs", "param names top_logprobs", e.body)
e = expect(openai.BadRequestError, lambda: real.chat.completions.create(model="smollm2", messages=hello, logprobs=True, top_logprobs=21), 400, "<= 20")
ensure(e.body["param"] == "top_logprobs", "param names top_logprobs", e.body)
e = expect(openai.BadRequestError, lambda: real.completions.create(model="smollm2", prompt="x", logprobs=21), 400, "<= 20")
ensure(e.body["param"] == "logprobs", "param names logprobs", e.body)
check("chat logprobs")

# Legacy completions and the model list.
c = real.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
ensure(c.object == "text_completion" and "Paris" in c.choices[0].text, 'c.object == "text_completion" and "Paris" in c.choices[0].text', c)
ids = [m.id for m in real.models.list()]
ensure(ids == ["smollm2"], 'ids == ["smollm2"]', ids)
m = real.models.retrieve("smollm2")
ensure(m.id == "smollm2" and m.object == "model", "models.retrieve", m)
expect(openai.NotFoundError, lambda: real.models.retrieve("nope"), 404, "nope", "smollm2")
check("completions and models")

# A batch of prompts (LangChain sends up to 20): one choice per prompt, by `index`, each the same
# text as that prompt asked alone; usage summed; streamed, the choices interleave by index.
prompts = ["The capital of France is", "1, 2, 3, 4,", "Water is made of"]
alone = [
    real.completions.create(model="smollm2", prompt=p, max_tokens=6, temperature=0)
    for p in prompts
]
b = real.completions.create(model="smollm2", prompt=prompts, max_tokens=6, temperature=0)
ensure(sorted(c.index for c in b.choices) == [0, 1, 2], "one choice per prompt", b.choices)
by_index = {c.index: c.text for c in b.choices}
ensure(by_index == {i: a.choices[0].text for i, a in enumerate(alone)}, "each choice answers its prompt", by_index, [a.choices[0].text for a in alone])
ensure(len(set(by_index.values())) == 3, "three different answers", by_index)
ensure(b.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone), "prompt tokens summed", b.usage)
ensure(b.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone), "completion tokens summed", b.usage)
ensure(b.system_fingerprint is not None and b.system_fingerprint.startswith("qnode-"), "system_fingerprint", b)
streamed, finishes, usage = {}, {}, None
for chunk in real.completions.create(model="smollm2", prompt=prompts, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        streamed[c.index] = streamed.get(c.index, "") + c.text
        if c.finish_reason:
            finishes[c.index] = c.finish_reason
ensure(streamed == by_index, "streamed batch == unary batch", streamed, by_index)
ensure(sorted(finishes) == [0, 1, 2], "a finish per prompt", finishes)
ensure(usage is not None and usage.completion_tokens == b.usage.completion_tokens, "streamed usage summed", usage)
check("completions batch")

# Errors → the client's exception types.
expect(
    openai.NotFoundError,
    lambda: real.chat.completions.create(model="nope", messages=hello),
    404,
    "nope",
)
e = expect(
    openai.BadRequestError,
    lambda: real.chat.completions.create(model="smollm2", messages=hello, temperature=5),
    400,
    "temperature",
)
ensure(e.body["param"] == "temperature", 'e.body["param"] == "temperature"', e.body)
expect(
    openai.BadRequestError,
    lambda: real.chat.completions.create(model="smollm2", messages=hello, n=2),
    400,
    "`n` must be 1",
)
expect(
    openai.AuthenticationError,
    lambda: client(real_url, api_key="wrong").chat.completions.create(model="smollm2", messages=hello),
    401,
)
expect(
    openai.AuthenticationError,
    lambda: client(real_url, api_key="wrong").models.list(),
    401,
)
e = expect(
    openai.APIStatusError,
    lambda: client(standby_url).chat.completions.create(model="smollm2", messages=hello),
    503,
    "standby",
)
check("errors: 404, 400, 401, 503")

scripted = client(scripted_url, api_key="unused")
e = expect(
    openai.RateLimitError,
    lambda: scripted.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "queue_full"}]
    ),
    429,
    "full",
)
ensure(e.response.headers["retry-after"] == "3", 'e.response.headers["retry-after"] == "3"', e.response.headers)
check("429 with Retry-After")

# A failure after the stream began reaches the client as an APIError.
try:
    for _ in scripted.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "fail_midway"}], stream=True
    ):
        pass
    raise CheckFailed("stream did not fail")
except openai.APIError as e:
    ensure("scripted failure" in str(e), '"scripted failure" in str(e)', str(e))
check("mid-stream failure")
