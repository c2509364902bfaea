"""An agent loop over `stepstream serve`: the model may call a Python tool, we run it and send
the result back, until it answers in plain text.

    stepstream serve -m MODEL.gguf            # in another terminal
    python examples/agent_tool_loop.py "How many lines does /etc/hosts have?"
    python examples/agent_tool_loop.py --api responses "..."   # the same over /v1/responses
    python examples/agent_tool_loop.py --api messages "..."    # over Anthropic's /v1/messages (pip install anthropic)

Needs `pip install openai`. The embedded miniature was trained on Python sources, not on tool
use, so it answers in text; a real Step-3.5-Flash GGUF calls the tool. No server at --base-url,
or one that refuses a request, is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.cli import SubcommandParser
from runtime.cli.arg_types import positive_int

try:
    import openai
    from openai import OpenAI
except ImportError:
    print("error: this example needs the openai client: pip install openai", file=sys.stderr)
    sys.exit(2)

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
    p = SubcommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--steps", type=positive_int, default=4, help="most tool rounds before giving up")
    p.add_argument("--api", choices=("chat", "responses", "messages"), default="chat",
                   help="chat completions (the whole conversation each round), the Responses API (each round "
                        "sends the tool results and the previous response's id) or Anthropic's Messages API")
    args = p.parse_args()
    try:
        loop(args)
    except StepstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def loop(args) -> None:
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    models = ask(args, lambda: client.models.list().data)
    if not models:
        raise StepstreamError(f"the server at {args.base_url} lists no model")
    {"chat": chat_loop, "responses": responses_loop, "messages": messages_loop}[args.api](args, client, models[0].id)


def run_tool(name: str, arguments: str) -> str:
    arguments = json.loads(arguments)
    result = count_lines(str(arguments.get("path", ""))) if name == "count_lines" else "error: no such tool"
    print(f"[tool] {name}({arguments}) -> {result}")
    return result


def chat_loop(args, client, model) -> None:
    messages = [{"role": "user", "content": args.question}]
    for _ in range(args.steps):
        reply = ask(args, lambda: client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                                                 max_tokens=256, temperature=0).choices[0].message)
        messages.append(reply.model_dump(exclude_none=True))
        if not reply.tool_calls:
            print(reply.content)
            return
        for call in reply.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": run_tool(call.function.name, call.function.arguments)})
    print("(no answer after", args.steps, "tool rounds)")


def responses_loop(args, client, model) -> None:
    tools = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's flat tools
    given, previous = args.question, None
    for _ in range(args.steps):
        response = ask(args, lambda: client.responses.create(model=model, input=given, tools=tools,
                                                             previous_response_id=previous, max_output_tokens=256,
                                                             temperature=0))
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            print(response.output_text)
            return
        given = [{"type": "function_call_output", "call_id": c.call_id, "output": run_tool(c.name, c.arguments)}
                 for c in calls]
        previous = response.id
    print("(no answer after", args.steps, "tool rounds)")


def messages_loop(args, client, model) -> None:
    """Anthropic's protocol, as Claude Code speaks it: tool_use blocks out, tool_result blocks back."""
    try:
        import anthropic
    except ImportError:
        raise StepstreamError("--api messages needs the anthropic client: pip install anthropic") from None
    claude = anthropic.Anthropic(base_url=args.base_url.removesuffix("/v1"), api_key=args.api_key)
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    messages = [{"role": "user", "content": args.question}]
    for _ in range(args.steps):
        try:
            reply = claude.messages.create(model=model, max_tokens=256, tools=tools, messages=messages)
        except anthropic.APIError as e:
            raise StepstreamError(f"the server at --base-url {args.base_url} refused the request: {e}") from None
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
        uses = [b for b in reply.content if b.type == "tool_use"]
        if not uses:
            print("".join(b.text for b in reply.content if b.type == "text"))
            return
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": u.id, "content": run_tool(u.name, json.dumps(u.input))}
            for u in uses]})
    print("(no answer after", args.steps, "tool rounds)")


def ask(args, request):
    """`request()`, with the client's failures worded for the user: no server, or a refusal."""
    try:
        return request()
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        raise StepstreamError(f"cannot reach the server at --base-url {args.base_url} ({type(cause).__name__}: "
                              f"{cause}); start `stepstream serve -m MODEL.gguf` first, or give its URL") from None
    except openai.APIStatusError as e:
        raise StepstreamError(f"the server at --base-url {args.base_url} answered {e.status_code}: {e.message}; is "
                              "it `stepstream serve` (the URL ends in /v1), and is --api-key right?") from None


if __name__ == "__main__":
    main()
