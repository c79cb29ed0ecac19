"""A small job spec the gateway tests submit and a parser of the Server-Sent Events they read back."""

from __future__ import annotations

import json

#: A job that trains in seconds on the built-in `digits` dataset.
SPEC = {"name": "digits-demo", "dataset": "digits", "epochs": 2, "architecture": {"type": "dense", "hidden_units": [16]}}


def parse_sse(text: str) -> list[dict]:
    """Server-Sent Events as dicts with id, event and the decoded data (comments skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events
