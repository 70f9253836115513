"""JSON-schema adherence: our own generated tasks (a schema and a request), asked in persona.

The tasks are made here, deterministically from their index: ten record kinds a character might
be asked to fill in (a profile, an inventory, a schedule, ...), each with varied required fields,
bounds and enums. The answer passes when the first JSON value in it (a fenced block, else the
first balanced ``{...}``) parses and validates against the schema with the ``jsonschema`` library.
"""

from __future__ import annotations

import json
import random
import re

from .items import GenItem
from .packages import MissingPackageError

SUITE = "json_schema"
N_TASKS = 200
_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

_S = {"type": "string", "minLength": 1}
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def _obj(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _profile(r: random.Random):
    k = r.randint(1, 3)
    props = {"name": _S, "age": {"type": "integer", "minimum": 0, "maximum": 150}, "occupation": _S,
             "hobbies": {"type": "array", "items": _S, "minItems": k}}
    required = ["name"] + r.sample(["age", "occupation", "hobbies"], r.randint(1, 3))
    return _obj(props, required), f"yourself (with at least {k} hobbies if you list them)"


def _inventory(r: random.Random):
    k = r.randint(2, 4)
    item = _obj({"name": _S, "quantity": {"type": "integer", "minimum": 1}}, ["name", "quantity"])
    return _obj({"owner": _S, "items": {"type": "array", "items": item, "minItems": k}}, ["owner", "items"]), \
        f"what you carry with you: at least {k} items"


def _schedule(r: random.Random):
    day = r.choice(_WEEKDAYS)
    event = _obj({"time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}, "activity": _S}, ["time", "activity"])
    props = {"day": {"type": "string", "enum": _WEEKDAYS}, "events": {"type": "array", "items": event, "minItems": 2}}
    return _obj(props, ["day", "events"]), f"your plans for {day} (times as HH:MM)"


def _review(r: random.Random):
    top = r.choice([5, 10])
    thing = r.choice(["book", "film", "meal", "song", "city"])
    props = {"title": _S, "rating": {"type": "integer", "minimum": 1, "maximum": top}, "recommend": {"type": "boolean"},
             "summary": {"type": "string", "maxLength": r.choice([120, 200])}}
    return _obj(props, ["title", "rating", "recommend"] + (["summary"] if r.random() < 0.5 else [])), \
        f"your review of a {thing} you know, rated 1 to {top}"


def _order(r: random.Random):
    line = _obj({"product": _S, "price": {"type": "number", "minimum": 0}}, ["product", "price"])
    props = {"customer": _S, "items": {"type": "array", "items": line, "minItems": 1}, "total": {"type": "number", "minimum": 0},
             "express": {"type": "boolean"}}
    return _obj(props, ["customer", "items", "total"] + (["express"] if r.random() < 0.5 else [])), \
        "a shopping order you would place"


def _weather(r: random.Random):
    conditions = r.sample(["sunny", "cloudy", "rainy", "snowy", "windy", "foggy"], 4)
    props = {"city": _S, "temperature_c": {"type": "number", "minimum": -60, "maximum": 60},
             "condition": {"type": "string", "enum": conditions}, "wind_kph": {"type": "number", "minimum": 0}}
    return _obj(props, ["city", "temperature_c", "condition"]), \
        f"today's weather where you are (condition one of {', '.join(conditions)})"


def _contact(r: random.Random):
    props = {"name": _S, "email": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+\\.[a-z]+$"}, "phone": _S,
             "tags": {"type": "array", "items": _S, "uniqueItems": True, "maxItems": r.randint(2, 4)}}
    return _obj(props, ["name", "email"] + r.sample(["phone", "tags"], r.randint(0, 2))), "your contact card"


def _travel(r: random.Random):
    most = r.choice([7, 14, 30])
    props = {"destination": _S, "days": {"type": "integer", "minimum": 1, "maximum": most},
             "budget_usd": {"type": "number", "minimum": 0}, "companions": {"type": "array", "items": _S, "maxItems": 5}}
    return _obj(props, ["destination", "days"] + r.sample(["budget_usd", "companions"], r.randint(1, 2))), \
        f"a trip you would like to take (at most {most} days)"


def _recipe(r: random.Random):
    k = r.randint(2, 5)
    props = {"dish": _S, "servings": {"type": "integer", "minimum": 1, "maximum": 20},
             "ingredients": {"type": "array", "items": _S, "minItems": k}, "vegetarian": {"type": "boolean"}}
    return _obj(props, ["dish", "ingredients"] + r.sample(["servings", "vegetarian"], r.randint(1, 2))), \
        f"a dish you like to cook, with at least {k} ingredients"


def _event(r: random.Random):
    props = {"event": _S, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
             "guests": {"type": "integer", "minimum": 0}, "rsvp_required": {"type": "boolean"}}
    return _obj(props, ["event", "date"] + r.sample(["guests", "rsvp_required"], r.randint(1, 2))), \
        "an event you are inviting people to (date as YYYY-MM-DD)"


TEMPLATES = (_profile, _inventory, _schedule, _review, _order, _weather, _contact, _travel, _recipe, _event)


def make_task(index: int) -> GenItem:
    """Task ``index``: kind ``index % 10``, details drawn with ``random.Random(index)``."""
    r = random.Random(index)
    template = TEMPLATES[index % len(TEMPLATES)]
    schema, topic = template(r)
    user = ("Reply with one JSON object, and nothing else, that follows this JSON Schema:\n"
            f"```json\n{json.dumps(schema)}\n```\nThe object should describe {topic}.")
    return GenItem(SUITE, f"json/{index}:{template.__name__[1:]}", user, {"schema": schema})


def load_items() -> list[GenItem]:
    """The ``N_TASKS`` generated tasks."""
    return [make_task(i) for i in range(N_TASKS)]


def _first_object(text: str) -> str | None:
    start = text.find("{")
    while start >= 0:
        depth, in_string, escaped = 0, False, False
        for pos in range(start, len(text)):
            ch = text[pos]
            if in_string:
                escaped = ch == "\\" and not escaped
                if ch == '"' and not escaped:
                    in_string = False
                continue
            if ch == '"':
                in_string = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:pos + 1]
        start = text.find("{", start + 1)
    return None


def extract_json(answer: str):
    """The answer's JSON value (fenced block first, else the first balanced object), or raise ``ValueError``."""
    for block in _FENCE.findall(answer):
        try:
            return json.loads(block)
        except json.JSONDecodeError:
            pass
    candidate = _first_object(answer)
    if candidate is None:
        raise ValueError("no JSON object in the answer")
    return json.loads(candidate)


def score(item: GenItem, answer: str) -> dict:
    """``valid`` = 1 when the answer's JSON parses and validates against the task's schema; ``parsed`` when it parses."""
    try:
        import jsonschema
    except ImportError as error:
        raise MissingPackageError("the json_schema suite needs jsonschema; install it with `pip install jsonschema`") from error
    try:
        value = extract_json(answer)
    except ValueError:
        return {"valid": 0.0, "parsed": 0.0, "error": "no parseable JSON"}
    validator = jsonschema.Draft202012Validator(item.data["schema"])
    error = next(iter(validator.iter_errors(value)), None)
    return {"valid": float(error is None), "parsed": 1.0, "error": None if error is None else error.message[:160]}
