"""Constrained output (`response_format`) through the official `openai` Python client.

Run by tests/constrained_output.rs:
    python3 tests/constrained_client.py BASE_URL

BASE_URL serves the real SmolLM2 model (`smollm2`), no key. Every json_schema answer over several
schemas and seeds must parse and validate (the `jsonschema` package); every json_object answer
must parse as an object; a streamed constrained answer equals the unary one; a schema the node
cannot enforce is a 400 naming the field. Checks are explicit (`ensure`, never `assert`, which
`python3 -O` strips); the process exits 0 only when all passed.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

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
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "maxLength": 30},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "location": {
                "type": "object",
                "properties": {
                    # Whole degrees: with an unbounded `number` SmolLM2 can loop on digits
                    # ("180.0000…") until max_tokens, which cuts the JSON (README: structured
                    # output). Numbers stay covered by "array".
                    "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                    "lon": {"type": "integer", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "location"],
        "additionalProperties": False,
    },
    "enum_and_bool": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "bright": {"type": "boolean"},
            "level": {"type": "integer", "enum": [1, 2, 3]},
        },
        "required": ["color", "bright", "level"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "fruits": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1,
                "maxItems": 4,
            },
            "prices": {
                "type": "array",
                "items": {"type": "number", "minimum": 0, "maximum": 100},
                "maxItems": 3,
            },
        },
        "required": ["fruits", "prices"],
        "additionalProperties": False,
    },
}

PROMPTS = {
    "person": "Describe a fictional person as JSON with name, age and email.",
    "nested": "Give a city and its coordinates as JSON.",
    "enum_and_bool": "Pick a color as JSON.",
    "array": "List some fruits and their prices as JSON.",
}

SEEDS = [1, 2, 3]


def schema_format(name):
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
    }


def ask(name, seed):
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": PROMPTS[name]}],
        response_format=schema_format(name),
        temperature=0.9,
        seed=seed,
        max_tokens=120,
    )
    return name, seed, r


# Every schema over every seed, eight at a time (the node batches them).
jobs = [(name, seed) for name in SCHEMAS for seed in SEEDS]
with ThreadPoolExecutor(max_workers=8) as pool:
    answers = list(pool.map(lambda job: ask(*job), jobs))
distinct = {}
for name, seed, r in answers:
    choice = r.choices[0]
    ensure(choice.finish_reason == "stop", "finish_reason == stop", name, seed, choice)
    text = choice.message.content
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CheckFailed(f"{name} seed {seed}: not JSON: {text!r} ({e})")
    try:
        jsonschema.validate(value, SCHEMAS[name])
    except jsonschema.ValidationError as e:
        raise CheckFailed(f"{name} seed {seed}: {text!r} does not validate: {e.message}")
    distinct.setdefault(name, set()).add(text)
    print(f"  {name} seed {seed}: {text}", flush=True)
# Sampling is real: some schema got different answers for different seeds.
ensure(any(len(v) > 1 for v in distinct.values()), "seeds give different answers", distinct)
check(f"json_schema: {len(answers)} answers over {len(SCHEMAS)} schemas parse and validate")

# The pydantic path of the client: `parse` sends a strict json_schema and parses the answer.
# pydantic is a dependency of the openai package, so it is always there: no skip.
import pydantic  # noqa: E402


class City(pydantic.BaseModel):
    # Bounded strings: a 135M model left free in a string may never close it.
    name: str = pydantic.Field(max_length=24)
    country: str = pydantic.Field(max_length=24)
    population: int = pydantic.Field(ge=0, le=100_000_000)

try:
    parsed = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Tell me about Paris as JSON."}],
        response_format=City,
        temperature=0,
        max_tokens=120,
    )
except openai.LengthFinishReasonError as e:
    raise CheckFailed(f"parse hit max_tokens: {e.completion.choices[0].message.content!r}")
city = parsed.choices[0].message.parsed
ensure(isinstance(city, City), "parsed into the pydantic model", parsed)
check(f"client.chat.completions.parse -> {city!r}")

# json_object: any object, greedy and sampled.
for seed in [None, 5, 6]:
    r = client.chat.completions.create(
        model="smollm2",
        messages=[
            {
                "role": "user",
                "content": 'Reply with a JSON object like {"name": "Rex", "breed": "collie"} for a dog.',
            }
        ],
        response_format={"type": "json_object"},
        temperature=0 if seed is None else 0.7,
        seed=seed,
        max_tokens=160,
    )
    text = r.choices[0].message.content
    print(f"  json_object seed {seed}: {text}", flush=True)
    ensure(r.choices[0].finish_reason == "stop", "json_object finished", text)
    value = json.loads(text)
    ensure(isinstance(value, dict), "json_object is an object", text)
check("json_object answers parse as objects")

# Streamed equals unary for a seeded constrained request.
kwargs = dict(
    model="smollm2",
    messages=[{"role": "user", "content": PROMPTS["person"]}],
    response_format=schema_format("person"),
    temperature=0.8,
    seed=42,
    max_tokens=120,
)
whole = client.chat.completions.create(**kwargs).choices[0].message.content
streamed, finish = "", None
for chunk in client.chat.completions.create(stream=True, **kwargs):
    if chunk.choices:
        streamed += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
ensure(streamed == whole, "streamed == unary", streamed, whole)
ensure(finish == "stop", "stream finish_reason == stop", finish)
jsonschema.validate(json.loads(streamed), SCHEMAS["person"])
check("streamed constrained answer equals the unary one")

# Legacy completions take response_format too.
r = client.completions.create(
    model="smollm2",
    prompt="A JSON object describing a cat: ",
    extra_body={"response_format": {"type": "json_object"}},
    temperature=0,
    max_tokens=80,
)
ensure(isinstance(json.loads(r.choices[0].text), dict), "completion json_object", r.choices[0].text)
check("completions honour response_format")


# Refusals name the field.
def refused(response_format, param, needle):
    try:
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            response_format=response_format,
            max_tokens=8,
        )
    except openai.BadRequestError as e:
        ensure(e.status_code == 400, "400", e)
        body = e.body if isinstance(e.body, dict) else {}
        ensure(body.get("param") == param, "param names the field", param, e.body)
        ensure(needle in str(e), "message says why", needle, str(e))
        return
    raise CheckFailed(f"{response_format!r} was accepted")


refused(
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
    "response_format.json_schema.schema",
    "is not a valid JSON schema",
)
refused({"type": "yaml"}, "response_format.type", "must be one of")
refused({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "is required")
check("invalid response_format refused with 400 naming the field")
