"""Measure a trained miniature: perplexity per format, routing skew and reuse, MTP acceptance.

    python -m runtime.bench.train_report CKPT_DIR [--workdir DIR] [-c 256] [--chunks 40]

It converts the checkpoint to f32, q8_0 and our q4_k_m, has llama.cpp's own quantizer
make a Q4_K_M from our f32 file, and prints on the held-out split (CKPT_DIR/heldout.txt):
- perplexity of each file with our runtime (llama-perplexity's method), and of the two
  4-bit files with llama.cpp's logits too;
- routing skew (the share of activations that go to each layer's top 20% of experts) and
  token-to-token reuse (the share of a token's experts that the previous token also used),
  over greedy decoding;
- the acceptance of MTP heads 1-3: how often each head's greedy draft equals the token
  greedy decoding then produces.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np


def llama_q4_k_m(f32: Path, out: Path) -> Path:
    import llama_cpp

    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f32}")
    return out


def llama_logits_fn(path: Path, n_ctx: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False)

    def logits(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return logits


def routing(model, prompt_ids: list[int], n: int, follow: list[int] | None = None) -> tuple[dict, list[int]]:
    """Decode n tokens one at a time after the prompt, recording each layer's experts per token.

    The tokens fed are greedy choices, or the tokens of `follow` (teacher forcing on real text).
    """
    from offload.profile import ExpertProfile, RecordingProvider

    model.reset()
    model.eval(prompt_ids[:-1])
    inner = model.provider
    recorder = model.provider = RecordingProvider(inner, ExpertProfile("", 0), model.cfg.n_expert, keep_calls=True)
    tok, out = prompt_ids[-1], []
    try:
        for k in range(n):
            logits = model.eval([tok])
            tok = int(np.argmax(logits)) if follow is None else follow[k]
            out.append(tok)
    finally:
        model.provider = inner
    per_layer: dict[int, list[set[int]]] = {}
    for layer, ids in recorder.calls:
        per_layer.setdefault(layer, []).append(ids)
    reuse_num = reuse_den = 0
    for seq in per_layer.values():
        for a, b in zip(seq, seq[1:]):
            reuse_num += len(a & b)
            reuse_den += len(b)
    prof = recorder.profile
    return {"skew_top20": prof.skew(0.2), "reuse": reuse_num / max(reuse_den, 1),
            "per_layer_skew": {l: ExpertProfile("", 0, {l: prof.counts[l]}).skew(0.2) for l in sorted(prof.counts)}}, out


def mtp_acceptance(model, tokens: list[int]) -> list[float]:
    """How often head j's draft of token t+2+j equals the trunk's own greedy choice there.

    That is the acceptance a greedy verifier gives each head when the tokens before its
    draft are right (teacher forcing); on a greedy sequence the trunk's choice is the
    sequence's next token.
    """
    greedy = model.logits(tokens).argmax(-1)  # row i: the trunk's choice of token i+1
    drafts = model.mtp_logits(tokens)
    acc = []
    for j, d in enumerate(drafts):
        want = greedy[1 + j : 1 + j + d.shape[0]]
        acc.append(float((d.argmax(-1)[: len(want)] == want).mean()))
    return acc


def _perplexities(files: dict, text: str, ctx: int, chunks: int) -> dict:
    """Perplexity of every file on the held-out text, ours and llama.cpp's, and the 4-bit rise."""
    from runtime.generation.perplexity import perplexity
    from runtime.loader import load

    report = {"perplexity": {}, "perplexity_llama_cpp": {}}
    base = load(files["f32"], n_ctx=ctx)
    tokens = base.tokenize(text, add_bos=True)
    bos = base.tokenizer.bos_id if base.tokenizer.add_bos else None
    for name, path in files.items():
        m = load(path, n_ctx=ctx)
        r = perplexity(lambda ids: m.logits(ids), tokens, ctx, bos, chunks)
        report["perplexity"][name] = r.ppl
        print(f"perplexity  {name:<18} {r.ppl:8.3f} +/- {r.stderr:.3f}   ({r.n_tokens} tokens, ours)", flush=True)
        if name in ("q4_k_m", "llama.cpp Q4_K_M", "f32"):
            rl = perplexity(llama_logits_fn(path, ctx), tokens, ctx, bos, chunks)
            report["perplexity_llama_cpp"][name] = rl.ppl
            print(f"perplexity  {name:<18} {rl.ppl:8.3f}            (llama.cpp's logits)", flush=True)
    f32 = report["perplexity"]["f32"]
    ours_rise = report["perplexity"]["q4_k_m"] / f32 - 1
    theirs_rise = report["perplexity"]["llama.cpp Q4_K_M"] / f32 - 1
    print(f"4-bit perplexity rise over f32: ours {ours_rise:+.2%}, llama.cpp Q4_K_M {theirs_rise:+.2%}")
    report.update(ours_rise=ours_rise, llama_rise=theirs_rise)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.bench.train_report")
    p.add_argument("ckpt")
    p.add_argument("--workdir", default=None, help="where the GGUFs go (default: CKPT/gguf)")
    p.add_argument("-c", "--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--gen", type=int, default=200, help="greedy tokens for routing and MTP figures")
    p.add_argument("--json", default=None)
    p.add_argument("--no-perplexity", action="store_true", help="only the routing and MTP figures")
    a = p.parse_args(argv)

    from convert.converter import convert
    from runtime.loader import load

    ckpt = Path(a.ckpt)
    work = Path(a.workdir or ckpt / "gguf")
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for t in ("f32", "q8_0", "q4_k_m"):
        files[t] = work / f"mini-{t}.gguf"
        if not files[t].exists():
            convert(ckpt, files[t], t, progress=False)
    files["llama.cpp Q4_K_M"] = llama_q4_k_m(files["f32"], work / "mini-llama-Q4_K_M.gguf")

    text = (ckpt / "heldout.txt").read_text(encoding="utf-8")
    report = {} if a.no_perplexity else _perplexities(files, text, a.ctx, a.chunks)

    m = load(files["q4_k_m"], n_ctx=a.ctx + a.gen + 8)
    held = m.tokenize(text, add_bos=True)
    prompt, follow = held[: a.ctx // 2], held[a.ctx // 2 : a.ctx // 2 + a.gen]
    for label, teacher in (("greedy decoding", None), ("held-out text, teacher-forced", follow)):
        rt, seq = routing(m, prompt, a.gen, teacher)
        acc = mtp_acceptance(m, prompt[-64:] + seq)
        print(f"{label}: top 20% of experts take {rt['skew_top20']:.1%} of activations; "
              f"{rt['reuse']:.1%} of a token's experts were the previous token's too; MTP acceptance "
              + ", ".join(f"head {j + 1} {v:.1%}" for j, v in enumerate(acc)))
        report[label] = {"routing": rt, "mtp_acceptance": acc}
        if teacher is None:
            print("  greedy sample: " + m.detokenize(seq[:60]).decode("utf-8", "replace").replace("\n", "\\n"))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
