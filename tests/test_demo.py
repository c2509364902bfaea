"""The embedded trained miniature: it ships, it has every Step-3.5 feature, and `stepstream demo` streams it."""

import re

import numpy as np

from runtime.cli import main
from runtime.base.config import ModelConfig
from runtime.cli.demo import model_path
from runtime.base.gguf_file import GGUFModelFile


def test_embedded_model_is_a_full_step35():
    path = model_path()
    assert path.stat().st_size <= 30 * 2**20
    cfg = ModelConfig.from_gguf(GGUFModelFile(path))
    assert cfg.n_mtp == 3
    assert any(cfg.sliding) and not all(cfg.sliding)
    assert not cfg.moe[0] and all(cfg.moe[1 : cfg.n_layers])
    assert any(v > 0 for v in cfg.swiglu_limit) and any(v > 0 for v in cfg.swiglu_limit_shared)


def test_demo_streams_experts_and_reports(capsys):
    assert main(["demo", "-n", "24"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def read_config(path):")
    assert "tok/s" in out.err and "peak RSS" in out.err and "hit rate" in out.err
    # the cache is half the experts' bytes; with each slot aligned for O_DIRECT it holds fewer than
    # half the experts, and the share printed is of the experts held
    m = re.search(r"expert cache ([\d.]+) MiB = (\d+) of (\d+) experts \((\d+)% of the experts' ([\d.]+) MiB\)", out.err)
    cache, held, total, share, experts = (float(g) for g in m.groups())
    assert abs(cache / experts - 0.5) < 0.02 and share == round(100 * held / total) and held < total / 2
    read = float(out.err.split("MB read from disk")[0].rsplit(",", 1)[1])
    assert read > 0, "the demo must read experts from disk"


def test_trained_model_beats_unigram_on_held_out_python():
    """The shipped weights predict Python far better than token frequencies do."""
    from convert.corpus import heldout_files
    from runtime.loader import load
    from runtime.generation.perplexity import perplexity

    m = load(model_path(), n_ctx=256)
    text = max(heldout_files()[:20], key=lambda p: p.stat().st_size).read_text()
    ids = m.tokenize(text, add_bos=True)
    res = perplexity(lambda c: m.logits(c), ids, 256, m.tokenizer.bos_id, n_chunks=4)
    counts = np.bincount(ids, minlength=m.cfg.vocab) + 1.0
    unigram = float(np.exp(-np.log(counts / counts.sum())[ids].mean()))  # even fitted on this very text
    assert res.ppl < unigram / 2, (res.ppl, unigram)
