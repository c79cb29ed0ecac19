"""An orjson response class for the hot path (numpy arrays serialize directly, no Python lists in between)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class OrjsonResponse(Response):
    """JSON rendered by orjson; numpy arrays and scalars included (OPT_SERIALIZE_NUMPY)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
