"""An agent loop over `stepstream serve`: the model may call a Python tool, we run it and send
the result back, until it answers in plain text.

    stepstream serve -m MODEL.gguf            # in another terminal
    python examples/agent_tool_loop.py "How many lines does /etc/hosts have?"

Needs `pip install openai`. The embedded miniature was trained on Python sources, not on tool
use, so it answers in text; a real Step-3.5-Flash GGUF calls the tool.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from openai import OpenAI

TOOLS = [{
    "type": "function",
    "function": {
        "name": "count_lines",
        "description": "Count the lines of a text file on this machine.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    },
}]


def count_lines(path: str) -> str:
    try:
        return str(len(Path(path).read_text(errors="replace").splitlines()))
    except OSError as e:
        return f"error: {e.strerror}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("question")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--steps", type=int, default=4, help="most tool rounds before giving up")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.question}]
    for _ in range(args.steps):
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=256,
                                               temperature=0).choices[0].message
        messages.append(reply.model_dump(exclude_none=True))
        if not reply.tool_calls:
            print(reply.content)
            return
        for call in reply.tool_calls:
            arguments = json.loads(call.function.arguments)
            result = count_lines(str(arguments.get("path", ""))) if call.function.name == "count_lines" else "error: no such tool"
            print(f"[tool] {call.function.name}({arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    print("(no answer after", args.steps, "tool rounds)")


if __name__ == "__main__":
    main()
