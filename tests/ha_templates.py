"""Home Assistant's side of MQTT discovery, as far as tests need it: render a discovery config's
``value_template`` against a state payload the way Home Assistant does (Jinja2 in a sandbox,
``value`` the payload text, ``value_json`` the payload parsed as JSON; undefined names are errors
here, so a template pointing at a field the payload does not have fails the test)."""

from __future__ import annotations

import json
from typing import Any

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined)


def render(template: str, payload: bytes | str) -> str:
    text = payload.decode() if isinstance(payload, bytes) else payload
    value_json: Any = json.loads(text)
    return _ENV.from_string(template).render(value=text, value_json=value_json).strip()


def is_number_or_unknown(rendered: str) -> bool:
    """A numeric sensor's state: a number, or ``None`` (Home Assistant shows *unknown*)."""
    if rendered == "None":
        return True
    try:
        float(rendered)
    except ValueError:
        return False
    return True
