"""`stepstream chat`: an interactive conversation on stdin/stdout, rendered with the model's chat template."""

from __future__ import annotations

import sys

from runtime.cli.common import add_model_args, add_sampling_args, load_model, max_tokens, sampling_kwargs


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("-sys", "--system-prompt", default=None, help="system message that opens the conversation")
    add_sampling_args(p)


def run(args, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    model = load_model(args)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = ""
        for chunk in model.create_chat_completion(messages, max_tokens=max_tokens(args), stop=args.reverse_prompt,
                                                  stream=True, **sampling_kwargs(args)):
            text = chunk["choices"][0]["delta"].get("content", "")
            reply += text
            out.write(text)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})
