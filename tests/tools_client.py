"""Tool calling through the official `openai` Python client and LangChain's `langchain-openai`.

Run by tests/tools_real_model.rs:
    python3 tests/tools_client.py BASE_URL

BASE_URL serves the real SmolLM2 model (`smollm2`), no key. With `tool_choice: required` every
answer over several seeds is one call of a declared function whose arguments validate against its
schema (the `jsonschema` package); a named choice calls that function; the two-step loop (call,
tool result, answer) works; a streamed call, put together from its deltas as SDK users do, equals
the unary one; `auto` gives text or a valid call; an undeclared function is a 400 naming the
field. LangChain: `bind_tools` returns parsed tool calls and runs the loop with `ToolMessage`,
`with_structured_output(method="function_calling")` returns a parsed object. Checks are explicit
(`ensure`, never `assert`, which `python3 -O` strips); the process exits 0 only when all passed.
"""

import json
import sys

import jsonschema
import openai

url = sys.argv[1]
client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)


class CheckFailed(Exception):
    """A check that did not hold."""


def ensure(cond, what, *context):
    if not cond:
        raise CheckFailed(f"check failed: {what}; got {context!r}")


def check(name):
    print(f"ok {name}", flush=True)


SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "multiply": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": {
                "get_weather": "Get the current weather in a city",
                "multiply": "Multiply two integers",
            }[name],
            "parameters": schema,
        },
    }
    for name, schema in SCHEMAS.items()
]
QUESTION = [{"role": "user", "content": "What is the weather like in Berlin?"}]


def valid_call(call):
    """A call of a declared function whose arguments validate; returns (name, arguments)."""
    ensure(call.type == "function", "type function", call)
    ensure(call.id.startswith("call_"), "call id", call.id)
    name = call.function.name
    ensure(name in SCHEMAS, "a declared function", name)
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[name])
    return name, arguments


def one_call(response):
    choice = response.choices[0]
    ensure(choice.finish_reason == "tool_calls", "finish_reason tool_calls", choice)
    ensure(choice.message.content is None, "no content with a call", choice.message)
    ensure(len(choice.message.tool_calls) == 1, "one call", choice.message)
    return choice.message.tool_calls[0]


def ask(messages, **kwargs):
    kwargs.setdefault("max_tokens", 64)
    return client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, **kwargs
    )


def required_over_seeds():
    for seed in range(1, 6):
        call = one_call(ask(QUESTION, tool_choice="required", seed=seed, temperature=0.9))
        name, arguments = valid_call(call)
        print(f"  seed {seed}: {name} {arguments}", flush=True)
    check("required: a valid call over 5 seeds")


def named():
    call = one_call(
        ask(
            QUESTION,
            tool_choice={"type": "function", "function": {"name": "multiply"}},
            temperature=0,
        )
    )
    ensure(valid_call(call)[0] == "multiply", "the named function", call)
    check("named choice")


def tool_loop():
    first = ask(QUESTION, tool_choice="required", temperature=0)
    call = one_call(first)
    # As OpenAI's guide does it: the response's message object itself goes back.
    messages = QUESTION + [
        first.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": "12 degrees, light rain"},
    ]
    answer = ask(messages, tool_choice="none", temperature=0, max_tokens=48)
    choice = answer.choices[0]
    ensure(choice.message.tool_calls is None, "no call with none", choice)
    ensure(isinstance(choice.message.content, str) and choice.message.content, "text", choice)
    print(f"  answer after the tool: {choice.message.content!r}", flush=True)
    check("two-step loop: call, tool result, answer")


def streamed_equals_unary():
    kwargs = dict(
        tool_choice="required",
        seed=11,
        temperature=0.7,
        extra_body={"cache_policy": "bypass"},
    )
    unary = one_call(ask(QUESTION, **kwargs))
    calls = {}
    finish = None
    for chunk in ask(QUESTION, stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                c["id"] += d.id or ""
                c["name"] += (d.function and d.function.name) or ""
                c["arguments"] += (d.function and d.function.arguments) or ""
    ensure(finish == "tool_calls", "streamed finish_reason", finish)
    ensure(list(calls) == [0], "one streamed call at index 0", calls)
    ensure(calls[0]["id"].startswith("call_"), "streamed id", calls)
    got = (calls[0]["name"], calls[0]["arguments"])
    want = (unary.function.name, unary.function.arguments)
    ensure(got == want, "streamed call equals unary", got, want)
    check("stream equals unary")


def streamed_text_equals_unary():
    # Greedy: SmolLM2 writes text for this one (it calls a tool for most questions).
    kwargs = dict(tool_choice="auto", temperature=0, extra_body={"cache_policy": "bypass"})
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    unary = ask(messages, **kwargs).choices[0]
    ensure(unary.message.tool_calls is None, "a text answer", unary)
    pieces, finish = [], None
    for chunk in ask(messages, stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            ensure(not choice.delta.tool_calls, "no call", choice)
            if choice.delta.content:
                pieces.append(choice.delta.content)
    ensure(len(pieces) > 3, "text streamed as written", pieces)
    ensure("".join(pieces) == unary.message.content, "stream equals unary", pieces, unary)
    ensure(finish == unary.finish_reason, "finish", finish, unary.finish_reason)
    check("auto: a text answer streams as written")


def auto():
    for seed in (1, 2):
        choice = ask(
            [{"role": "user", "content": "Hello! How are you?"}],
            tool_choice="auto",
            seed=seed,
            temperature=0.8,
        ).choices[0]
        if choice.message.tool_calls:
            ensure(choice.finish_reason == "tool_calls", "finish", choice)
            valid_call(choice.message.tool_calls[0])
        else:
            ensure(isinstance(choice.message.content, str), "text", choice)
            ensure(choice.finish_reason in ("stop", "length"), "finish", choice)
    check("auto: text or a valid call")


def refused():
    try:
        ask(QUESTION, tool_choice={"type": "function", "function": {"name": "nope"}})
    except openai.BadRequestError as e:
        ensure(e.body["param"] == "tool_choice.function.name", "param", e.body)
    else:
        raise CheckFailed("an undeclared function was accepted")
    check("undeclared function refused")


def langchain():
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"12 degrees in {city}"

    llm = ChatOpenAI(
        base_url=url, api_key="unused", model="smollm2", temperature=0, max_tokens=64,
        max_retries=0,
    )
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("What is the weather like in Berlin?")
    ai = bound.invoke([question])
    ensure(len(ai.tool_calls) == 1, "one parsed call", ai)
    call = ai.tool_calls[0]
    ensure(call["name"] == "get_weather", "name", call)
    ensure(isinstance(call["args"].get("city"), str), "parsed args", call)
    result = get_weather.invoke(call["args"])
    answer = llm.bind_tools([get_weather], tool_choice="none").invoke(
        [question, ai, ToolMessage(result, tool_call_id=call["id"])]
    )
    ensure(isinstance(answer.content, str) and answer.content, "answer text", answer)
    ensure(not answer.tool_calls, "no call", answer)
    check("langchain bind_tools and the tool loop")

    class Person(BaseModel):
        """A person."""

        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    structured = llm.with_structured_output(Person, method="function_calling")
    person = structured.invoke("Invent a person: name and age.")
    ensure(isinstance(person, Person), "a parsed Person", person)
    print(f"  {person!r}", flush=True)
    check("langchain with_structured_output (function_calling)")


def main():
    for test in (required_over_seeds, named, tool_loop, streamed_equals_unary,
                 streamed_text_equals_unary, auto, refused, langchain):
        test()
    print("all tool checks passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)
