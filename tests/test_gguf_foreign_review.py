"""GGUF files stepstream did not write, as a review made them from the shipped model with gguf-py:
a tokenizer without the checkpoint's tokenizer.json (every file llama.cpp's converter writes)
whose metadata is odd or broken, NaN in an MTP head or a router's bias, no output head. What
llama.cpp runs must run with its tokens (llama-cpp-python on the same file, the reference);
what it refuses is one line and exit status 2, never a traceback."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest

from runtime.base.gguf_schema import Key
from runtime.cli import main
from tests.helpers.cli_output import error_line
from tests.helpers.gguf_edit import rewrite

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"
TEXTS = ["def f(x):\n    return x + 1", "Hello, world! 12345 ünïcode"]


@pytest.fixture(scope="module")
def source():
    r = gguf.GGUFReader(MODEL)
    return {k: r.fields[k].contents() for k in (Key.TOK_MERGES, Key.TOK_LIST)}


def _edited(tmp_path, **kw):
    out = tmp_path / "edited.gguf"
    drop = tuple(kw.pop("drop", ())) + (Key.HF_JSON,)
    rewrite(MODEL, out, drop=drop, **kw)
    return out


def _run(path, *args) -> int:
    return main(["run", "-m", str(path), "-p", "def f(x):", "-n", "4", "--temp", "0", "-t", "1", "-c", "64",
                 *args])


def _llama_tokens(path) -> list[list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS]
    finally:
        llm.close()


def test_merges_naming_no_tokens_are_left_out_as_llama_cpp_leaves_them(tmp_path, source):
    """A merge whose pieces are no tokens, and one without a space: `tokenizers` raised (a
    traceback, exit 1); llama.cpp loads the file and tokenizes as the clean one."""
    import runtime

    merges = list(source[Key.TOK_MERGES])
    merges[2], merges[5] = "zzzq qqqz", "nospacehere"
    path = _edited(tmp_path, change={Key.TOK_MERGES: merges})
    with pytest.warns(UserWarning, match="2 of .* are left out"):
        m = runtime.load(path, n_ctx=64)
    assert [m.tokenize(t, add_bos=False) for t in TEXTS] == _llama_tokens(path)


@pytest.mark.parametrize("edit, words", [
    ("duplicate", "holds 'Ġun' twice" ),
    ("tokens-int", "tokenizer.ggml.tokens must be an array of strings"),
    ("types-text", "tokenizer.ggml.token_type must be an array of"),
    ("no-merges", "tokenizer.ggml.merges is missing"),
])
def test_broken_tokenizer_metadata_is_one_line(tmp_path, source, capsys, edit, words):
    tokens = list(source[Key.TOK_LIST])
    if edit == "duplicate":
        i = tokens.index("Ġun")
        tokens[i + 1] = tokens[i]
        path = _edited(tmp_path, change={Key.TOK_LIST: tokens})
    elif edit == "tokens-int":
        path = _edited(tmp_path, drop=(Key.TOK_LIST,),
                       add={Key.TOK_LIST: (list(range(len(tokens))), gguf.GGUFValueType.ARRAY)})
    elif edit == "types-text":
        path = _edited(tmp_path, drop=(Key.TOK_TYPES,),
                       add={Key.TOK_TYPES: (["x"] * len(tokens), gguf.GGUFValueType.ARRAY)})
    else:
        path = _edited(tmp_path, drop=(Key.TOK_MERGES,))
    assert _run(path) == 2
    line = error_line(capsys)
    assert str(path) in line and words in line, line


def _with_tensor(tmp_path, name, edit):
    """A copy whose tensor `name` (float32) went through edit(array)."""
    r = gguf.GGUFReader(MODEL)
    out = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(out, r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        w.add_key_value(key, field.contents(), field.types[0],
                        field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        data = np.array(t.data)
        if t.name == name:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            edit(data)
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _nan_at_0(a):
    a.reshape(-1)[0] = np.nan


def test_nan_in_an_mtp_head_is_one_line_and_the_trunk_still_runs(tmp_path, capsys):
    """The default run (--mtp auto) ended in ZeroDivisionError inside the heads' kernels."""
    path = _with_tensor(tmp_path, "blk.5.nextn.enorm.weight", _nan_at_0)
    assert main(["run", "-m", str(path), "-p", "def f(x):", "-n", "4", "--temp", "0", "-t", "1", "-c", "64"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "NaN or Inf in the MTP heads' pass" in lines[0] and "--mtp 0" in lines[0], err
    assert _run(path, "--mtp", "0") == 0


def test_nan_in_a_router_bias_is_refused_at_load(tmp_path, capsys):
    """It only chooses experts, so the check of each evaluation's hidden states never saw it:
    the run went on with other experts than llama.cpp's."""
    path = _with_tensor(tmp_path, "blk.1.exp_probs_b.bias", lambda a: a.reshape(-1).__setitem__(3, np.nan))
    assert _run(path) == 2
    line = error_line(capsys)
    assert "'blk.1.exp_probs_b.bias' holds nan at entry 3" in line, line


def test_a_file_without_its_output_head_is_refused_as_llama_cpp_refuses_it(tmp_path, capsys):
    path = tmp_path / "headless.gguf"
    rewrite(MODEL, path, keep_tensor=lambda name: name != "output.weight")
    assert _run(path) == 2
    line = error_line(capsys)
    assert "tensor 'output.weight' is missing" in line, line


@pytest.mark.parametrize("change", ["leading dense 2", "no nextn key"])
def test_a_block_kind_disagreement_is_the_one_line_said(tmp_path, capsys, change):
    """A warning about unused tensors came first, pointing at the wrong cause (a review)."""
    path = tmp_path / "kinds.gguf"
    if change == "leading dense 2":
        rewrite(MODEL, path, change={"step35.leading_dense_block_count": 2})
    else:
        rewrite(MODEL, path, drop=("step35.nextn_predict_layers",))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _run(path) == 2
    line = error_line(capsys)
    assert "by step35.leading_dense_block_count, but its tensors say otherwise" in line, line
    assert [str(w.message) for w in seen if "does not use" in str(w.message)] == []


def test_empty_tokens_are_no_duplicates_as_llama_cpp_names_them(tmp_path, source):
    """llama.cpp loads a vocabulary with several empty tokens (it names each [EMPTY_i]); the
    duplicate check refused it (a review of the check)."""
    import runtime

    tokens = list(source[Key.TOK_LIST])
    tokens[-1] = tokens[-2] = ""
    path = _edited(tmp_path, change={Key.TOK_LIST: tokens})
    m = runtime.load(path, n_ctx=64)
    assert [m.tokenize(t, add_bos=False) for t in TEXTS] == _llama_tokens(path)


def test_add_bos_without_a_bos_token_is_said(tmp_path):
    """llama.cpp adds its default BOS (id 11) where the file asks for BOS and names none; ours adds
    none, which changed the logits silently (a review): now a warning says so."""
    import runtime

    path = tmp_path / "nobos.gguf"
    rewrite(MODEL, path, drop=(Key.TOK_BOS,), change={Key.TOK_ADD_BOS: True})
    with pytest.warns(UserWarning, match="add_bos_token is true but the file names no BOS token"):
        runtime.load(path, n_ctx=64).tokenize("hi")
