"""llama.cpp's other samplers (runtime/generation/sampling.py): top-n-sigma, typical and
XTC keep the tokens llama.cpp's own samplers keep (through llama-cpp-python's C API, on the same
logits), alone and in llama.cpp's default order; each greedy token under them is the one
llama.cpp's chain chooses from the same logits; the server, the CLI and the Python API take them
by llama.cpp's names. Mirostat 1 and 2 draw from the tokens llama.cpp's mirostat draws from, step
after step as its target surprise moves."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.generation import sampling_params
from runtime.generation.loop import generate
from runtime.generation.sampling import (Sampler, SamplingParams, dynamic_temperature, min_p, mirostat_candidates,
                                         mirostat_update, temperature, top_k, top_n_sigma, top_p, typical, xtc)

lc = pytest.importorskip("llama_cpp")


def _kept_by_llama_cpp(samplers: list, logits: np.ndarray) -> set[int]:
    """The token ids llama.cpp's samplers, applied in order to `logits`, leave in the array."""
    n = logits.size
    data = (lc.llama_token_data * n)(*[lc.llama_token_data(i, float(logits[i]), 0.0) for i in range(n)])
    arr = lc.llama_token_data_array(data, n, -1, False)
    for s in samplers:
        lc.llama_sampler_apply(s, ctypes.byref(arr))
        lc.llama_sampler_free(s)
    out = ctypes.cast(arr.data, ctypes.POINTER(lc.llama_token_data))  # (XTC moves the start)
    return {out[i].id for i in range(arr.size) if np.isfinite(out[i].logit)}


def _kept(z: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(z)).tolist())


def _logits(seed: int, n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, rng.uniform(0.5, 4), n).astype(np.float32)
    z[rng.integers(0, n, 3)] += rng.uniform(2, 8)  # a few likely tokens, as a model's
    return z


def test_each_filter_keeps_what_llama_cpps_keeps():
    checked = 0
    for seed in range(12):
        z = _logits(seed)
        for n in (0.5, 1.0, 2.5):
            assert _kept(top_n_sigma(z, n)) == _kept_by_llama_cpp([lc.llama_sampler_init_top_n_sigma(n)], z)
        for p in (0.1, 0.5, 0.9, 0.99):
            assert _kept(typical(z, p)) == _kept_by_llama_cpp([lc.llama_sampler_init_typical(p, 1)], z)
        for t in (0.02, 0.1, 0.3):  # probability 1: always on, so no draw decides
            want = _kept_by_llama_cpp([lc.llama_sampler_init_xtc(1.0, t, 1, 0)], z)
            assert _kept(xtc(z, 1.0, t, np.random.default_rng(0))) == want
            checked += len(want) < z.size
    assert checked > 5  # (XTC removed tokens in most cases)
    z = _logits(0)
    assert _kept(xtc(z, 1.0, 0.6, np.random.default_rng(0))) == set(range(z.size))  # threshold over 0.5: off
    assert _kept(typical(z, 1.0)) == _kept(top_n_sigma(z, -1)) == set(range(z.size))


def test_the_default_order_keeps_what_llama_cpps_chain_keeps():
    """top-n-sigma, top-k, typical, top-p, min-p, XTC: llama.cpp's default order. (Not typical
    after top-n-sigma: llama.cpp's typical then takes its entropy over the -inf logits top-n-sigma
    leaves in the array, a NaN; here it is taken over the tokens still in.)"""
    for seed in range(10):
        z = _logits(100 + seed)
        ours = xtc(min_p(top_p(typical(top_k(z, 60), 0.8), 0.95), 0.02), 1.0, 0.05, np.random.default_rng(0))
        theirs = _kept_by_llama_cpp([lc.llama_sampler_init_top_k(60), lc.llama_sampler_init_typical(0.8, 1),
                                     lc.llama_sampler_init_top_p(0.95, 1), lc.llama_sampler_init_min_p(0.02, 1),
                                     lc.llama_sampler_init_xtc(1.0, 0.05, 1, 0)], z)
        assert _kept(ours) == theirs
        ours = xtc(min_p(top_p(top_k(top_n_sigma(z, 3.0), 60), 0.95), 0.02), 1.0, 0.05, np.random.default_rng(0))
        theirs = _kept_by_llama_cpp([lc.llama_sampler_init_top_n_sigma(3.0), lc.llama_sampler_init_top_k(60),
                                     lc.llama_sampler_init_top_p(0.95, 1), lc.llama_sampler_init_min_p(0.02, 1),
                                     lc.llama_sampler_init_xtc(1.0, 0.05, 1, 0)], z)
        assert _kept(ours) == theirs


def _llama_cpp_chain(params: SamplingParams) -> list:
    return [lc.llama_sampler_init_top_n_sigma(params.top_n_sigma), lc.llama_sampler_init_top_k(params.top_k),
            lc.llama_sampler_init_typical(params.typical_p, 1), lc.llama_sampler_init_top_p(params.top_p, 1),
            lc.llama_sampler_init_min_p(params.min_p, 1),
            lc.llama_sampler_init_xtc(params.xtc_probability, params.xtc_threshold, 1, 0)]


@pytest.mark.parametrize("kw", [dict(typical_p=0.4), dict(xtc_probability=1.0, xtc_threshold=0.08),
                                dict(typical_p=0.9, xtc_probability=1.0, xtc_threshold=0.15, top_k=0),
                                dict(top_n_sigma=0.5, xtc_probability=1.0, xtc_threshold=0.15)])
def test_greedy_tokens_under_them_are_llama_cpps_chains_choice(tiny_gguf, kw):
    """At temperature 0 each token is the most likely one llama.cpp's chain (its samplers, in its
    default order, then its temperature sampler at 0, which keeps the largest logit) leaves of
    the same logits; typical and XTC can remove the most likely token, so the text changes."""
    model = runtime.load(str(tiny_gguf("f32")), n_ctx=256)
    prompt = model.tokenize("def fibonacci(n):\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\ndef")
    params = sampling_params(temperature=0, **kw)
    ours = list(generate(model, prompt, Sampler(params), 24, stop_at_eog=False))
    model.reset()
    plain = list(generate(model, prompt, Sampler(sampling_params(temperature=0)), 24, stop_at_eog=False))
    assert ours != plain
    logits = model.logits(prompt + ours)[len(prompt) - 1:]  # [24 + 1, V]: row i chose ours[i]
    for i, tok in enumerate(ours):
        kept = sorted(_kept_by_llama_cpp(_llama_cpp_chain(params), logits[i]))
        assert tok == kept[int(np.argmax(logits[i][kept]))], i
    model.close()


def test_they_are_taken_by_llama_cpps_names():
    from runtime.cli.demo import model_path

    with runtime.load(model_path(), n_ctx=256, n_threads=1) as m:
        plain = m.create_completion("import os\n", max_tokens=12, temperature=0)["choices"][0]["text"]
        got = m.create_completion("import os\n", max_tokens=12, temperature=0, typical_p=0.3)["choices"][0]["text"]
        want = m.detokenize(list(generate(m, m.tokenize("import os\n"), Sampler(sampling_params(
            temperature=0, typical_p=0.3)), 12, stop_at_eog=False))).decode("utf-8", "replace")
        assert got == want != plain
    with pytest.raises(StepstreamError, match=r"xtc_probability must be in \[0, 1\], got 1.5"):
        SamplingParams(xtc_probability=1.5)
    with pytest.raises(StepstreamError, match="typical_p must be a finite number"):
        SamplingParams(typical_p=float("nan"))


def test_the_cli_and_the_server_take_them(capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from runtime.cli import main
    from runtime.cli.demo import model_path
    from runtime.server.app import create_app
    from runtime.server.engine import Engine

    args = ["run", "-m", str(model_path()), "-p", "import os\n", "-n", "12", "--temp", "0", "-t", "1",
            "--no-display-prompt"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--xtc-probability", "1", "--xtc-threshold", "0.1", "--typical", "0.9",
                        "--top-nsigma", "2"]) == 0
    assert capsys.readouterr().out != plain
    with pytest.raises(SystemExit) as e:  # (argparse's exit)
        main(args + ["--xtc-threshold", "1.5"])
    assert e.value.code == 2 and "--xtc-threshold: must be in [0, 1], got 1.5" in capsys.readouterr().err
    model = runtime.load(model_path(), n_ctx=256, n_threads=1)
    engine = Engine(model)
    engine.start()
    try:
        with TestClient(create_app(engine, model_name="m")) as http:
            settings = {"typical_p": 0.9, "xtc_probability": 1.0, "xtc_threshold": 0.1, "top_n_sigma": 2.0}
            r = http.post("/completion", json={"prompt": "import os\n", "n_predict": 12, "temperature": 0, **settings})
            assert r.status_code == 200, r.text
            got = r.json()
            assert {k: got["generation_settings"][k] for k in settings} == settings
            native = {"top_k": 40, "top_p": 0.95, "min_p": 0.05}  # (/completion's defaults are llama-server's)
            assert http.post("/v1/completions", json={"prompt": "import os\n", "max_tokens": 12, "temperature": 0,
                                                      **settings, **native}).json()["choices"][0]["text"] == got["content"]
            r = http.post("/v1/completions", json={"prompt": "x", "typical_p": -1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "typical_p"
    finally:
        engine.close()
        model.close()


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_draws_from_llama_cpps_candidates_as_mu_moves(version):
    """llama.cpp's mirostat sampler, kept across 25 steps of random logits, truncates and draws;
    ours, told each of its draws, keeps the same tokens at each step: the truncation and the
    update of the target surprise mu are llama.cpp's."""
    tau, eta = 3.0, 0.3
    n = 300
    theirs = (lc.llama_sampler_init_mirostat(n, 7, tau, eta, 100) if version == 1
              else lc.llama_sampler_init_mirostat_v2(7, tau, eta))
    mu = 2 * tau
    sizes = set()
    try:
        for step in range(25):
            z = _logits(200 + step, n)
            data = (lc.llama_token_data * n)(*[lc.llama_token_data(i, float(z[i]), 0.0) for i in range(n)])
            arr = lc.llama_token_data_array(data, n, -1, False)
            lc.llama_sampler_apply(theirs, ctypes.byref(arr))
            kept = {data[i].id for i in range(arr.size)}
            drawn = data[arr.selected].id
            keep, probs = mirostat_candidates(z, mu, version)
            assert set(keep.tolist()) == kept, step
            assert drawn in kept
            mu = mirostat_update(mu, float(probs[list(keep).index(drawn)]), tau, eta)
            sizes.add(len(kept))
    finally:
        lc.llama_sampler_free(theirs)
    assert len(sizes) > 3  # (mu moved the cut)


def test_mirostat_is_taken_by_llama_cpps_names_and_draws_reproducibly():
    from runtime.cli.demo import model_path

    with runtime.load(model_path(), n_ctx=256, n_threads=1) as m:
        a = m.create_completion("import os\n", max_tokens=24, temperature=0.8, seed=3, mirostat_mode=2,
                                mirostat_tau=3.0)["choices"][0]["text"]
        b = m.create_completion("import os\n", max_tokens=24, temperature=0.8, seed=3, mirostat=2,
                                mirostat_tau=3.0)["choices"][0]["text"]
        c = m.create_completion("import os\n", max_tokens=24, temperature=0.8, seed=3)["choices"][0]["text"]
        assert a == b != c
        for mtp in (3, "auto"):  # the heads draft; a verify pass samples as plain decoding does
            assert m.create_completion("import os\n", max_tokens=24, temperature=0.8, seed=3, mirostat=2,
                                       mirostat_tau=3.0, mtp=mtp)["choices"][0]["text"] == a
    with pytest.raises(StepstreamError, match="mirostat must be 0 .off., 1 or 2, got 3"):
        SamplingParams(mirostat=3)


def test_dynamic_temperature_scales_as_llama_cpps_temp_ext():
    """llama.cpp's temp-ext sampler with a range: the logits it leaves are ours divided by the
    dynamic temperature (after top-k, as in its chain), to float32's precision."""
    for seed in range(8):
        z = top_k(_logits(300 + seed), 50)
        for t, spread, exponent in ((0.8, 0.5, 1.0), (1.2, 1.0, 2.0), (0.0, 0.7, 0.5)):
            n = z.size
            data = (lc.llama_token_data * n)(*[lc.llama_token_data(i, float(z[i]), 0.0) for i in range(n)])
            arr = lc.llama_token_data_array(data, n, -1, False)
            top = lc.llama_sampler_init_top_k(50)
            ext = lc.llama_sampler_init_temp_ext(t, spread, exponent)
            lc.llama_sampler_apply(top, ctypes.byref(arr))  # (its array then holds the 50 alone, as ours)
            lc.llama_sampler_apply(ext, ctypes.byref(arr))
            lc.llama_sampler_free(top)
            lc.llama_sampler_free(ext)
            theirs = {data[i].id: data[i].logit for i in range(arr.size)}
            dyn = dynamic_temperature(z, t, spread, exponent)
            ours = temperature(z, dyn)
            assert set(theirs) == set(np.flatnonzero(np.isfinite(z)).tolist())
            for tok, v in theirs.items():
                assert ours[tok] == pytest.approx(v, rel=2e-5, abs=2e-5), (seed, t, tok)
    # at temperature 0 with a range, tokens are drawn (as in llama.cpp), not the argmax
    z = _logits(1)
    picks = {Sampler(SamplingParams(temperature=0, dynatemp_range=1.5, top_k=0, top_p=1, min_p=0, seed=s))(z)
             for s in range(20)}
    assert len(picks) > 1


def test_corners_review_101_found():
    """Mirostat 1 whose target surprise grew past float range keeps one token (an OverflowError
    before; llama.cpp's int(k) is then the lowest int, and it keeps one); dynamic temperature
    after top-n-sigma divides by the size of llama.cpp's array, which keeps top-n-sigma's -inf
    tokens (here the whole vocabulary: top-k, top-p and min-p off)."""
    z = _logits(5)
    keep, _ = mirostat_candidates(z, 2000.0, 1)
    assert keep.size == 1
    s = Sampler(SamplingParams(mirostat=1, mirostat_tau=600, temperature=1, seed=0))
    assert 0 <= s(z, [1]) < z.size
    n = z.size
    ref = (lc.llama_token_data * n)(*[lc.llama_token_data(i, float(z[i]), 0.0) for i in range(n)])
    arr = lc.llama_token_data_array(ref, n, -1, False)
    for smpl in (lc.llama_sampler_init_top_n_sigma(1.0), lc.llama_sampler_init_temp_ext(1.0, 0.5, 1.0)):
        lc.llama_sampler_apply(smpl, ctypes.byref(arr))
        lc.llama_sampler_free(smpl)
    theirs = {ref[i].id: ref[i].logit for i in range(arr.size) if np.isfinite(ref[i].logit)}
    kept = top_n_sigma(z, 1.0)
    t = dynamic_temperature(kept, 1.0, 0.5, 1.0, n)
    for tok, v in theirs.items():
        assert kept[tok] / t == pytest.approx(v, rel=2e-5, abs=2e-5)
    picks = {Sampler(SamplingParams(top_n_sigma=1.0, top_k=0, top_p=1, min_p=0, dynatemp_range=0.5, seed=i))(z)
             for i in range(3)}
    assert picks <= set(theirs)
