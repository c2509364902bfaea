"""stepstream plan: the placement, hit rate and roofline from the header alone, on a file with the
real model's shapes whose data is a sparse hole, and its numbers against what `load` builds."""

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from convert import layout
from convert.gguf_meta import add_hparams
from convert.hf_config import HFConfig
from convert.policy import FILE_TYPE
from offload import plan as P
from quant import row_bytes
from runtime.base.errors import StepstreamError
from runtime.bench import synth
from runtime.cli import main

REAL = dict(moe_layers=42, dense_layers=3, hidden=4096, n_head_full=64, n_head_sliding=96, n_kv=8, head_dim=128,
            window=512, n_expert=288, top_k=8, expert_ffn=1280, shared_ffn=1280, dense_ffn=11264, vocab=128896)


def sparse_gguf(path, **shape):
    """The header and tensor infos of a q4_k step35 file, then a hole up to the size its data
    would take: nothing of the data is on disk."""
    raw = synth._raw_config(*[shape[k] for k in REAL])
    cfg = HFConfig.from_dict(raw, "sparse")
    w = gguf.GGUFWriter(path=None, arch="step35")
    add_hparams(w, cfg, "sparse-step35", FILE_TYPE["q4_k"])
    data = 0
    for s in layout.checkpoint_layout(cfg):
        t = synth._qtype(s, Q.Q4_K)
        n = s.n_elements // s.shape[-1] * row_bytes(t, s.shape[-1])
        w.add_tensor_info(s.gguf_name, s.shape, np.dtype(np.float32), n, raw_dtype=t)
        data += gguf.GGUFWriter.ggml_pad(n, w.data_alignment)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    w.write_padding(f, f.tell())
    start = f.tell()
    w.close()
    os.truncate(path, start + data)
    return path


@pytest.fixture(scope="module")
def real_shapes(tmp_path_factory):
    return sparse_gguf(tmp_path_factory.mktemp("sparse") / "real-shapes.gguf", **REAL)


def _bytes_read():
    """What this process has read through read(2) and its kin so far (/proc/self/io's rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_real_shapes_plan_from_the_header_alone(real_shapes):
    st = os.stat(real_shapes)
    assert st.st_size > 100e9 and st.st_blocks * 512 < 50e6  # 111 GB apparent, a hole on disk
    P.make_plan(real_shapes, ram=64 * 2**30, ram_gbps=20)  # imports and first calls warm
    # CPU time and bytes read, not wall time: a shared machine's stall (one CI run waited 2.1 s on
    # a 10 ms plan) says nothing about the plan. Reading tensor data, or walking 12,096 experts in
    # Python per byte, would show in both.
    read0, cpu0 = _bytes_read(), time.process_time()
    plan = P.make_plan(real_shapes, ram=64 * 2**30, disk_gbps=7, ram_gbps=20, n_ctx=32768)
    cpu, read = time.process_time() - cpu0, _bytes_read() - read0
    assert cpu < 1.0, f"the plan took {cpu:.2f} CPU-s"
    assert read < 4 * 2**20, f"the plan read(2) {read} bytes; its header is ~1 MB (mapped, not read)"
    assert plan.streams and plan.moe_layers == 42 and plan.n_experts == 42 * 288 and plan.top_k == 8
    matrix = 4096 * 1280 // 256 * 144  # one Q4_K [1280, 4096] expert matrix
    assert 3 * matrix <= plan.expert_bytes < 3 * (matrix + 8192)  # each part's read aligned to 4 KiB
    # Resident weights, the runtime with its KV cache, and the expert cache fit in the RAM given.
    assert plan.resident_bytes + plan.runtime_bytes + plan.cache_bytes <= 64 * 2**30
    assert plan.cache_slots == plan.cache_bytes // plan.expert_bytes and 0 < plan.cache_slots < plan.n_experts
    assert plan.cached_per_layer == pytest.approx(plan.cache_slots / 42)
    assert plan.hit_rate == pytest.approx(plan.cache_slots / plan.n_experts)  # uniform routing
    # the roofline, recomputed
    routed = 8 * 42 * plan.expert_bytes
    assert plan.disk_read_per_token == pytest.approx((1 - plan.hit_rate) * routed)
    assert plan.ram_read_per_token > plan.resident_bytes + routed
    assert plan.tok_s == pytest.approx(1 / max(plan.ram_read_per_token / 20e9, plan.disk_read_per_token / 7e9))
    assert plan.expected_tok_s == pytest.approx(1 / (plan.ram_read_per_token / 20e9 + plan.disk_read_per_token / 7e9))
    assert plan.bound == "compute"  # 3.6 GB of non-expert weights and 3 GB of experts a token at 20 GB/s
    slow_disk = P.make_plan(real_shapes, ram=64 * 2**30, disk_gbps=1, ram_gbps=20, n_ctx=32768)
    assert slow_disk.bound == "disk" and slow_disk.tok_s == pytest.approx(1e9 / slow_disk.disk_read_per_token)


def test_more_ram_more_hits_and_an_all_in_ram_machine(real_shapes):
    small = P.make_plan(real_shapes, ram=48 * 2**30, ram_gbps=20, disk_gbps=2)
    big = P.make_plan(real_shapes, ram=96 * 2**30, ram_gbps=20, disk_gbps=2)
    assert small.cache_slots < big.cache_slots and small.hit_rate < big.hit_rate and small.tok_s < big.tok_s
    huge = P.make_plan(real_shapes, ram=256 * 2**30, ram_gbps=20)
    assert not huge.streams and huge.hit_rate == 1.0 and huge.disk_read_per_token == 0 and huge.bound == "compute"


def test_too_little_ram_says_what_is_needed(real_shapes):
    # the machine --ram describes, named by its flag (it read as this host's "available memory")
    with pytest.raises(StepstreamError, match="streaming needs .* but the machine of --ram 4096 MiB, less 1024 MiB "
                                              r"kept for the OS and the runtime \(10% of it, at least 1 GiB\) leaves"):
        P.make_plan(real_shapes, ram=4 * 2**30, ram_gbps=20)


def test_json_fields(real_shapes, capsys):
    assert main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--disk-gbps", "3", "--ram-gbps", "15",
                 "--ctx", "8192", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("resident_bytes", "kv_bytes", "cache_bytes", "cache_slots", "cached_per_layer", "hit_rate",
                "hit_source", "ram_read_per_token", "disk_read_per_token", "compute_s", "disk_s", "tok_s", "bound", "expected_tok_s"):
        assert key in rep, key
    assert rep["n_ctx"] == 8192 and rep["disk_gbps"] == 3 and rep["ram_gbps"] == 15
    assert 0 <= rep["hit_rate"] <= 1 and rep["resident_bytes"] + rep["cache_bytes"] <= 64 * 2**30
    assert main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--ram-gbps", "15"]) == 0
    text = capsys.readouterr().out
    for what in ("placement:", "KV cache", "per MoE layer", "hit rate:", "uniform routing", "tok/s", "expected:"):
        assert what in text, what


def test_errors_are_one_line(tmp_path, real_shapes, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "-m", str(tmp_path / "missing.gguf")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "missing.gguf: no such file" in err and len(err.splitlines()) == 1
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    assert main(["plan", "-m", str(not_gguf), "--ram-gbps", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "x.gguf: not a GGUF file" in err and len(err.splitlines()) == 1
    for bad in ("lots", "-5GiB", "12 parsecs"):
        with pytest.raises(SystemExit) as e:
            main(["plan", "-m", str(real_shapes), "--ram", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--ram" in err, err
    assert main(["plan", "-m", str(real_shapes), "--vram", "8GiB", "--ram-gbps", "10"]) == 2
    assert "--vram" in capsys.readouterr().err
    assert main(["plan", "-m", str(real_shapes), "--ctx", "999999999", "--ram-gbps", "10"]) == 2
    assert "exceeds the model's context length" in capsys.readouterr().err


# ---------------------------------------------------------------- against what load builds

def test_resident_bytes_equal_the_placement(tiny_gguf):
    """The header arithmetic against offload.placement.resident_size over the weights load binds."""
    from offload.placement import resident_size
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.model.weights import load_weights

    for path in (tiny_gguf("q4_k_m"), P.Path(__file__).resolve().parent.parent / "runtime/data/step35-mini-q4_k_m.gguf"):
        f = GGUFModelFile(path)
        cfg = ModelConfig.from_gguf(f)
        assert P.resident_bytes(f, cfg) == resident_size(load_weights(f, cfg), cfg.n_layers), path


def test_plan_matches_what_load_places(tiny_gguf):
    """`plan --ram` for this machine's own limit gives the cache load builds with the same limit."""
    from runtime.base import system
    from runtime.loader import load

    path = tiny_gguf("q4_k_m")
    plan = P.make_plan(path, ram_gbps=10)
    assert not plan.streams  # a 10 MB model fits anywhere; load keeps it mapped
    m = load(str(path))
    assert m.placement is None
    limit = system.memory_limit()
    # the same limit: its kind, its cgroup and size, the host's total; not the memory left, which
    # other processes move between the two calls (1 in ~1,200 full runs read 19.8 against 19.9 GiB)
    def same(text):
        return re.sub(r"^available memory \S+ \S+ of", "available memory of", text).split(":")[0]
    assert same(plan.memory) == same(limit.text()), (plan.memory, limit.text())


# ---------------------------------------------------------------- hit-rate estimates

def test_che_approximation_against_a_simulated_lru():
    """Independent requests with skewed rates: Che's estimate within 2 points of offload.simulate's LRU."""
    from offload import simulate as S

    rng = np.random.default_rng(0)
    rates = rng.zipf(1.6, 200).astype(float)
    p = rates / rates.sum()
    keys = rng.choice(200, size=(30000, 1), p=p)
    for slots in (20, 50, 100):
        measured = S.lru(keys, slots)[5000:].mean()  # past the cold start
        assert abs(P.che_lru(rates, slots) - measured) < 0.02, slots
    assert P.che_lru(np.ones(100), 25) == pytest.approx(0.25)  # uniform: slots / keys
    assert P.che_lru(np.ones(100), 100) == 1.0


def test_hit_rate_from_a_profile_and_a_trace(tmp_path, tiny_gguf):
    from offload.profile import ExpertProfile
    from offload.trace import RoutingTrace

    path = tiny_gguf("q4_k_m")
    prof = tmp_path / "p.json"
    counts = {1: [100] * 4 + [1] * 12, 2: [1] * 16, 3: [1] * 16}
    ExpertProfile(path.name, path.stat().st_size, counts, 10).save(prof)
    rate, source = P._hit_rate(str(prof), path, 8, 48, 4, {1: 16, 2: 16, 3: 16})
    c = np.sort(np.concatenate([counts[l] for l in (1, 2, 3)]))[::-1].astype(float)
    assert rate == pytest.approx((c[:4].sum() + P.che_lru(c[4:], 4) * c[4:].sum()) / c.sum())
    assert "pinned" in source
    ids = np.random.default_rng(1).permuted(np.tile(np.arange(16), (50, 3, 1)), axis=2)[:, :, :4].astype(np.int16)
    tr = tmp_path / "t.npz"
    RoutingTrace(ids, np.array([1, 2, 3], np.int32), np.full(3, 16, np.int32), np.array([0]), path.name,
                 path.stat().st_size).save(tr)
    from offload import simulate as S

    rate, source = P._hit_rate(str(tr), path, 24, 48, 4, {1: 16, 2: 16, 3: 16})
    assert rate == pytest.approx(S.lru(S.requests(ids, np.full(3, 16)), 24).mean())
    assert "50 tokens of this model" in source


def _trace_of(tmp_path, model: Path, name: str | None = None, size: int | None = None, layers=None, n_expert=None,
              top_k=None) -> Path:
    """A routing trace recorded, by its metadata, on `model` (or on what the arguments say)."""
    from offload.expert_table import build_expert_table
    from offload.trace import RoutingTrace
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    f = GGUFModelFile(model)
    cfg = ModelConfig.from_gguf(f)
    table = build_expert_table(f, cfg)
    layers = sorted(table.layers) if layers is None else layers
    n_expert = [table.layers[l].n_expert for l in sorted(table.layers)] if n_expert is None else n_expert
    k = cfg.n_expert_used if top_k is None else top_k
    rng = np.random.default_rng(0)  # K different experts a token, as a router picks them
    ids = np.sort([[rng.permutation(min(n_expert))[:k] for _ in layers] for _ in range(20)], axis=2).astype(np.int16)
    path = tmp_path / f"trace-{uuid.uuid4().hex[:6]}.npz"
    RoutingTrace(ids, np.array(layers, np.int32), np.array(n_expert, np.int32), np.array([0]),
                 model.name if name is None else name, model.stat().st_size if size is None else size).save(path)
    return path


@pytest.mark.parametrize("other", ["model", "size", "layers", "experts", "top_k"])
def test_a_routing_trace_of_another_model_is_refused(tmp_path, real_shapes, capsys, other):
    """As a JSON profile of another model is: the trace of the shipped miniature given for the
    real-shape file, or one whose name and size match but whose shapes do not."""
    if other == "model":
        trace = _trace_of(tmp_path, SHIPPED)  # recorded on the miniature
        named = f"recorded on {SHIPPED.name}"
    else:
        n = 42
        change = {"size": dict(size=1), "layers": dict(layers=list(range(4, 4 + n))),
                  "experts": dict(n_expert=[256] * n), "top_k": dict(top_k=4)}[other]
        trace = _trace_of(tmp_path, real_shapes, **change)
        named = "recorded on real-shapes.gguf (1 bytes)" if other == "size" else "routing trace has 42 MoE layers"
    rc = main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--ram-gbps", "20", "--profile", str(trace)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(trace) in err and named in err, err
    assert "real-shapes.gguf" in err


def test_a_json_profile_and_a_trace_of_another_model_are_refused_alike(tmp_path, real_shapes):
    from offload.profile import ExpertProfile

    prof = tmp_path / "p.json"
    ExpertProfile(SHIPPED.name, SHIPPED.stat().st_size, {1: [1] * 8}, 10).save(prof)
    messages = []
    for p in (prof, _trace_of(tmp_path, SHIPPED)):
        with pytest.raises(StepstreamError) as e:
            P.make_plan(real_shapes, ram=64 * 2**30, ram_gbps=20, profile=str(p))
        messages.append(str(e.value).replace(str(p), "P").replace("routing trace", "profile"))
    assert messages[0] == messages[1]


def test_a_routing_trace_of_this_model_is_replayed(tmp_path, real_shapes):
    trace = _trace_of(tmp_path, real_shapes)
    plan = P.make_plan(real_shapes, ram=64 * 2**30, ram_gbps=20, profile=str(trace))
    assert plan.hit_source.startswith(f"LRU replay of the routing trace {trace.name} (20 tokens of this model)")
    assert 0 <= plan.hit_rate < 1



SHIPPED = Path(__file__).resolve().parents[1] / "runtime" / "data" / "step35-mini-q4_k_m.gguf"


def test_plan_refuses_a_directory_or_unreadable_profile_in_one_line(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "plan", "-m", str(SHIPPED), "--profile", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "is a directory" in r.stderr


@pytest.mark.parametrize("flag, rate", [("--disk-gbps", "1e-300"), ("--ram-gbps", "1e-300"), ("--disk-gbps", "0.001"),
                                        ("--ram-gbps", "20000")])
def test_absurd_rates_are_refused_by_flag(real_shapes, capsys, flag, rate):
    """Refused while the arguments are read, in one line stating the one range plan takes (the
    flag's parser once allowed up to 100,000 GB/s, then make_plan refused above 10,000)."""
    other = ["--ram-gbps", "20"] if flag == "--disk-gbps" else []
    with pytest.raises(SystemExit) as e:
        main(["plan", "-m", str(real_shapes), "--ram", "64GiB", flag, rate, *other])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"stepstream plan: error: argument {flag}: must be a rate in GB/s from "
                          f"{P.GBPS_RANGE[0]:g} to {P.GBPS_RANGE[1]:,.0f}, got {rate}"), err


def test_the_rate_flags_take_the_planner_s_whole_range(real_shapes, capsys):
    lo, hi = P.GBPS_RANGE
    for rate in (lo, hi):
        assert main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--disk-gbps", repr(rate),
                     "--ram-gbps", repr(rate), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["disk_gbps"] == rate


def test_json_ram_bytes_is_the_ram_given_and_usable_bytes_what_is_left(real_shapes, capsys):
    assert main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--ram-gbps", "15", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ram_bytes"] == 64 * 2**30
    assert rep["usable_bytes"] == rep["ram_bytes"] - rep["reserve_bytes"] and 0 < rep["reserve_bytes"] < 64 * 2**30


def test_plan_takes_c_for_the_context_as_run_does(tmp_path, capsys):
    """A review: `plan -c 65536` was 'ambiguous option: -c could match -ctk, -ctv', though plan's own
    refusal says 'use a smaller -c'."""
    path = tmp_path / "real.gguf"
    sparse_gguf(path, **REAL)
    assert main(["plan", "-m", str(path), "--ram", "64GiB", "--ram-gbps", "15", "-c", "8192", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["n_ctx"] == 8192


def test_plan_takes_b_as_run_and_bench_size_their_activations(real_shapes, capsys):
    """plan always planned with run's 64-token chunk, so it mispredicted bench's placement (-b
    512: larger activations, a smaller cache; a review: 71 slots planned, 58 in bench)."""
    from offload.placement import activation_bytes
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    cfg = ModelConfig.from_gguf(GGUFModelFile(real_shapes))
    run_like = P.make_plan(real_shapes, ram=64 * 2**30, ram_gbps=20)
    bench_like = P.make_plan(real_shapes, ram=64 * 2**30, ram_gbps=20, n_batch=512)
    grown = activation_bytes(cfg, 512) - activation_bytes(cfg, 64)
    assert bench_like.runtime_bytes - run_like.runtime_bytes == grown > 0
    assert bench_like.cache_slots <= run_like.cache_slots  # (on a 64 GiB machine the host's reserve covers the difference)
    assert main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--ram-gbps", "20", "-b", "512", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_slots"] == bench_like.cache_slots


def test_plan_for_serve_counts_its_prompt_cache(real_shapes, capsys):
    """`serve --cache-ram` keeps other conversations' KV caches, taken from the expert cache;
    `plan --cache-ram` plans that placement (it planned run's alone)."""
    from runtime.base.options import PROMPT_CACHE_AUTO

    run_like = P.make_plan(real_shapes, ram=64 * 2**30, ram_gbps=20)
    served = P.make_plan(real_shapes, ram=64 * 2**30, ram_gbps=20, prompt_cache=8 * 2**30)
    assert run_like.prompt_cache_bytes == 0 and served.prompt_cache_bytes == 8 * 2**30
    given_up = run_like.cache_bytes - served.cache_bytes
    assert abs(given_up - 8 * 2**30) < served.expert_bytes  # whole slots
    assert served.hit_rate < run_like.hit_rate
    auto = P.make_plan(real_shapes, ram=64 * 2**30, ram_gbps=20, prompt_cache="auto")
    assert auto.prompt_cache_bytes == min(PROMPT_CACHE_AUTO, auto.usable_bytes // 8) > 0
    assert main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--ram-gbps", "20", "--cache-ram", "8GiB",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_cache_bytes"] == 8 * 2**30 and out["cache_slots"] == served.cache_slots
    assert main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--ram-gbps", "20", "--cache-ram", "8GiB"]) == 0
    assert "prompt cache 8192 MiB (serve --cache-ram)" in capsys.readouterr().out
    # more than the machine holds: one line naming --cache-ram, status 2
    assert main(["plan", "-m", str(real_shapes), "--ram", "64GiB", "--ram-gbps", "20", "--cache-ram", "80GiB"]) == 2
    assert "--cache-ram" in capsys.readouterr().err
