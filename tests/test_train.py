"""The PyTorch training model computes exactly the Step-3.5 of the float64 reference."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains the miniature (minutes on 2 cores)

torch = pytest.importorskip("torch")

from convert.mini import Preset  # noqa: E402
from convert.train.trainer import TrainOptions, train  # noqa: E402
from tests.helpers.reference_model import cosine_rows, reference_logits, reference_mtp_logits  # noqa: E402

SMALL = Preset(hidden=256, n_layers=3, head_dim=128, n_head_full=2, n_head_sliding=4, n_kv=1, n_expert=8,
               n_expert_used=2, expert_ffn=256, shared_ffn=256, dense_ffn=256, vocab=400, sliding_window=8,
               n_shards=2, about="test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ck"
    opts = TrainOptions(steps=12, batch=4, seq=48, lr=1e-2, warmup=2, max_corpus_bytes=300_000, threads=2)
    report, model = train(out, opts, SMALL, log=lambda *_: None)
    return out, report, model


def test_exported_checkpoint_matches_training_model(trained):
    out, _, model = trained
    tokens = np.random.default_rng(0).integers(0, 400, size=40)
    with torch.no_grad():
        logits, drafts = model.eval()(torch.from_numpy(tokens)[None])
    ref = reference_logits(out, tokens)
    got = logits[0].double().numpy()
    assert cosine_rows(ref, got).min() > 0.99999
    assert np.abs(ref - got).max() < 1e-3 * np.abs(ref).max()
    for j, (r, d) in enumerate(zip(reference_mtp_logits(out, tokens), drafts)):
        assert cosine_rows(r, d[0].double().numpy()).min() > 0.99999, f"MTP head {j}"


def test_training_lowers_loss_and_writes_a_checkpoint(trained):
    out, report, _ = trained
    h = report["history"]
    assert h[-1]["loss"] < h[0]["loss"] - 0.5
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json",
              "heldout.txt", "train_report.json"):
        assert (out / f).exists()
    assert report["heldout_perplexity"] < report["unigram_perplexity"] * 1.5


def test_same_seed_same_checkpoint(tmp_path):
    """The script and its seed reproduce the weights, byte for byte."""
    opts = TrainOptions(steps=3, batch=2, seq=32, lr=1e-2, warmup=1, max_corpus_bytes=120_000, threads=1)
    for name in ("a", "b"):
        train(tmp_path / name, opts, SMALL, log=lambda *_: None)
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards
    for s in shards + ["tokenizer.json", "config.json"]:
        assert (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes(), s
