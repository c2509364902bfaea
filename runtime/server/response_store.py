"""Responses kept in memory for `previous_response_id`, GET, DELETE and `item_reference`.

Each stored response holds its response object, its own input items and the whole
conversation up to and including its output (the conversation of the response it continued,
then its input, then its output), so a chain of responses is a list of shared item dicts,
however long it grows. The store keeps the `capacity` responses most recently stored or used
(and no more than `max_bytes` of their own items' JSON) and forgets the oldest: a `previous_response_id` it no longer holds is a 404 that says so.
Nothing is written to disk; a restarted server starts empty.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass

from runtime.generation.response_events import new_id
from runtime.server.requests import ApiError

CAPACITY = 256  # responses
MAX_BYTES = 256 * 2**20  # of their own input and output items' JSON, all together


def _normalized(item: dict) -> dict:
    """An input item as OpenAI lists it: with an id and a type, a message's text as parts.
    A reasoning item's `encrypted_content` is left out: nothing here reads it, and a client's
    can be megabytes (review 88: 7 MiB each)."""
    kind = item.get("type") or "message"
    out = {k: v for k, v in item.items() if k != "encrypted_content"}
    out.update(id=item.get("id") or new_id(kind), type=kind)  # an explicit null id gets one too
    if kind == "message":
        if isinstance(out.get("content"), str):
            part = "output_text" if out.get("role") == "assistant" else "input_text"
            out["content"] = [{"type": part, "text": out["content"]}] if part == "input_text" else \
                [{"type": part, "text": out["content"], "annotations": []}]
        if out.get("status") is None:
            out["status"] = "completed"
    return out


def _size(items: list[dict]) -> int:
    return sum(len(json.dumps(item, ensure_ascii=False)) for item in items)


@dataclass(frozen=True)
class Stored:
    response: dict
    input: list[dict]  # this response's own input items, each with an id
    conversation: list[dict]  # every item from the start of the chain through this output


class ResponseStore:
    def __init__(self, capacity: int = CAPACITY, max_bytes: int = MAX_BYTES):
        self.capacity, self.max_bytes = capacity, max_bytes
        self._held: collections.OrderedDict[str, Stored] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def get(self, response_id: str, param: str | None = None) -> Stored:
        held = self._held.get(response_id)
        if held is None:
            raise ApiError(404, f"no response with id '{response_id}' is stored here (this server keeps, in memory "
                                f"until it restarts, the {self.capacity} responses stored with 'store': true or used "
                                f"most recently, up to {self.max_bytes >> 20} MiB of items)",
                           param=param, code="response_not_found", kind="not_found_error")
        self._held.move_to_end(response_id)
        return held

    def put(self, response: dict, inputs: list[dict], history: list[dict]) -> None:
        """`inputs`: this response's own input items; `history`: the conversation it continued."""
        given = [_normalized(item) for item in inputs]
        rid = response["id"]
        self._held[rid] = Stored(response, given, history + given + response["output"])
        self._sizes[rid] = _size(given) + _size(response["output"])
        self.bytes += self._sizes[rid]
        while len(self._held) > self.capacity or (self.bytes > self.max_bytes and len(self._held) > 1):
            self._forget(next(iter(self._held)))

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        self._forget(response_id)

    def _forget(self, response_id: str) -> None:
        del self._held[response_id]
        self.bytes -= self._sizes.pop(response_id)

    def item(self, item_id, where: str) -> dict:
        """A stored item by its id (an `item_reference`), from the newest response holding it."""
        if not isinstance(item_id, str):
            raise ApiError(400, f"{where}: an item reference needs the string 'id' of a stored item", param=where,
                           code="invalid_value")
        for held in reversed(self._held.values()):
            for item in held.conversation:
                if item.get("id") == item_id:
                    return item
        raise ApiError(404, f"{where}: no stored item has the id '{item_id}'", param=where, code="item_not_found",
                       kind="not_found_error")
