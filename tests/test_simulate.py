"""offload.simulate: each policy against hand-worked traces, LRU and LFU against offload.cache's
own ExpertCache driven request by request, LRU against an OrderedDict, and Belady above every
online policy on random traces."""

from collections import OrderedDict

from pathlib import Path

import numpy as np
import pytest

from offload import simulate as S
from offload.cache import ExpertCache, Outcome
from offload.trace import RoutingTrace
from runtime.base.errors import StepstreamError


def one_layer(seq, E=4):
    """A trace of one MoE layer, top-1: requests [Q, 1]."""
    return S.requests(np.array(seq, np.int16).reshape(-1, 1, 1), np.array([E]))


def hit_positions(hits):
    return np.flatnonzero(hits.ravel()).tolist()


# ---------------------------------------------------------------- hand-worked

def test_hand_worked_two_slots():
    keys = one_layer([0, 1, 2, 0, 1, 3, 0])
    counts = S.key_counts(keys, 4)
    # LRU: 2 evicts 0, 0 evicts 1, 1 evicts 2, 3 evicts 0, 0 evicts 1: nothing ever hits
    assert hit_positions(S.lru(keys, 2)) == []
    # Belady: 2 evicts 1 (next use 4, after 0's 3), 1 evicts 2 (never again), 3 evicts 1 (never again)
    assert hit_positions(S.belady(keys, 2)) == [3, 6]
    # hot: the 2 - 1 hottest (expert 0, 3 uses) fixed; its first use is a read like any other
    assert hit_positions(S.hot(keys, 2, counts)) == [3, 6]
    # pinned: int(2 * 0.5) = 1 pinned (expert 0), one LRU slot streams the rest
    assert hit_positions(S.pinned(keys, 2, counts)) == [3, 6]


def test_hand_worked_lfu_against_lru():
    keys = one_layer([0, 0, 0, 1, 2, 1, 0])
    # LFU: 2 evicts 1 (1 use against 0's 3), 1 evicts 2, so 0 stays: hits at 1, 2 and 6
    assert hit_positions(S.lfu(keys, 2)) == [1, 2, 6]
    # LRU: 2 evicts 0 (released before 1), 0 evicts 2: hits at 1, 2 and 5
    assert hit_positions(S.lru(keys, 2)) == [1, 2, 5]
    # Belady: 2 evicts 0 (next use 6, after 1's 5)
    assert hit_positions(S.belady(keys, 2)) == [1, 2, 5]


def test_held_experts_are_never_the_victim():
    # top-2 of 3 experts in 2 slots: each request needs both slots, so the one key not asked for goes
    keys = S.requests(np.array([[[0, 1]], [[2, 1]], [[1, 0]]], np.int16), np.array([3]))
    for policy in (S.lru, S.lfu, S.belady):
        assert policy(keys, 2).tolist() == [[False, False], [True, False], [False, True]], policy.__name__


def test_keys_are_offset_by_layer_and_sorted():
    ids = np.array([[[3, 1], [0, 2]]], np.int16)  # one token, two layers of 4 and 5 experts
    assert S.requests(ids, np.array([4, 5])).tolist() == [[1, 3], [4, 6]]


def test_next_use():
    keys = one_layer([0, 1, 0, 2, 1])
    assert S.next_use(keys).ravel().tolist() == [2, 4, S.NEVER, S.NEVER, S.NEVER]


def test_too_few_slots_is_refused():
    keys = S.requests(np.zeros((2, 1, 4), np.int16) + np.arange(4, dtype=np.int16), np.array([8]))
    with pytest.raises(StepstreamError, match="3 slots cannot hold one request's 4 experts"):
        S.lru(keys, 3)


# ---------------------------------------------------------------- against references

def random_keys(rng, T=150, L=3, E=16, K=4, skew=1.0):
    """Token-to-token locality and a skewed popularity, like a trained router's."""
    p = rng.dirichlet(np.full(E, skew), size=L)  # [L, E]
    ids = np.empty((T, L, K), np.int16)
    for t in range(T):
        for l in range(L):
            if t and rng.random() < 0.4:
                ids[t, l] = ids[t - 1, l]
            else:
                ids[t, l] = rng.choice(E, K, replace=False, p=p[l])
    return S.requests(ids, np.full(L, E)), L * E


def ordered_dict_lru(keys, slots):
    """LRU written independently: hits first, then misses, all moved to the end when released."""
    cache: OrderedDict = OrderedDict()
    hits = np.zeros(keys.shape, bool)
    for q, row in enumerate(keys.tolist()):
        hit = [k in cache for k in row]
        for j, k in enumerate(row):
            if not hit[j]:
                if len(cache) >= slots:
                    victim = next(v for v in cache if v not in row)
                    del cache[victim]
                cache[k] = True
        for j in [j for j in range(len(row)) if hit[j]] + [j for j in range(len(row)) if not hit[j]]:
            cache.move_to_end(row[j])
        hits[q] = hit
    return hits


def expert_cache_hits(keys, slots, policy):
    """offload.cache.ExpertCache itself, driven as offload.provider serves a held request:
    resident experts acquired first, then the misses; all released in that order."""
    cache = ExpertCache(slots * 4096, 4096, policy, min_slots=keys.shape[1])
    hits = np.zeros(keys.shape, bool)
    for q, row in enumerate(keys.tolist()):
        order = [j for j, k in enumerate(row) if cache.is_ready((0, k))]
        order += [j for j in range(len(row)) if j not in order]
        held = []
        for j in order:
            slot, must_load, outcome = cache.acquire_counted((0, row[j]))
            if must_load:
                cache.loaded(slot, None)
            hits[q, j] = outcome is Outcome.HIT
            held.append((slot, row[j]))
        for slot, k in held:
            cache.release(slot, (0, k))
    return hits


@pytest.mark.parametrize("seed", range(4))
def test_lru_equals_an_ordered_dict(seed):
    keys, _ = random_keys(np.random.default_rng(seed))
    for slots in (4, 7, 12, 24, 40):
        assert (S.lru(keys, slots) == ordered_dict_lru(keys, slots)).all(), slots


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_policies_equal_the_expert_cache(seed, policy):
    keys, _ = random_keys(np.random.default_rng(100 + seed), T=80)
    for slots in (4, 9, 20, 36):
        expected = expert_cache_hits(keys, slots, policy)
        assert (getattr(S, policy)(keys, slots) == expected).all(), slots


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_never_beaten(seed):
    rng = np.random.default_rng(200 + seed)
    keys, n_keys = random_keys(rng, T=120, skew=[0.3, 1.0, 5.0][seed % 3])
    for slots in (4, 6, 12, 24, 47):
        got = S.simulate(keys, n_keys, slots)
        best = got["belady"].sum()
        for name, hits in got.items():
            assert hits.sum() <= best, (name, slots)
        # and it is an optimum reached by no cache that skips a hit: never below the compulsory floor
        assert best <= keys.size - np.unique(keys).size


def test_belady_equals_brute_force_on_tiny_traces():
    """Exhaustive search over every eviction choice (no bypass, held experts kept)."""
    from functools import lru_cache

    rng = np.random.default_rng(7)
    for _ in range(25):
        keys = S.requests(rng.integers(0, 5, size=(9, 1, 1)).astype(np.int16), np.array([5]))
        rows = [int(k) for k in keys.ravel()]
        for slots in (1, 2, 3):
            @lru_cache(None)
            def best(q, cache):
                if q == len(rows):
                    return 0
                k = rows[q]
                if k in cache:
                    return 1 + best(q + 1, cache)
                if len(cache) < slots:
                    return best(q + 1, cache | {k})
                return max(best(q + 1, (cache - {v}) | {k}) for v in cache)

            assert S.belady(keys, slots).sum() == best(0, frozenset()), (rows, slots)


# ---------------------------------------------------------------- the file and the command

def test_cli_table_and_json(tmp_path, capsys):
    import json

    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(16)[:4] for _ in range(2 * 60)]).reshape(60, 2, 4).astype(np.int16)
    path = tmp_path / "t.npz"
    RoutingTrace(ids, np.array([1, 2], np.int32), np.array([16, 16], np.int32), np.array([0]), "m.gguf", 5).save(path)
    assert S.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "belady-lru" in out and "25%" in out and "50%" in out
    assert S.main([str(path), "--slots", "8", "--slots-pct", "75", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [s["slots"] for s in rep["sizes"]] == [8, 24]
    expected = S.lru(S.requests(ids, np.array([16, 16])), 8).mean()
    assert rep["sizes"][0]["hit_rate"]["lru"] == pytest.approx(expected)
    assert rep["requests"] == 60 * 2 * 4 and 0 <= rep["best_possible"] <= 1


def test_cli_errors(tmp_path, capsys):
    assert S.main([str(tmp_path / "missing.npz")]) == 2
    assert "routing trace not found" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert S.main([str(bad)]) == 2
    assert "not a routing trace" in capsys.readouterr().err
    ids = np.zeros((3, 1, 2), np.int16) + np.arange(2, dtype=np.int16)
    good = tmp_path / "g.npz"
    RoutingTrace(ids, np.array([1], np.int32), np.array([8], np.int32), np.array([0]), "m.gguf", 5).save(good)
    assert S.main([str(good), "--slots", "9"]) == 2
    assert "--slots 9 exceeds the trace's 8 experts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        S.main([str(good), "--slots-pct", "0"])
    assert e.value.code == 2


@pytest.mark.parametrize("flag, value", [("--slots-pct", "inf"), ("--slots-pct", "1e400"), ("--slots-pct", "nan"),
                                         ("--slots-pct", "101"), ("--slots", "4,,8"), ("--slots", "2.5")])
def test_odd_sizes_are_refused_by_their_flag(tmp_path, capsys, flag, value):
    """`--slots-pct inf` was an OverflowError traceback; `4,,8` was read as 4,8."""
    ids = np.zeros((3, 1, 2), np.int16) + np.arange(2, dtype=np.int16)
    good = tmp_path / "g.npz"
    RoutingTrace(ids, np.array([1], np.int32), np.array([8], np.int32), np.array([0]), "m.gguf", 5).save(good)
    with pytest.raises(SystemExit) as e:
        S.main([str(good), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err, err


def test_a_fractional_percent_is_kept_and_output_errors_are_one_line(tmp_path):
    """12.5% was cut to 12%; a full disk or a closed pipe under stdout gave a traceback (exit 1)."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(16)[:4] for _ in range(2 * 60)]).reshape(60, 2, 4).astype(np.int16)
    path = tmp_path / "t.npz"
    RoutingTrace(ids, np.array([1, 2], np.int32), np.array([16, 16], np.int32), np.array([0]), "m.gguf", 5).save(path)
    cmd = [sys.executable, "-m", "offload.simulate", str(path), "--slots-pct", "12.5,50", "--json"]
    root = Path(S.__file__).resolve().parents[1]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [s["slots"] for s in json.loads(r.stdout)["sizes"]] == [4, 16]  # 12.5% of 32, 50% of 32
    with open("/dev/full", "w") as full:
        r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=root, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: could not write standard output (No space left on device)"
    p = subprocess.Popen(cmd[:-1] + ["--slots", ",".join(map(str, range(4, 33)))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root)
    p.stdout.close()  # the reader went away, as `| head -0`
    assert p.wait(timeout=120) == 141 and b"Traceback" not in p.stderr.read()


def test_trace_refuses_an_id_outside_its_layer():
    with pytest.raises(StepstreamError, match="outside 0..n_expert-1"):
        RoutingTrace(np.full((1, 1, 1), 8, np.int16), np.array([1], np.int32), np.array([8], np.int32),
                     np.array([0]), "m.gguf", 5)


# ---------------------------------------------------------------- input the command refuses

def _save(tmp_path, ids, n_expert=8, name="t.npz"):
    path = tmp_path / name
    L = ids.shape[1]
    RoutingTrace(np.asarray(ids, np.int16), np.arange(1, L + 1, dtype=np.int32), np.full(L, n_expert, np.int32),
                 np.array([0]), "m.gguf", 5).save(path)
    return path


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == "", captured
    return lines[0]


@pytest.mark.parametrize("policies", ["", " , ", ","])
def test_no_policy_is_refused(tmp_path, capsys, policies):
    path = _save(tmp_path, np.tile(np.arange(2), (5, 1, 1)))
    assert S.main([str(path), "--policies", policies]) == 2
    line = _one_error_line(capsys)
    assert "--policies" in line and "lru" in line, line


def test_a_token_naming_one_expert_twice_is_refused(tmp_path, capsys):
    """All K slots of one token the same expert: replayed, the repeats would count as hits."""
    ids = np.tile(np.arange(4), (6, 2, 1))
    ids[3, 1] = 5
    np.savez(tmp_path / "dup.npz", ids=ids.astype(np.int16), layers=np.array([1, 2], np.int32),
             n_expert=np.array([8, 8], np.int32), starts=np.array([0]), model=np.array("m.gguf"), model_bytes=np.int64(5))
    assert S.main([str(tmp_path / "dup.npz")]) == 2
    line = _one_error_line(capsys)
    assert "token 3 names expert 5 twice in MoE layer 2" in line, line
    with pytest.raises(StepstreamError, match="twice"):
        RoutingTrace(ids.astype(np.int16), np.array([1, 2], np.int32), np.array([8, 8], np.int32), np.array([0]),
                     "m.gguf", 5)


def test_an_empty_trace_is_refused(tmp_path, capsys):
    path = _save(tmp_path, np.zeros((0, 2, 2), np.int16))
    assert S.main([str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "no requests (0 tokens" in line and "--trace" in line, line


def test_a_json_profile_is_named_as_one(tmp_path, capsys):
    from offload.profile import ExpertProfile

    prof = tmp_path / "mini.profile.json"
    ExpertProfile("m.gguf", 5, {1: [3, 1, 0, 2]}, 6).save(prof)
    assert S.main([str(prof)]) == 2
    line = _one_error_line(capsys)
    assert str(prof) in line and "JSON expert profile" in line and "not a routing trace" in line, line
    assert "stepstream profile" in line and "--trace" in line and "pickled" not in line


def _raw(tmp_path, name, **changes):
    fields = dict(ids=np.tile(np.array([0, 1], np.int16), (3, 1, 1)), layers=np.array([1], np.int32),
                  n_expert=np.array([4], np.int32), starts=np.array([0], np.int64), model=np.array("m.gguf"),
                  model_bytes=np.int64(5))
    fields.update(changes)
    path = tmp_path / name
    np.savez(path, **fields)
    return path


@pytest.mark.parametrize("name,changes,words", [
    ("k0.npz", {"ids": np.zeros((3, 1, 0), np.int16)}, "names no expert per token"),
    ("bytes.npz", {"model_bytes": np.array([1, 2])}, "one name and one integer"),
    ("wide.npz", {"ids": np.tile(np.array([0, 70000]), (3, 1, 1)), "n_expert": np.array([70001], np.int32)},
     "ids hold 70000, outside 0..32767"),
    ("float.npz", {"n_expert": np.array([4.7])}, "n_expert are float64, expected integers"),
])
def test_malformed_traces_are_one_line(tmp_path, capsys, name, changes, words):
    """A review's traces: K = 0 and an array of model_bytes ended in tracebacks (exit 1), an id of
    70000 was replayed as 4464 and n_expert 4.7 as 4."""
    path = _raw(tmp_path, name, **changes)
    assert S.main([str(path), "--slots", "2"]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and words in line, line


def test_a_text_file_is_not_called_pickled_data(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("def f(x):\n    return x\n")
    assert S.main([str(path)]) == 2
    line = _one_error_line(capsys)
    assert "not a routing trace (not an .npz archive" in line and "pickle" not in line, line
