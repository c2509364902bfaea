"""Expert streaming from the command line: placement, --stats, bench JSON, profile and --profile."""

import json
import re

import pytest

from offload.profile import ExpertProfile
from runtime.cli import main


def test_run_prints_placement_and_stats(tiny_gguf, capsys):
    path = str(tiny_gguf("q4_k_m"))
    assert main(["run", "-m", path, "-p", "def f(x):", "-n", "6", "--temp", "0", "--ram-budget", "700KiB", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "placement:" in err and "resident" in err and "expert cache" in err and "of 48 experts" in err
    # the share is of the experts held (it divided the slots' aligned bytes by the experts' bytes:
    # 111% for a cache of all of them)
    held, total, share = re.search(r"= (\d+) of (\d+) experts \((\d+)% of the experts'", err).groups()
    assert int(share) == round(100 * int(held) / int(total))
    assert main(["run", "-m", path, "-p", "x", "-n", "1", "--ram-budget", "1TiB"]) == 0
    assert "= 48 of 48 experts (100% of the experts'" in capsys.readouterr().err
    for what in ("hits", "misses", "hit rate", "GB/s", "stalled", "prefetch recall", "precision", "peak RSS", "per layer"):
        assert what in err, what


def test_bench_json_carries_the_expert_stats(tiny_gguf, capsys):
    path = str(tiny_gguf("q4_k_m"))
    assert main(["bench", "-m", path, "-p", "8", "-n", "4", "-t", "2", "--json", "--ram-budget", "1MiB"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        assert report[key] > 0
    ex = report["experts"]
    for key in ("hits", "misses", "hit_rate_per_layer", "bytes_read", "read_gb_s", "stall_seconds",
                "prefetch_recall", "prefetch_precision", "peak_rss_bytes"):
        assert key in ex, key
    assert ex["bytes_read"] > 0 and report["placement"]["cache_slots"] >= 4
    # the last repetition's decode alone: 4 tokens x 3 MoE layers x top-4 requests (the warm-up's
    # token and the prefill's 8 were counted in too, 3x the decode's)
    assert ex["requests"] == 4 * 3 * 4 and ex["scope"] == "the last repetition's decode"


def test_bench_stats_text_counts_what_the_json_counts(tiny_gguf, capsys):
    """With --mtp the generation timed after the decode streams experts too: the --stats text
    counted it (and every prefill) where the JSON's `experts` and the README say the last
    repetition's decode alone (a review: 474 requests printed, 128 in the JSON)."""
    path = str(tiny_gguf("q4_k_m"))
    assert main(["bench", "-m", path, "-p", "8", "-n", "4", "-t", "1", "-r", "2", "--json", "--stats",
                 "--ram-budget", "1MiB", "--mtp", "0"]) == 0
    out, err = capsys.readouterr()
    ex = json.loads(out.strip().splitlines()[-1])["experts"]
    line = next(l for l in err.splitlines() if l.startswith("experts: "))
    hits, misses = re.search(r"(\d+) hits, .* (\d+) misses", line).groups()
    assert line.startswith(f"experts: {ex['requests']} requests: ") and (int(hits), int(misses)) == (ex["hits"],
                                                                                                  ex["misses"])
    assert "[the last repetition's decode]" in err


def test_profile_then_pin(tiny_gguf, tmp_path, capsys):
    path = tiny_gguf("q4_k_m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main():\\n    pass\nimport os\n\nclass A:\n")
    out = tmp_path / "p.json"
    assert main(["profile", "-m", str(path), "-f", str(prompts), "-o", str(out), "-n", "4"]) == 0
    prof = ExpertProfile.load(out, path)
    assert prof.tokens > 0 and sum(sum(v) for v in prof.counts.values()) == prof.tokens * 4 * 3  # top-4, 3 MoE layers
    capsys.readouterr()
    assert main(["run", "-m", str(path), "-p", "x = 1", "-n", "4", "--ram-budget", "1MiB", "--profile", str(out)]) == 0
    assert "pinned from the profile" in capsys.readouterr().err


def test_profile_and_trace_write_through_a_symlink(tiny_gguf, tmp_path, capsys):
    """`-o link.json` made the link a regular file and left its target old; as cp, llama.cpp and
    our converter and synth do, the target is written and the link stays."""
    path = tiny_gguf("q4_k_m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n")
    real = tmp_path / "real"
    real.mkdir()
    assert main(["profile", "-m", str(path), "-f", str(prompts), "-o", str(real / "p.json"), "--trace",
                 str(real / "t.npz"), "-n", "2"]) == 0
    old = {name: (real / name).read_bytes() for name in ("p.json", "t.npz")}
    links = {}
    for name in old:
        links[name] = tmp_path / f"link-{name}"
        links[name].symlink_to(real / name)
    assert main(["profile", "-m", str(path), "-f", str(prompts), "-o", str(links["p.json"]), "--trace",
                 str(links["t.npz"]), "-n", "6"]) == 0
    for name, link in links.items():
        assert link.is_symlink() and (real / name).read_bytes() != old[name], name
    assert ExpertProfile.load(real / "p.json", path).tokens > 2
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["p.json", "t.npz"]


def test_fill_cache_fills_the_slots_the_profile_leaves(tiny_gguf, tmp_path, capsys):
    """--profile pins the hottest half of the slots, --fill-cache reads experts into the rest;
    the greedy text is the cold cache's."""
    path = tiny_gguf("q4_k_m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass A:\n")
    out = tmp_path / "p.json"
    assert main(["profile", "-m", str(path), "-f", str(prompts), "-o", str(out), "-n", "4"]) == 0
    capsys.readouterr()
    runs = {}
    for extra in ([], ["--fill-cache"]):
        assert main(["run", "-m", str(path), "-p", "x = 1", "-n", "6", "--temp", "0", "--ram-budget", "1MiB",
                     "--profile", str(out), *extra]) == 0
        runs[bool(extra)] = capsys.readouterr()
    line = next(l for l in runs[True].err.splitlines() if l.startswith("placement:"))
    slots, pinned, filled = (int(v) for v in re.search(r"= (\d+) of 48 experts.*, (\d+) pinned from the profile, "
                                                       r"(\d+) read at load", line).groups())
    assert pinned == slots // 2 and pinned + filled == slots
    assert "read at load" not in runs[False].err and runs[True].out == runs[False].out


def test_profile_of_another_model_is_refused(tiny_gguf, tmp_path, capsys):
    other = tmp_path / "p.json"
    ExpertProfile("something-else.gguf", 123, {1: [1] * 16}).save(other)
    assert main(["run", "-m", str(tiny_gguf("q4_k_m")), "-p", "x", "-n", "1", "--profile", str(other)]) == 2
    assert "was recorded on something-else.gguf" in capsys.readouterr().err


def test_placement_line_says_where_the_budget_came_from(tiny_gguf, capsys):
    path = str(tiny_gguf("q4_k_m"))
    assert main(["run", "-m", path, "-p", "x", "-n", "1", "--temp", "0", "--ram-budget", "700KiB"]) == 0
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("placement:"))
    # An asked-for budget, and the limit that binds beside it (the host here, or this machine's cgroup).
    assert line.startswith("placement: budget 0.7 MiB (asked for; ")
    assert "available memory " in line or " limit " in line


def test_profile_writes_the_routing_trace(tiny_gguf, tmp_path, capsys):
    import numpy as np

    from offload.trace import RoutingTrace

    path = tiny_gguf("q4_k_m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main():\\n    pass\nimport os\n")
    out, trace_path = tmp_path / "p.json", tmp_path / "t.npz"
    assert main(["profile", "-m", str(path), "-f", str(prompts), "-o", str(out), "-n", "3",
                 "--trace", str(trace_path)]) == 0
    assert "routing of" in capsys.readouterr().out
    prof, trace = ExpertProfile.load(out, path), RoutingTrace.load(trace_path)
    assert trace.ids.dtype == np.int16 and trace.tokens == prof.tokens and trace.top_k == 4
    assert trace.model == path.name and trace.model_bytes == path.stat().st_size
    assert trace.layers.tolist() == sorted(prof.counts) and (trace.n_expert == 16).all()
    assert trace.starts[0] == 0 and len(trace.starts) == 2
    for j, layer in enumerate(trace.layers.tolist()):  # the counts, re-derived from the order
        assert np.bincount(trace.ids[:, j].ravel(), minlength=16).tolist() == prof.counts[layer]
        assert all(len(set(row)) == 4 for row in trace.ids[:, j].tolist())  # K distinct experts a token
    assert not list(tmp_path.glob("*.part"))


def test_profile_trace_equals_the_router(tiny_gguf, tmp_path):
    """Teacher-forced random tokens: the trace holds each token's top-K from the model's own routing
    (the same tokens evaluated by a fresh model, whose router logits are recomputed here)."""
    import numpy as np

    from offload.trace import RoutingTrace
    from runtime.loader import load
    from runtime.model import ffn

    path = tiny_gguf("q4_k_m")
    trace_path = tmp_path / "t.npz"
    assert main(["profile", "-m", str(path), "--random-tokens", "20", "--seed", "5", "-o", str(tmp_path / "p.json"),
                 "--trace", str(trace_path)]) == 0
    trace = RoutingTrace.load(trace_path)
    m = load(str(path))
    tokens = np.random.default_rng(5).integers(0, m.cfg.vocab, 20).tolist()
    seen = {}
    real_moe = ffn.moe

    def spy(s, w, x, logits, experts):
        ids, _ = ffn.route(logits, w.router_bias, s.n_expert_used, s.expert_scale, s.expert_norm)
        seen.setdefault(s.index, []).append(np.sort(ids, axis=1))
        return real_moe(s, w, x, logits, experts)

    ffn.moe = spy
    try:
        m.eval(tokens)
    finally:
        ffn.moe = real_moe
    assert trace.tokens == 20
    for j, layer in enumerate(trace.layers.tolist()):
        assert (np.sort(trace.ids[:, j], axis=1) == np.concatenate(seen[layer])).all()


def test_profile_needs_prompts_or_random_tokens(tiny_gguf, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["profile", "-m", str(tiny_gguf("q4_k_m"))])
    assert e.value.code == 2 and "one of the arguments -f/--file --random-tokens is required" in capsys.readouterr().err


def test_an_unreadable_profile_is_one_line(tmp_path):
    from offload.profile import ExpertProfile
    from runtime.base.errors import StepstreamError

    d = tmp_path / "p.json"
    d.mkdir()
    with pytest.raises(StepstreamError, match="cannot read the profile"):
        ExpertProfile.load(d)


def test_a_profile_recorded_through_a_symlink_serves_the_file_and_the_link(tiny_gguf, tmp_path, capsys):
    """A profile was identified by the name it was recorded by: recorded on model-latest.gguf (a
    link to m.gguf) it was refused for m.gguf, and the other way round. The file's own name is
    recorded, and either name matches."""
    path = tiny_gguf("q4_k_m")
    link = tmp_path / "model-latest.gguf"
    link.symlink_to(path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n")
    out, trace = tmp_path / "p.json", tmp_path / "t.npz"
    assert main(["profile", "-m", str(link), "-f", str(prompts), "-o", str(out), "--trace", str(trace), "-n", "2"]) == 0
    for model in (path, link):
        assert ExpertProfile.load(out, model).tokens > 0
        capsys.readouterr()
        assert main(["run", "-m", str(model), "-p", "x", "-n", "2", "--ram-budget", "1MiB", "--profile", str(out)]) == 0
        assert main(["plan", "-m", str(model), "--profile", str(trace), "--ram-gbps", "30"]) == 0


def test_the_fill_at_load_survives_the_warm_up(tiny_gguf):
    """--fill-cache read experts at load, then the warm-up's passes evicted most of them (2 of
    17 left, a review), and --stats counted none of the fill's reads. The warm-up now reads
    again the filled experts it evicted, after its figures restart: they are resident when the
    run starts, their reads counted, and the text is the cold cache's."""
    import runtime

    path = tiny_gguf("q4_k_m")
    cold = runtime.load(path, ram_budget="1MiB", n_ctx=256)
    cold.warm_up()
    want = cold.create_completion("def f(x):", max_tokens=8, temperature=0)["choices"][0]["text"]
    m = runtime.load(path, ram_budget="1MiB", n_ctx=256, fill_cache=True)
    filled = set(m.provider.cache.index)
    assert m.placement.filled == len(filled) > 0
    m.warm_up()
    assert filled <= set(m.provider.cache.index)
    assert m.provider.stats.bytes_read > 0 and m.provider.stats.requests == 0
    assert m.create_completion("def f(x):", max_tokens=8, temperature=0)["choices"][0]["text"] == want
