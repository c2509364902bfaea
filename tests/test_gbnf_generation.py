"""GBNF grammars where users give them: greedy tokens under a grammar are llama.cpp's (its
grammar sampler then greedy, through llama-cpp-python's C API, on the same float32 file);
`run --grammar/--grammar-file` (llama.cpp's flags); the Python API's `grammar=` (GBNF text,
or llama-cpp-python's LlamaGrammar); the server's `grammar` field (llama-server's) on
/completion, /v1/completions and chat, through the openai client."""

from __future__ import annotations

from pathlib import Path

import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.generation import sampling_params
from runtime.generation.loop import generate
from runtime.generation.sampling import Sampler
from runtime.text.gbnf_grammar import GbnfGrammar
from runtime.text.json_constraint import JsonObjectReply, vocabulary

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
ARITHMETIC = 'root ::= (expr "=" ws num "\\n"){1,2}\nexpr ::= term ([-+*/] term)*\nterm ::= [a-z] [a-z0-9_]{0,6} ws | num\n' \
             'num ::= [0-9]{1,4} ws\nws ::= " "?\n'
# (positive classes: under `.` or a negated class llama.cpp also lets through tokens of bytes F5-FF,
# which begin no character, and a random-weight model picks them; tests/test_gbnf.py checks that case)
DEF = 'root ::= "def " name "(" args? "):\\n" ("    " [a-z0-9 _().,=+*-]{1,40} "\\n"){1,2}\n' \
      'name ::= [a-z_]{1,12}\nargs ::= name (", " name){0,2}\n'
YES_NO = 'root ::= ("yes" | "no") "."\n'


def _whole(grammar_text: str, text: str) -> bool:
    g = GbnfGrammar(grammar_text)
    s = g.start()
    for c in text.encode():
        s = g.step(s, c)
        if s is None:
            return False
    return g.complete(s)


def _llama_cpp_greedy(path, prompt: list[int], n: int, grammar: str) -> list[int]:
    import llama_cpp as lc

    llm = lc.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_grammar(lc.llama_model_get_vocab(llm.model),
                                                                    grammar.encode(), b"root"))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    out = []
    llm.eval(prompt)
    eog = {t for t in range(llm.n_vocab()) if lc.llama_vocab_is_eog(lc.llama_model_get_vocab(llm.model), t)}
    for _ in range(n):
        tok = lc.llama_sampler_sample(chain, llm._ctx.ctx, -1)  # (accepts it too)
        out.append(tok)
        if tok in eog:
            break
        llm.eval([tok])
    lc.llama_sampler_free(chain)
    llm.close()
    return out


@pytest.mark.parametrize("grammar", [ARITHMETIC, DEF])
def test_greedy_tokens_under_a_grammar_equal_llama_cpp(tiny_gguf, grammar):
    pytest.importorskip("llama_cpp")
    path = tiny_gguf("f32")
    model = runtime.load(str(path), n_ctx=256)
    prompt = model.tokenize("def fibonacci(n):\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n")
    sampler = Sampler(sampling_params(temperature=0))
    sampler.constraint = JsonObjectReply(vocabulary(model.tokenizer), grammar=GbnfGrammar(grammar))
    ours = list(generate(model, prompt, sampler, 60))
    plain = list(generate(model, prompt, Sampler(sampling_params(temperature=0)), 60))
    model.close()
    assert ours != plain[:len(ours)]  # the grammar changes the text here
    assert ours == _llama_cpp_greedy(path, prompt, 60, grammar)


@pytest.fixture(scope="module")
def shipped():
    m = runtime.load(str(SHIPPED), n_ctx=1024, n_threads=1)
    yield m
    m.close()


def test_the_python_api_takes_gbnf_text_and_llama_cpp_pythons_grammar(shipped):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = shipped
    texts = set()
    for grammar in (DEF, llama_cpp.LlamaGrammar.from_string(DEF), runtime.LlamaGrammar.from_string(DEF)):
        r = m.create_completion("import os\n\n", max_tokens=80, temperature=0, grammar=grammar)
        texts.add(r["choices"][0]["text"])
        assert r["choices"][0]["finish_reason"] == "stop"
    assert len(texts) == 1 and _whole(DEF, texts.pop())
    for mtp in (3, "auto"):  # the heads draft; a verify pass keeps only what plain decoding under the grammar gives
        r = m.create_completion("import os\n\n", max_tokens=80, temperature=0, grammar=DEF, mtp=mtp)
        assert r["choices"][0]["text"] == m.create_completion("import os\n\n", max_tokens=80, temperature=0,
                                                               grammar=DEF, mtp=0)["choices"][0]["text"]
    seeded = m.create_completion("import os\n\n", max_tokens=80, temperature=0.9, seed=3, grammar=DEF, logprobs=2)
    assert _whole(DEF, seeded["choices"][0]["text"]) and seeded["choices"][0]["logprobs"]["tokens"]
    ids = list(m.generate(m.tokenize("Answer: "), grammar=YES_NO, temperature=0))
    assert _whole(YES_NO, m.detokenize(ids[:-1]).decode()) and ids[-1] in m.tokenizer.eog_ids
    reply = m.create_chat_completion([{"role": "user", "content": "Is 7 prime?"}], grammar=YES_NO,
                                     max_tokens=300, reasoning_budget=8)
    assert reply["choices"][0]["message"]["content"] in ("yes.", "no.")
    with pytest.raises(StepstreamError, match="line 1, column 10: rule 'x' is used but never defined"):
        m.create_completion("a", grammar="root ::= x")
    with pytest.raises(StepstreamError, match="give response_format or grammar, not both"):
        m.create_chat_completion([{"role": "user", "content": "x"}], grammar=YES_NO,
                                 response_format={"type": "json_object"})
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(StepstreamError, match="grammar goes without tools"):
        m.create_chat_completion([{"role": "user", "content": "x"}], grammar=YES_NO, tools=[tool])


def test_a_grammar_file_that_cannot_be_read_or_used_is_named(tmp_path):
    bad = tmp_path / "bad.gbnf"
    bad.write_text('root ::= "a"\nroot ::= "b"\n')
    with pytest.raises(StepstreamError, match=r"bad.gbnf: line 2, column 1: rule 'root' is defined twice"):
        runtime.LlamaGrammar.from_file(bad)
    with pytest.raises(StepstreamError, match="cannot read the grammar"):
        runtime.LlamaGrammar.from_file(tmp_path / "none.gbnf")


def test_run_takes_a_grammar_as_llama_cpp_takes_it(capsys, tmp_path):
    from runtime.cli import main

    f = tmp_path / "def.gbnf"
    f.write_text(DEF)
    for flags in (["--grammar", DEF], ["--grammar-file", str(f)]):
        assert main(["run", "-m", str(SHIPPED), "-p", "import os\n\n", "-n", "80", "--temp", "0", "-t", "1",
                     "--no-display-prompt", *flags]) == 0
        out, err = capsys.readouterr()
        assert out.endswith("\n") and _whole(DEF, out[:-1]) and "[stop]" in err, (out, err)  # (run ends with a newline)
    f.write_text('root ::= "a" [b-\n')
    assert main(["run", "-m", str(SHIPPED), "-p", "x", "--grammar-file", str(f)]) == 2
    assert capsys.readouterr().err == f"error: {f}: line 1, column 14: a character class is not closed (missing ])\n"
    with pytest.raises(SystemExit) as e:  # one or the other (argparse's exit)
        main(["run", "-m", str(SHIPPED), "-p", "x", "--grammar", "root ::= x", "-j", "{}"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_chat_holds_each_reply_to_the_grammar():
    """`stepstream chat --grammar` (llama-cli's, in conversation): each reply follows the grammar
    after its reasoning, and the conversation goes on."""
    import argparse
    import io

    from runtime.cli import chat as chat_cli

    p = argparse.ArgumentParser()
    chat_cli.add_arguments(p)
    args = p.parse_args(["-m", str(SHIPPED), "-t", "1", "-n", "200", "--reasoning-budget", "8", "--grammar", YES_NO])
    out = io.StringIO()
    assert chat_cli.run(args, stdin=io.StringIO("Is 7 prime?\nAnd 8?\n/exit\n"), stdout=out) == 0
    replies = [line for line in out.getvalue().split("\n") if line.strip()]
    assert len(replies) == 2 and all(r.endswith(("yes.", "no.")) for r in replies), out.getvalue()


@pytest.fixture(scope="module")
def served(shipped):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from runtime.server.app import create_app
    from runtime.server.engine import Engine

    engine = Engine(shipped)
    engine.start()
    with TestClient(create_app(engine, model_name="m", api_key="k"), headers={"Authorization": "Bearer k"}) as client:
        yield client
    engine.close()


def test_the_servers_grammar_field(served):
    """llama-server's `grammar`: on its native route (echoed in generation_settings), on
    /v1/completions and on chat through the openai client; with json_schema, response_format or
    tools it is a 400, and so is a grammar that cannot be used, naming line and column."""
    openai = pytest.importorskip("openai")
    http = served
    r = http.post("/completion", json={"prompt": "import os\n\n", "n_predict": 80, "grammar": DEF, "seed": 1})
    assert r.status_code == 200, r.text
    got = r.json()
    assert _whole(DEF, got["content"]) and got["stop_type"] == "eos" and got["generation_settings"]["grammar"] == DEF
    client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="k", http_client=http)
    text = client.completions.create(model="m", prompt="import os\n\n", max_tokens=80, temperature=0,
                                     extra_body={"grammar": DEF}).choices[0].text
    assert _whole(DEF, text)
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Is 7 prime?"}],
                                          max_tokens=300, extra_body={"grammar": YES_NO, "thinking_budget_tokens": 8})
    assert chat.choices[0].message.content in ("yes.", "no.")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for extra, message in (({"grammar": "root ::= x"}, "'grammar': line 1, column 10: rule 'x' is used but never "
                                                       "defined"),
                           ({"grammar": 5}, "'grammar' must be GBNF text (a string)"),
                           ({"grammar": YES_NO, "json_schema": {"type": "integer"}},
                            "give 'json_schema' or llama-server's 'grammar', not both"),
                           ({"grammar": YES_NO, "response_format": {"type": "json_object"}},
                            "give 'response_format' or llama-server's 'grammar', not both")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="m", prompt="x", max_tokens=4, extra_body=extra)
        assert e.value.body["message"] == message and e.value.body["param"] == "grammar"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=[tool],
                                       extra_body={"grammar": YES_NO})
    assert e.value.body["message"].startswith("'grammar' goes without 'tools'")
    r = http.post("/v1/responses", json={"model": "m", "input": "Is 7 prime?", "grammar": YES_NO,
                                         "max_output_tokens": 300, "reasoning": {"effort": "minimal"}})
    assert r.status_code == 200, r.text
    assert r.json()["output"][-1]["content"][0]["text"] in ("yes.", "no.")
