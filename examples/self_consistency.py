"""Self-consistency over `stepstream serve`: one request asks for several sampled answers
(OpenAI's `n`), each held to a JSON schema, and the most frequent answer wins.

    stepstream serve -m MODEL.gguf            # in another terminal
    python examples/self_consistency.py "Is 91 a prime number?" --choices yes no -n 7

The choices run one after another on the server, each after the first finding the prompt in
its cache, so seven answers cost the prompt once. A `--seed` makes the vote reproducible
(choice j samples with seed + j). Needs `pip install openai`. The embedded miniature was
trained on Python sources, so its votes are noise; the mechanics are the same. No server at
--base-url, or one that refuses a request, is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

from runtime.base.errors import StepstreamError
from runtime.cli import SubcommandParser
from runtime.cli.arg_types import positive_int

try:
    import openai
    from openai import OpenAI
except ImportError:
    print("error: this example needs the openai client: pip install openai", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    p = SubcommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question")
    p.add_argument("--choices", nargs="+", default=["yes", "no"], help="the answers to vote between")
    p.add_argument("-n", type=positive_int, default=7, help="sampled answers (at most 128)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="none")
    args = p.parse_args()
    try:
        vote(args)
    except StepstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def vote(args) -> None:
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    schema = {"type": "object", "properties": {"answer": {"enum": args.choices}}, "required": ["answer"],
              "additionalProperties": False}
    try:
        model = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=model, n=args.n, temperature=args.temperature, seed=args.seed, max_tokens=400,
            messages=[{"role": "user", "content": f"{args.question} Answer with one of: {', '.join(args.choices)}."}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            extra_body={"thinking_budget_tokens": 64})  # (a short reasoning before the JSON)
    except openai.APIConnectionError as e:
        raise StepstreamError(f"cannot reach the server at --base-url {args.base_url} ({e.__cause__ or e}); start "
                              "`stepstream serve -m MODEL.gguf` first, or give its URL") from None
    except openai.APIStatusError as e:
        raise StepstreamError(f"the server at --base-url {args.base_url} answered {e.status_code}: {e.message}") from None
    votes = collections.Counter()
    for choice in r.choices:
        if choice.finish_reason == "stop":  # (a reply cut at max_tokens holds no whole answer)
            votes[json.loads(choice.message.content)["answer"]] += 1
    for answer, count in votes.most_common():
        print(f"{answer}: {count}")
    if not votes:
        raise StepstreamError(f"none of the {args.n} replies finished within 400 tokens")
    answer, count = votes.most_common(1)[0]
    print(f"answer: {answer} ({count} of {sum(votes.values())}; {r.usage.prompt_tokens} prompt tokens, "
          f"{r.usage.completion_tokens} generated)")


if __name__ == "__main__":
    main()
