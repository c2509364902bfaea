"""Train the miniature Step-3.5 on the Python standard library's sources, on the CPU.

The corpus is every `.py` file of the standard library on this machine, sorted by path;
every 20th file is held out. A byte-level BPE tokenizer is trained on the training split,
the model on random windows of it, and the result is written as a Hugging Face checkpoint
(config.json, bf16 safetensors, tokenizer.json, tokenizer_config.json) plus the held-out
text and a training report. A fixed seed and step count reproduce the same weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from convert import layout
from convert.hf_config import HFConfig
from convert.mini import Preset, make_config
from convert.corpus import split_corpus
from convert.mini_tokenizer import train_tokenizer, write_tokenizer_files
from convert.safetensors_io import SafetensorsWriter
from convert.train.model import Step35
from convert.train.options import TrainOptions
from runtime.base.errors import StepstreamError

# The shipped model: 256 hidden, 5 trunk layers (1 dense + 4 MoE of 16 experts, top-4),
# 3 MTP blocks, 2048-token vocabulary: ~20M parameters, ~12 MB at q4_k_m. Sized so that
# the default step count trains in well under an hour on 2 cores.
TRAINED = Preset(hidden=256, n_layers=5, head_dim=128, n_head_full=2, n_head_sliding=4, n_kv=1,
                 n_expert=16, n_expert_used=4, expert_ffn=256, shared_ffn=256, dense_ffn=512,
                 vocab=2048, sliding_window=128, n_shards=2, about="trained on the Python stdlib")
CLAMPS = (6.0, 10.0)  # routed / shared SwiGLU limits on the layers that have one


def encode(tok, texts: list[str], eos: int) -> np.ndarray:
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def unigram_perplexity(train_ids: np.ndarray, heldout_ids: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[heldout_ids].mean()))


def lr_at(step: int, o: TrainOptions) -> float:
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    t = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def losses(model: Step35, batch: torch.Tensor, every: int = 1, offset: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Trunk next-token loss and one loss per MTP head (head j at position t predicts token t+2+j)."""
    x, V = batch[:, :-1], model.cfg.vocab_size
    logits, drafts = model(x, every, offset)
    main = F.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
    extra = []
    T = x.shape[1]
    for j, lg in enumerate(drafts):
        pos = torch.arange(offset, T - 1 - j, every)[: lg.shape[1]]  # positions the head scored
        keep = pos + 2 + j < batch.shape[1]
        target = batch[:, pos[keep] + 2 + j]
        extra.append(F.cross_entropy(lg[:, : int(keep.sum())].reshape(-1, V), target.reshape(-1)))
    return main, extra


@torch.no_grad()
def evaluate(model: Step35, ids: np.ndarray, seq: int, max_windows: int = 64) -> tuple[float, list[float]]:
    """Perplexity of the trunk and of each MTP head over consecutive held-out windows."""
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq)
    tot, tot_mtp, count = 0.0, None, 0
    for w in range(n):
        batch = torch.from_numpy(ids[w * seq : w * seq + seq + 1][None])
        main, extra = losses(model, batch)
        tot += main.item()
        tot_mtp = [e.item() for e in extra] if tot_mtp is None else [a + e.item() for a, e in zip(tot_mtp, extra)]
        count += 1
    model.train()
    return math.exp(tot / count), [math.exp(v / count) for v in (tot_mtp or [])]


def export_checkpoint(model: Step35, config: dict, tok, out: Path) -> None:
    cfg = HFConfig.from_dict(config)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.hf_state().items()}
    specs = layout.checkpoint_layout(cfg)
    missing = sorted(set(s.hf_name for s in specs) - set(state))
    extra = sorted(set(state) - set(s.hf_name for s in specs))
    if missing or extra:
        raise AssertionError(f"trained model does not match the layout: missing {missing[:5]}, extra {extra[:5]}")
    half = len(specs) // 2
    weight_map = {}
    for k, part in enumerate([specs[:half], specs[half:]]):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        w = SafetensorsWriter(out / name)
        for s in part:
            w.add(s.hf_name, "F32" if s.role == layout.ROUTER_BIAS else "BF16", s.shape)
        for s in part:
            if state[s.hf_name].shape != s.shape:
                raise AssertionError(f"{s.hf_name}: {state[s.hf_name].shape} != {s.shape}")
            w.write(s.hf_name, state[s.hf_name])
            weight_map[s.hf_name] = name
        w.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_files(tok, out)


def _optimize(model: Step35, train_ids: np.ndarray, opts: TrainOptions, rng, t0: float, log) -> list[dict]:
    """AdamW over random windows of the corpus, with loss-free expert balancing; the loss history."""
    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95))
    moes = [b.moe for b in model.layers if b.is_moe]
    history = []
    for step in range(opts.steps):
        starts = rng.integers(0, len(train_ids) - opts.seq - 2, size=opts.batch)
        batch = torch.from_numpy(np.stack([train_ids[s : s + opts.seq + 2] for s in starts]))
        for g in optim.param_groups:
            g["lr"] = lr_at(step, opts)
        main, extra = losses(model, batch, opts.mtp_every, step % opts.mtp_every)
        loss = main + opts.mtp_weight * sum(extra)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        with torch.no_grad():  # auxiliary-loss-free balancing: raise under-used experts' bias
            for m in moes:
                m.router_bias += opts.bias_rate * torch.sign(m.load.mean() - m.load)
        if step % 100 == 0 or step == opts.steps - 1:
            elapsed = time.perf_counter() - t0
            history.append({"step": step, "loss": main.item(), "mtp": [e.item() for e in extra], "seconds": elapsed})
            log(f"step {step:5d}  loss {main.item():.3f}  mtp {' '.join(f'{e.item():.2f}' for e in extra)}  "
                f"{elapsed / 60:.1f} min")
    return history


def train(out_dir: str | os.PathLike, opts: TrainOptions = TrainOptions(), preset: Preset = TRAINED,
          log=print) -> tuple[dict, Step35]:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise StepstreamError(f"{out}: directory exists and is not empty")
    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    rng = np.random.default_rng(opts.seed)

    t0 = time.perf_counter()
    train_texts, heldout_texts = split_corpus(opts.max_corpus_bytes)
    tok = train_tokenizer(preset.vocab, texts=train_texts)
    eos = tok.token_to_id("<|end_of_text|>")
    train_ids, heldout_ids = encode(tok, train_texts, eos), encode(tok, heldout_texts, eos)
    vocab_size = -(-tok.get_vocab_size() // 64) * 64
    config = make_config(preset, vocab_size, clamps=CLAMPS)
    cfg = HFConfig.from_dict(config)
    model = Step35(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    unigram = unigram_perplexity(train_ids, heldout_ids, vocab_size)
    log(f"corpus: {len(train_ids):,} training tokens, {len(heldout_ids):,} held-out; "
        f"{n_params / 1e6:.1f} M parameters; unigram perplexity {unigram:.1f}")

    history = _optimize(model, train_ids, opts, rng, t0, log)

    with torch.no_grad():  # the checkpoint is bf16: evaluate and keep exactly what ships
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    ppl, mtp_ppl = evaluate(model, heldout_ids, opts.seq)
    report = {"options": asdict(opts), "n_params": n_params, "train_tokens": int(len(train_ids)),
              "heldout_tokens": int(len(heldout_ids)), "unigram_perplexity": unigram,
              "heldout_perplexity": ppl, "heldout_mtp_perplexity": mtp_ppl,
              "minutes": (time.perf_counter() - t0) / 60, "history": history}
    log(f"held-out perplexity {ppl:.2f} (unigram {unigram:.1f}); MTP heads {', '.join(f'{p:.1f}' for p in mtp_ppl)}")

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_checkpoint(model, config, tok, tmp)
    (tmp / "heldout.txt").write_text("\n".join(heldout_texts), encoding="utf-8")
    (tmp / "train_report.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return report, model
