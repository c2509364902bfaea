"""Random-weight GGUF files (runtime.bench.synth, `stepstream synth`) and the GPU benchmark's
CPU side (runtime.bench.gpu) on a tiny file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quant import dequantize, row_bytes
from runtime.base.gguf_file import GGUFModelFile
from runtime.bench.synth import random_blocks, write_synth
from runtime.cli import main as cli_main
from runtime.loader import load
from tests.helpers import reference_model as R
from tests.helpers.llama import llama_cpp_logits

TINY = dict(moe_layers=2, dense_layers=1, hidden=256, n_head_full=2, n_head_sliding=4, n_kv=1, head_dim=128, window=16,
            n_expert=16, top_k=4, expert_ffn=256, shared_ffn=256, dense_ffn=512, vocab=512, progress=False)


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("synth") / "tiny.gguf", seed=3, bias_skew=0.5, **TINY)


def test_config_matches_request(tiny_synth):
    model = load(tiny_synth)
    cfg = model.cfg
    assert (cfg.hidden, cfg.vocab, cfg.head_dim, cfg.n_layers, cfg.n_mtp) == (256, 512, 128, 3, 0)
    assert cfg.moe == (False, True, True) and cfg.sliding == (False, True, True)
    assert cfg.n_head == (2, 4, 4) and cfg.n_head_kv == (1, 1, 1) and cfg.n_rot == (64, 128, 128)
    assert (cfg.n_expert, cfg.n_expert_used, cfg.expert_ffn, cfg.shared_ffn, cfg.dense_ffn) == (16, 4, 256, 256, 512)
    assert cfg.window == 16
    model.close()


def test_tensor_bytes_and_types(tiny_synth):
    f = GGUFModelFile(tiny_synth)
    types = {}
    for name, t in f.tensors.items():
        assert t.data.nbytes == int(np.prod(t.shape[:-1])) * row_bytes(t.qtype, t.shape[-1]), name
        types[name] = t.qtype
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    assert types["blk.1.ffn_gate_exps.weight"] == Q.Q4_K and types["blk.1.ffn_gate_inp.weight"] == Q.F32


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0])
def test_random_blocks_have_the_asked_scale(qtype):
    blocks = random_blocks(np.random.default_rng(0), qtype, 64, 1024, 0.03)
    w = np.asarray(dequantize(blocks, qtype, (64, 1024)))
    assert np.isfinite(w).all()
    assert abs(w.std() / 0.03 - 1) < 0.02 and abs(w.mean()) < 0.03 * 0.05


def test_logits_finite_deterministic_and_match_reference(tiny_synth, tmp_path):
    tokens = [1, 2, 3, 100, 511]
    model = load(tiny_synth)
    got = np.asarray(model.logits(tokens))
    model.close()
    assert got.shape == (5, 512) and np.isfinite(got).all()
    assert 0.3 < got.std() < 3  # unit-scale weights keep activations near unit RMS
    ref = R.gguf_reference_logits(tiny_synth, tokens)
    cos = R.cosine_rows(got, ref)
    assert cos.min() >= 0.999, cos
    again = write_synth(tmp_path / "again.gguf", seed=3, bias_skew=0.5, **TINY)
    assert again.read_bytes() == tiny_synth.read_bytes()
    other = write_synth(tmp_path / "other.gguf", seed=4, bias_skew=0.5, **TINY)
    assert other.read_bytes() != tiny_synth.read_bytes()


def test_llama_cpp_runs_the_file_as_the_reference_does(tiny_synth):
    """The placeholder vocabulary lets llama.cpp load a synth file, and it reads the weights as
    the float64 reference does (so `bench --llama-cpp` compares like with like)."""
    tokens = [1, 2, 3, 100, 300, 510]
    theirs = llama_cpp_logits(tiny_synth, tokens)
    cos = R.cosine_rows(theirs, R.gguf_reference_logits(tiny_synth, tokens))
    assert cos.min() >= 0.999, cos


def test_placeholder_vocabulary_tokenizes_as_llama_cpp_does(tiny_synth):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny_synth), vocab_only=True, verbose=False)
    model = load(tiny_synth)
    try:
        for text in ("hello world", "t0t7 t12\n\té中!", ""):
            ours = model.tokenize(text, add_bos=False)
            assert ours == llm.tokenize(text.encode(), add_bos=False, special=False), text
            assert model.detokenize(ours) == text.encode()
        ids = [0, 255, 256, 300, 510, 511]  # bytes 0 and 255, the fillers "t0", "t44", "t254", the end token
        assert model.detokenize(ids, special=True) == llm.detokenize(ids, special=True) == b"\x00\xfft0t44t254<|endoftext|>"
        assert model.tokenizer.eos_id == 511 == llm.token_eos()
    finally:
        model.close()
        llm.close()


def test_cli_writes_file_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "c.gguf"
    args = ["synth", str(out), "--moe-layers", "1", "--hidden", "256", "--heads", "2", "--heads-sliding", "4",
            "--kv-heads", "1", "--experts", "16", "--top-k", "4", "--expert-ffn", "256", "--shared-ffn", "256",
            "--dense-ffn", "512", "--vocab", "512", "--quiet"]
    assert cli_main(args) == 0
    assert f"{out.stat().st_size:,} bytes" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.part*"))
    # each refusal names the flag given (it named synth's parameters: "hidden=100", "moe_top_k=17")
    for extra, line in ((["--hidden", "100"], "error: synth: --hidden 100 must be a positive multiple of 256"),
                        (["--top-k", "17"], "error: synth: --top-k 17 must be 1 to --experts 16"),
                        (["--vocab", "100"], "error: synth: --vocab 100 must be at least 258"),
                        (["--kv-heads", "3"], "error: synth: --heads 2 and --heads-sliding 4 must be multiples of "
                                              "--kv-heads 3")):
        assert cli_main(args + extra) == 2
        assert capsys.readouterr().err.startswith(line)
    for bad in ("nan", "inf", "-1"):  # a NaN bias routed every token to the same experts, in silence
        with pytest.raises(SystemExit) as e:
            cli_main(args + ["--bias-skew", bad])
        assert e.value.code == 2 and "--bias-skew" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.part*"))
    with pytest.raises(SystemExit) as e:
        cli_main(args[:2] + ["--experts", "0"])
    assert e.value.code == 2


def test_gpu_bench_cpu_setting_on_tiny_file(tmp_path):
    from runtime.bench import gpu

    out = tmp_path / "r.json"
    argv = ["--workdir", str(tmp_path), "--tiny", "--cpu-only", "--tokens", "3", "--cpu-tokens", "3", "--prompt", "6",
            "--json", str(out)]
    assert gpu.main(argv) == 0
    report = json.loads(out.read_text())
    cpu = report["settings"]["cpu"]
    assert cpu["finite"] and cpu["tokens"] == 3 and cpu["prompt"] == 6
    assert cpu["prefill_tok_s"] > 0 and cpu["decode_tok_s_median"] > 0 and cpu["decode_tok_s_mean"] > 0
    assert cpu["prefill_tok_s"] == pytest.approx(6 / cpu["prefill_s"])
    assert report["ratios"] == {}  # no GPU setting ran
    assert "gpu_placement" not in cpu and "kernels" not in report  # CPU path: no VRAM plan, no kernels part
    assert report["total_s"] >= cpu["wall_s"] > 0
    budget = gpu.load_options("gpu25", tmp_path / "synth_tiny.gguf", 64)["gpu_budget"]
    assert isinstance(budget, int) and budget > 0
    assert gpu.ratios({"cpu": {"prefill_tok_s": 2.0}, "gpu": {"prefill_tok_s": 6.0}}) == {"gpu/cpu prefill_tok_s": 3.0}


def test_gpu_bench_reports_the_vram_plan_and_tier_counts(tiny_synth):
    """The GPU settings' extra fields, from the real plan and counters (the model itself runs on a card only:
    the simulator takes minutes per token)."""
    from types import SimpleNamespace

    from offload.expert_table import build_expert_table
    from offload.gpu_placement import plan_gpu, vram_budget_for
    from offload.vram_experts import TierCounts
    from runtime.base.config import ModelConfig
    from runtime.bench import gpu
    from runtime.model.weights import load_weights

    f = GGUFModelFile(tiny_synth)
    cfg = ModelConfig.from_gguf(f)
    table = build_expert_table(f, cfg)
    budget = vram_budget_for(tiny_synth, 0.25, 64)
    plan = plan_gpu(cfg, load_weights(f, cfg), table.total_bytes, 32, 64, 16, budget, None)
    assert plan.slots == 8  # a quarter of 2 layers x 16 experts
    model = SimpleNamespace(gpu_placement=plan, gpu=SimpleNamespace(tier=SimpleNamespace(
        counts=TierCounts(gpu_hits=6, copied=1, cpu=1, bytes_copied=10))))
    r = {"prefill_tok_s": 1.0, "decode_tok_s_median": 1.0, "decode_tok_s_mean": 1.0, "load_s": 0.0, "warm_up_s": 0.0,
         "options": {}, **gpu.gpu_report(model), "decode_host_wait_share": 0.4}
    assert r["gpu_placement"]["slots"] == 8 and r["tier_counts"]["vram_hit_rate"] == 0.75
    line = gpu.table({"settings": {"gpu25": r}, "ratios": {}}).splitlines()[-1]
    assert line.startswith("  gpu25: 8 of 32 experts in VRAM")
    assert line.endswith("(hit rate 75%); decode steps waiting for the card: 40%")
    assert gpu.gpu_report(SimpleNamespace(gpu_placement=None)) == {}


def test_gpu_bench_times_the_hosts_waits_for_the_card():
    """decode_host_wait_share sums the seconds spent in the stream's synchronize."""
    import time
    from types import SimpleNamespace

    from runtime.bench import gpu

    calls = []
    stream = SimpleNamespace(synchronize=lambda: (calls.append(1), time.sleep(0.02)))
    waited = gpu._time_waits(SimpleNamespace(gpu=SimpleNamespace(stream=stream)))
    stream.synchronize()
    stream.synchronize()
    assert len(calls) == 2 and 0.04 <= waited[0] < 1.0
    assert gpu._time_waits(SimpleNamespace(gpu=None)) == [0.0]


def test_gpu_bench_reports_a_failing_child(tmp_path):
    from runtime.bench import gpu

    args = gpu.parse_args(["--workdir", str(tmp_path), "--child-timeout", "60"])
    r = gpu.run_child(args, "cpu", tmp_path / "missing.gguf")  # the child fails to open the model
    assert r["error"].startswith("cpu: exit status 1:") and "missing.gguf" in r["error"]
    line = gpu.table({"settings": {"cpu": r}, "ratios": {}}).splitlines()[-1]
    assert line.startswith("cpu      error:") and line.endswith("missing.gguf: file not found")  # the last line


def test_gpu_bench_rejects_bad_arguments():
    from runtime.bench import gpu

    with pytest.raises(SystemExit) as e:
        gpu.parse_args(["--workdir", "x", "--tokens", "0"])
    assert e.value.code == 2


def test_synth_writes_mtp_heads_llama_cpp_loads(tmp_path, capsys):
    """A review: synth wrote no MTP heads, so drafting could not be timed at the real widths."""
    path = tmp_path / "mtp.gguf"
    assert cli_main(["synth", str(path), "--quiet", "--mtp", "3", "--moe-layers", "2", "--dense-layers", "1",
                     "--hidden", "256", "--heads", "2", "--heads-sliding", "4", "--kv-heads", "1", "--window", "16",
                     "--experts", "16", "--top-k", "4", "--expert-ffn", "256", "--shared-ffn", "256",
                     "--dense-ffn", "512", "--vocab", "512"]) == 0
    m = load(path, n_ctx=64, mtp=3)
    try:
        assert m.n_mtp == 3 and m.cfg.n_layers == 3
        tokens = [1, 2, 3, 100, 300, 510]
        ours = m.logits(tokens)
        heads = m.mtp_logits(tokens)
    finally:
        m.close()
    theirs = llama_cpp_logits(path, tokens)  # llama.cpp loads the heads' tensors with the trunk
    assert R.cosine_rows(ours, theirs).min() >= 0.999
    assert [h.shape for h in heads] == [(5, 512), (4, 512), (3, 512)]
    assert all(np.isfinite(h).all() for h in heads)
    assert cli_main(["synth", str(tmp_path / "x.gguf"), "--mtp", "4"]) == 2
    assert "Step-3.5-Flash has 3 MTP heads" in capsys.readouterr().err


def test_gpu_bench_compares_each_gpu_settings_logits_with_the_cpus(tmp_path):
    """A wrong card kernel still timed well: the settings' prompt logits are now compared."""
    from runtime.bench import gpu

    rng = np.random.default_rng(0)
    cpu = rng.standard_normal(100).astype(np.float32)
    np.save(tmp_path / "logits_cpu.npy", cpu)
    np.save(tmp_path / "logits_gpu.npy", cpu * 1.0001)
    wrong = cpu.copy()
    wrong[int(np.argmin(cpu))] = cpu.max() + 1
    np.save(tmp_path / "logits_gpu25.npy", wrong)
    a = gpu.agreement(tmp_path / "m.gguf", {"cpu": {}, "gpu": {}, "gpu25": {}})
    assert a["gpu"]["same_top1"] and a["gpu"]["cos"] == pytest.approx(1.0)
    assert not a["gpu25"]["same_top1"] and a["gpu25"]["cos"] < 0.99
    lines = gpu.table({"settings": {}, "ratios": {}, "agreement": a}).splitlines()
    assert lines[-1].startswith("  gpu25 logits against the CPU's: cos") and lines[-1].endswith("top-1 DIFFERENT")


def test_gpu_bench_children_stop_at_its_budget(tmp_path):
    """The four children had 150 s each: past the device's 600 s per command, and the JSON was
    written only at the end. A child gets at most what --budget leaves."""
    import time as _time

    from runtime.bench import gpu

    args = gpu.parse_args(["--workdir", str(tmp_path), "--budget", "30"])
    r = gpu.run_child(args, "cpu", tmp_path / "m.gguf", deadline=_time.perf_counter() + 1)
    assert r["error"] == "cpu: not run: the benchmark's --budget of 30 s is spent" and r["wall_s"] == 0.0


def test_gpu_bench_child_timeout_and_failed_settings(tmp_path):
    """A small --child-timeout ran nothing, blamed on --budget; a setting that failed after its
    prefill still got a logits verdict."""
    from runtime.bench import gpu

    args = gpu.parse_args(["--workdir", str(tmp_path), "--child-timeout", "4"])
    r = gpu.run_child(args, "cpu", tmp_path / "missing.gguf")
    assert r["error"].startswith("cpu: exit status 1:")  # it ran
    np.save(tmp_path / "logits_cpu.npy", np.ones(4, np.float32))
    np.save(tmp_path / "logits_gpu.npy", np.ones(4, np.float32))
    assert gpu.agreement(tmp_path / "m.gguf", {"cpu": {}, "gpu": {"error": "gpu: timed out"}}) == {}
    assert gpu.agreement(tmp_path / "m.gguf", {"cpu": {}, "gpu": {}})["gpu"]["same_top1"]
