"""Responses kept in memory for `previous_response_id`, GET, DELETE and `item_reference`.

Each stored response holds its response object, its own input items and the whole
conversation up to and including its output (the conversation of the response it continued,
then its input, then its output), so a chain of responses is a list of shared item dicts,
however long it grows. The store keeps the most recently stored or used `capacity` responses
and forgets the oldest: a `previous_response_id` it no longer holds is a 404 that says so.
Nothing is written to disk; a restarted server starts empty.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from runtime.generation.response_events import new_id
from runtime.server.requests import ApiError

CAPACITY = 256  # responses


def _normalized(item: dict) -> dict:
    """An input item as OpenAI lists it: with an id and a type, a message's text as parts."""
    kind = item.get("type") or "message"
    out = {"id": item.get("id") or new_id(kind), **item, "type": kind}
    if kind == "message" and isinstance(out.get("content"), str):
        part = "output_text" if out.get("role") == "assistant" else "input_text"
        out["content"] = [{"type": part, "text": out["content"]}] if part == "input_text" else \
            [{"type": part, "text": out["content"], "annotations": []}]
        out.setdefault("status", "completed")
    return out


@dataclass(frozen=True)
class Stored:
    response: dict
    input: list[dict]  # this response's own input items, each with an id
    conversation: list[dict]  # every item from the start of the chain through this output


class ResponseStore:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._held: collections.OrderedDict[str, Stored] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def get(self, response_id: str, param: str | None = None) -> Stored:
        held = self._held.get(response_id)
        if held is None:
            raise ApiError(404, f"no response with id '{response_id}' is stored here (this server keeps the last "
                                f"{self.capacity} responses stored with 'store': true, in memory, until it restarts)",
                           param=param, code="response_not_found", kind="not_found_error")
        self._held.move_to_end(response_id)
        return held

    def put(self, response: dict, inputs: list[dict], history: list[dict]) -> None:
        """`inputs`: this response's own input items; `history`: the conversation it continued."""
        given = [_normalized(item) for item in inputs]
        self._held[response["id"]] = Stored(response, given, history + given + response["output"])
        self._held.move_to_end(response["id"])
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._held[response_id]

    def item(self, item_id: str, where: str) -> dict:
        """A stored item by its id (an `item_reference`), from the newest response holding it."""
        for held in reversed(self._held.values()):
            for item in held.conversation:
                if item.get("id") == item_id:
                    return item
        raise ApiError(404, f"{where}: no stored item has the id '{item_id}'", param=where, code="item_not_found",
                       kind="not_found_error")
