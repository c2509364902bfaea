"""Text in a fixed shape with a GBNF grammar (llama.cpp's format): a review's verdict and three
reasons as a Markdown list, the shape a script can parse without a JSON schema.

    python examples/grammar_output.py                                  # the embedded miniature
    python examples/grammar_output.py MODEL.gguf "Review: the battery dies by noon."
    python examples/grammar_output.py MODEL.gguf "..." --grammar-file my.gbnf

The same grammar works with `stepstream run --grammar-file`, the server's `grammar` field and
llama-cpp-python's LlamaGrammar. The embedded miniature was trained on Python sources, so its
words are odd, but the shape always holds. A grammar that cannot be used is one line on stderr
(its line and column) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import runtime
from runtime.base.errors import StepstreamError

EMBEDDED = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
VERDICT = r"""
root    ::= "Verdict: " verdict "\n" reason{3}
verdict ::= "positive" | "negative" | "mixed"
reason  ::= "- " [A-Za-z0-9] [^\n]{0,60} "\n"
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(EMBEDDED), help="a step35 GGUF (default: the embedded miniature)")
    p.add_argument("review", nargs="?", default="Review: fast, quiet, but the manual is useless.")
    p.add_argument("--grammar-file", default=None, help="a GBNF grammar of your own (default: the verdict above)")
    p.add_argument("-t", "--threads", type=int, default=None)
    args = p.parse_args(argv)
    try:
        grammar = (runtime.LlamaGrammar.from_file(args.grammar_file) if args.grammar_file
                   else runtime.LlamaGrammar.from_string(VERDICT))  # checked before the model loads
        with runtime.load(args.model, n_ctx=2048, n_threads=args.threads) as model:
            r = model.create_chat_completion(
                [{"role": "user", "content": f"{args.review}\nGive a verdict and three reasons."}],
                max_tokens=600, temperature=0.7, seed=1, grammar=grammar, reasoning_budget=64)
    except StepstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    choice = r["choices"][0]
    if choice["finish_reason"] != "stop":
        print(f"the reply was cut at {r['usage']['completion_tokens']} tokens: {choice['message']['content']}",
              file=sys.stderr)
        return 1
    print(choice["message"]["content"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
