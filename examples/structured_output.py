"""Structured output from a pydantic model: the reply is JSON the model's schema accepts, bounds,
patterns and dates included, then parsed back into the model.

    python examples/structured_output.py                 # the embedded miniature
    python examples/structured_output.py MODEL.gguf "Plan a trip to Oslo."

Needs pydantic (`pip install pydantic`). The embedded miniature was trained on Python sources,
so its values are odd, but they always validate; a real Step-3.5-Flash GGUF fills them in
sensibly. A schema the recognizer cannot enforce is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import runtime
from runtime.base.errors import StepstreamError

try:
    from pydantic import BaseModel, Field
except ImportError:
    print("error: this example needs pydantic: pip install pydantic", file=sys.stderr)
    sys.exit(2)

EMBEDDED = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"


class Trip(BaseModel):
    city: Annotated[str, Field(min_length=1, max_length=40)]
    country_code: Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
    start: date
    nights: Annotated[int, Field(ge=1, le=30)]
    budget_eur: Annotated[float, Field(gt=0, le=20000)]
    sights: Annotated[list[str], Field(max_length=3)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(EMBEDDED), help="a step35 GGUF (default: the embedded miniature)")
    p.add_argument("prompt", nargs="?", default="Plan a short trip. Answer in JSON.")
    p.add_argument("-t", "--threads", type=int, default=None)
    args = p.parse_args(argv)
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": Trip.model_json_schema()}}
    try:
        with runtime.load(args.model, n_ctx=2048, n_threads=args.threads) as model:
            r = model.create_chat_completion([{"role": "user", "content": args.prompt}], max_tokens=1500,
                                             temperature=0.7, seed=1, response_format=fmt)
    except StepstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    choice = r["choices"][0]
    if choice["finish_reason"] != "stop":
        print(f"the reply was cut at {r['usage']['completion_tokens']} tokens: {choice['message']['content']}",
              file=sys.stderr)
        return 1
    print(repr(Trip.model_validate_json(choice["message"]["content"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
