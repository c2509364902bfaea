"""Ask several questions about one long document, evaluating the document once.

    python examples/document_questions.py MODEL.gguf DOCUMENT.txt "QUESTION" ["QUESTION" ...] [--state S.kvstate]

The document's KV cache is kept in a file (--state, default DOCUMENT.txt.kvstate): a later run
on the same document, model and settings loads it instead of evaluating the document again
(on the real model, minutes on a CPU). Each question is asked after the document alone: the
cache returns to the document's end (a saved state in RAM) and only the question is evaluated.
Prints each answer and how many tokens each prompt evaluated. (The embedded miniature was
trained on Python sources: it answers in code-like text; a real Step-3.5-Flash GGUF answers.)
"""

import sys
import time
from pathlib import Path

import runtime
from runtime.base.errors import StepstreamError
from runtime.cli import SubcommandParser
from runtime.cli.arg_types import token_limit
from runtime.cli.text_args import read_text_file

p = SubcommandParser(description=__doc__.splitlines()[0])
p.add_argument("model")
p.add_argument("document")
p.add_argument("questions", nargs="+")
p.add_argument("--state", default=None, help="the document's KV cache (default: DOCUMENT.kvstate)")
p.add_argument("-n", type=token_limit, default=48, help="tokens per answer (default: 48)")
p.add_argument("-c", type=int, default=8192, help="context size (default: 8192)")
a = p.parse_args()

try:
    text = read_text_file(a.document, "document")
    state = Path(a.state or a.document + ".kvstate")
    with runtime.load(a.model, n_ctx=a.c) as model:
        doc = model.tokenize(text + "\n\n")
        if len(doc) + a.n + 64 > model.n_ctx:
            raise StepstreamError(f"{a.document}: {len(doc)} tokens leave no room for a question and an answer in "
                                  f"a context of {model.n_ctx} (give a larger -c)")
        loaded = 0
        if state.exists():
            try:
                loaded = model.load_state_file(state)
            except StepstreamError as e:  # another model or run, or damaged: evaluated again, and replaced
                print(f"{e}; the document is evaluated again", file=sys.stderr)
        t0 = time.perf_counter()
        _, reused = model.eval_prompt(doc)
        print(f"document: {len(doc)} tokens, {reused} from {state if loaded else 'nothing'}, "
              f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
        if reused < len(doc) - 1:
            model.save_state_file(state)
        # In RAM too: after an answer the cache cannot always roll back to the document's end (the
        # sliding-window layers keep only their last positions), so each question starts from it.
        after_doc = model.save_state()
        for q in a.questions:
            model.load_state(after_doc)
            prompt = doc + model.tokenize(f"Question: {q}\nAnswer:", add_bos=False)
            new = len(prompt) - model.reusable(prompt)  # the rest comes from the cache
            t0 = time.perf_counter()
            out = model.create_completion(prompt, max_tokens=a.n, temperature=0)
            print(f"\n> {q}\n{out['choices'][0]['text'].strip()}")
            print(f"[{new} of {len(prompt)} prompt tokens evaluated, {time.perf_counter() - t0:.2f} s]",
                  file=sys.stderr)
except StepstreamError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
