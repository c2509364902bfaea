"""The checkpoint's JSON files as the converter reads them: where the chat template and the special
token ids come from, the context length, and one error line (file, key, value; exit status 2) for a
file that is not UTF-8 or a config.json value of the wrong type.

Each test mutates a copy of the tiny checkpoint (weights linked, not copied), converts it, and reads
the GGUF back to compare with what the input files hold.
"""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import pytest

from runtime.base.gguf_schema import Key
from runtime.cli import main
from tests.helpers.cli_output import error_line


@pytest.fixture
def ckpt(linked_ckpt):
    return linked_ckpt


def edit_json(path, edit):
    raw = json.loads(path.read_text(encoding="utf-8"))
    edit(raw)  # changes raw in place
    path.write_text(json.dumps(raw), encoding="utf-8")
    return raw


def convert(ckpt, capsys):
    """(the written file's metadata, stderr's warning lines); the conversion must succeed."""
    out = ckpt.parent / "out.gguf"
    rc = main(["convert", str(ckpt), str(out), "--type", "f16", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    fields = gguf.GGUFReader(out).fields
    return {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.tokens")}, \
        [l for l in err.splitlines() if l.startswith("warning: ")]


def refused(ckpt, capsys) -> str:
    """The one error line of a conversion that must stop with exit status 2 and write nothing."""
    out = ckpt.parent / "out.gguf"
    rc = main(["convert", str(ckpt), str(out), "--type", "f16", "--threads", "1", "--no-progress"])
    line = error_line(capsys)
    assert rc == 2, line
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]
    return line


# --- 1. chat template ---------------------------------------------------------------------------

def drop_template(ckpt) -> str:
    """Remove tokenizer_config.json's chat_template; return it."""
    template = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    edit_json(ckpt / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    return template


def test_chat_template_jinja_file(ckpt, capsys):
    template = drop_template(ckpt) + "{# from chat_template.jinja: é #}"
    (ckpt / "chat_template.jinja").write_text(template, encoding="utf-8")
    meta, warnings = convert(ckpt, capsys)
    assert meta[Key.CHAT_TEMPLATE] == template
    assert warnings == []


def test_chat_template_json_file(ckpt, capsys):
    template = drop_template(ckpt) + "{# from chat_template.json #}"
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    meta, warnings = convert(ckpt, capsys)
    assert meta[Key.CHAT_TEMPLATE] == template
    assert warnings == []


def test_chat_template_jinja_wins_over_tokenizer_config_as_in_transformers(ckpt, capsys):
    in_config = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    (ckpt / "chat_template.jinja").write_text(in_config + "{# newer #}", encoding="utf-8")
    meta, warnings = convert(ckpt, capsys)
    assert meta[Key.CHAT_TEMPLATE] == in_config + "{# newer #}"
    assert len(warnings) == 1 and "chat_template.jinja and tokenizer_config.json differ" in warnings[0]


def test_no_chat_template_is_a_warning(ckpt, capsys):
    drop_template(ckpt)
    meta, warnings = convert(ckpt, capsys)
    assert Key.CHAT_TEMPLATE not in meta
    assert len(warnings) == 1 and "no chat template" in warnings[0] and str(ckpt) in warnings[0]


# --- 2. special token ids without tokenizer_config.json -------------------------------------------

def test_special_ids_fall_back_to_config_json(ckpt, capsys):
    (ckpt / "tokenizer_config.json").unlink()
    config = edit_json(ckpt / "config.json", lambda c: c.update(bos_token_id=2, eos_token_id=[1, 3]))
    meta, warnings = convert(ckpt, capsys)
    assert meta[Key.TOK_BOS] == config["bos_token_id"]
    assert meta[Key.TOK_EOS] == config["eos_token_id"][0]
    assert all("EOS" not in w for w in warnings)  # the missing chat template is warned about, not the ids


def test_tokenizer_config_ids_win_over_config_json(ckpt, capsys):
    tcfg = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    edit_json(ckpt / "config.json", lambda c: c.update(bos_token_id=2, eos_token_id=1))
    meta, _ = convert(ckpt, capsys)
    tokens = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    id_of = {t["content"]: t["id"] for t in tokens}
    assert (meta[Key.TOK_BOS], meta[Key.TOK_EOS]) == (id_of[tcfg["bos_token"]], id_of[tcfg["eos_token"]])


def test_no_eos_anywhere_is_a_warning(ckpt, capsys):
    (ckpt / "tokenizer_config.json").unlink()
    edit_json(ckpt / "config.json", lambda c: [c.pop("bos_token_id"), c.pop("eos_token_id")])
    meta, warnings = convert(ckpt, capsys)
    assert Key.TOK_EOS not in meta and Key.TOK_BOS not in meta
    assert any("no EOS token" in w and "eos_token_id" in w for w in warnings)


def test_config_eos_id_outside_the_vocabulary(ckpt, capsys):
    (ckpt / "tokenizer_config.json").unlink()
    edit_json(ckpt / "config.json", lambda c: c.update(eos_token_id=99999))
    line = refused(ckpt, capsys)
    assert f"{ckpt / 'config.json'}: eos_token_id 99999 is not a token id" in line


# --- 3. files that are not UTF-8 ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_file_not_utf8(ckpt, capsys, name):
    path = ckpt / name
    data = path.read_bytes()
    assert data.startswith(b"{")
    path.write_bytes(b'{"note": "caf\xe9", ' + data[1:])  # Latin-1, not UTF-8: byte 0xe9 at offset 13
    assert refused(ckpt, capsys) == f"error: {path}: not UTF-8 text (byte 0xe9 at offset 13); save it as UTF-8"


def test_chat_template_jinja_not_utf8(ckpt, capsys):
    (ckpt / "chat_template.jinja").write_bytes(b"{{ bos_token }}\xff")
    assert refused(ckpt, capsys) == f"error: {ckpt / 'chat_template.jinja'}: not UTF-8 text (byte 0xff at offset 15); " \
        "save it as UTF-8"


def test_not_utf8_from_the_command_line(ckpt, tmp_path):
    """The installed command: exit status 2 and one line, no traceback."""
    (ckpt / "config.json").write_bytes(b"\x00\xff" + (ckpt / "config.json").read_bytes())
    p = subprocess.run([sys.executable, "-m", "runtime.cli", "convert", str(ckpt), str(tmp_path / "o.gguf"),
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [f"error: {ckpt / 'config.json'}: not UTF-8 text (byte 0xff at offset 1); "
                                             "save it as UTF-8"]


# --- 4. config.json values of the wrong type ------------------------------------------------------

# key -> (value written, the end of the error line after "config.json: ")
BAD_VALUES = {
    "hidden_size_null": ("hidden_size", None, "hidden_size must be a positive integer, got null"),
    "hidden_size_bool": ("hidden_size", True, "hidden_size must be a positive integer, got true"),
    "hidden_size_text": ("hidden_size", "256", 'hidden_size must be a positive integer, got "256"'),
    "moe_top_k_null": ("moe_top_k", None, "moe_top_k must be a positive integer, got null"),
    "sliding_window_null": ("sliding_window", None, "sliding_window must be a positive integer, got null"),
    "layers_word": ("num_hidden_layers", "four", 'num_hidden_layers must be a positive integer, got "four"'),
    "mtp_negative": ("num_nextn_predict_layers", -1, "num_nextn_predict_layers must be a non-negative integer, got -1"),
    "moe_enum_text": ("moe_layers_enum", "1,2,x", 'moe_layers_enum must list layer numbers separated by commas, '
                                                  'got "1,2,x"'),
    "moe_enum_list": ("moe_layers_enum", [1, "2"], 'moe_layers_enum[1] must be an integer, got "2"'),
    "rope_theta_text": ("rope_theta", "abc", 'rope_theta must be a positive number, got "abc"'),
    "rope_theta_entry": ("rope_theta", [1e6, None, "x", 1e4, 1e6, 1e4, 1e4], 'rope_theta[2] must be a positive number, '
                                                                             'got "x"'),
    "swiglu_text": ("swiglu_limits", ["a"] * 7, 'swiglu_limits[0] must be a non-negative number, got "a"'),
    "rope_scaling_text": ("rope_scaling", "llama3", 'rope_scaling must be an object, got "llama3"'),
    "rope_scaling_factor": ("rope_scaling", {"rope_type": "llama3", "factor": "8"},
                            'rope_scaling.factor must be a positive number, got "8"'),
    "rope_scaling_band": ("rope_scaling", {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                                           "high_freq_factor": 4},  # the smoothing divided by zero
                          "rope_scaling.low_freq_factor (4) must be below high_freq_factor (4)"),
    "yarn_only_sliding": ("rope_scaling", {"rope_type": "llama3", "factor": 2, "yarn_only_types": ["sliding_attention"]},
                          'rope_scaling.yarn_only_types ["sliding_attention"] scales other layers than the full-attention '
                          'ones; GGUF scales the full-attention layers only'),
    "other_setting_list": ("attention_other_setting", [1, 2], "attention_other_setting must be an object, got [1, 2]"),
    "other_setting_heads": ("attention_other_setting", {"num_attention_heads": 4.5},
                            "attention_other_setting.num_attention_heads must be a positive integer, got 4.5"),
    "tie_text": ("tie_word_embeddings", "false", 'tie_word_embeddings must be a boolean (true or false), got "false"'),
    "eps_text": ("rms_norm_eps", "1e-5", 'rms_norm_eps must be a positive number, got "1e-5"'),
    "context_text": ("max_position_embeddings", "64k", 'max_position_embeddings must be a positive integer, got "64k"'),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_config_value_of_the_wrong_type(ckpt, capsys, case):
    key, value, message = BAD_VALUES[case]
    edit_json(ckpt / "config.json", lambda c: c.update({key: value}))
    assert refused(ckpt, capsys) == f"error: {ckpt / 'config.json'}: {message}"


def test_config_not_an_object(ckpt, capsys):
    (ckpt / "config.json").write_text("[]")
    assert refused(ckpt, capsys) == f"error: {ckpt / 'config.json'}: must hold a JSON object, got []"


@pytest.mark.parametrize("key, value, message", [
    ("add_bos_token", "yes", 'add_bos_token must be a boolean (true or false), got "yes"'),
    ("eos_token", 3, "eos_token must be a string, got 3"),
    ("bos_token", {"content": None}, "bos_token.content must be a string, got null"),
    ("chat_template", 7, "chat_template must be a string, got 7"),
])
def test_tokenizer_config_value_of_the_wrong_type(ckpt, capsys, key, value, message):
    edit_json(ckpt / "tokenizer_config.json", lambda c: c.update({key: value}))
    assert refused(ckpt, capsys) == f"error: {ckpt / 'tokenizer_config.json'}: {message}"


# --- 5. context length ------------------------------------------------------------------------------

def test_context_from_max_seq_len(ckpt, capsys):
    config = edit_json(ckpt / "config.json", lambda c: [c.pop("max_position_embeddings"), c.update(max_seq_len=262144)])
    meta, warnings = convert(ckpt, capsys)
    assert meta[Key.CONTEXT_LENGTH] == config["max_seq_len"]
    assert warnings == []


def test_context_max_position_embeddings_wins(ckpt, capsys):
    config = edit_json(ckpt / "config.json", lambda c: c.update(max_seq_len=131072))
    meta, _ = convert(ckpt, capsys)
    assert meta[Key.CONTEXT_LENGTH] == config["max_position_embeddings"] != config["max_seq_len"]


def test_context_default_is_step3p5s(ckpt, capsys):
    edit_json(ckpt / "config.json", lambda c: c.pop("max_position_embeddings"))
    meta, warnings = convert(ckpt, capsys)
    assert meta[Key.CONTEXT_LENGTH] == 262144  # Step3p5Config's default for both keys
    assert len(warnings) == 1 and "neither max_position_embeddings nor max_seq_len" in warnings[0]


# --- 6. how real checkpoints vary: RoPE fields, MTP blocks, tied embeddings, FP8 ------------------

def _bases(meta):
    return meta[Key.ROPE_BASE], meta[Key.ROPE_BASE_SWA]


def test_yarn_only_types_of_full_attention_is_what_gguf_scales(ckpt, capsys):
    scaling = {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
               "high_freq_factor": 32.0}
    edit_json(ckpt / "config.json", lambda c: c.update(rope_scaling={**scaling, "yarn_only_types": ["full_attention"]}))
    with_types, _ = convert(ckpt, capsys)
    (ckpt.parent / "out.gguf").unlink()
    edit_json(ckpt / "config.json", lambda c: c.update(rope_scaling=scaling))
    assert convert(ckpt, capsys)[0] == with_types
    (ckpt.parent / "out.gguf").unlink()
    edit_json(ckpt / "config.json", lambda c: c.update(yarn_only_types=["full_attention"]))  # StepFun's place for it
    assert convert(ckpt, capsys)[0] == with_types
    (ckpt.parent / "out.gguf").unlink()
    edit_json(ckpt / "config.json", lambda c: c.update(yarn_only_types=["sliding_attention", "full_attention"]))
    assert refused(ckpt, capsys) == (f'error: {ckpt / "config.json"}: yarn_only_types ["sliding_attention", '
                                     '"full_attention"] scales other layers than the full-attention ones; GGUF '
                                     'scales the full-attention layers only')


@pytest.mark.parametrize("scaling", [{"rope_type": "default"}, {"type": "default"}, {}])
def test_rope_scaling_of_type_default_is_plain_rope(ckpt, capsys, scaling):
    """transformers' "default" means plain RoPE (newer versions save it so); it was refused as
    'not supported (only llama3)'. llama.cpp's converter writes rope_freqs for llama3 only."""
    edit_json(ckpt / "config.json", lambda c: c.update(rope_scaling=scaling))
    meta, warnings = convert(ckpt, capsys)
    assert _bases(meta) == (1e6, 1e4) and warnings == []
    assert "rope_freqs.weight" not in {t.name for t in gguf.GGUFReader(ckpt.parent / "out.gguf").tensors}


def test_rope_parameters_of_transformers_v5_give_the_bases(ckpt, capsys):
    """No rope_theta: transformers v5 keeps the bases in rope_parameters, per layer type or one for
    all. They were ignored and the base silently became 10000 (a model with wrong positions)."""
    def v5(c, params):
        c.pop("rope_theta")
        c.pop("rope_scaling")
        c["rope_parameters"] = params
    edit_json(ckpt / "config.json", lambda c: v5(c, {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}))
    meta, warnings = convert(ckpt, capsys)
    assert _bases(meta) == (5e5, 2e4) and warnings == []
    (ckpt.parent / "out.gguf").unlink()
    edit_json(ckpt / "config.json", lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 3e5}))
    meta, warnings = convert(ckpt, capsys)
    assert _bases(meta) == (3e5, 3e5) and warnings == []
    (ckpt.parent / "out.gguf").unlink()
    edit_json(ckpt / "config.json", lambda c: c.update(rope_parameters={
        "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4}}))
    assert refused(ckpt, capsys).endswith("config.json: rope_parameters.full_attention type 'yarn' is not supported "
                                          "(only llama3, or default: none)")


def test_a_config_without_any_rope_base_says_which_base_it_used(ckpt, capsys):
    edit_json(ckpt / "config.json", lambda c: [c.pop("rope_theta"), c.pop("rope_scaling")])
    meta, warnings = convert(ckpt, capsys)
    assert _bases(meta) == (10000.0, 10000.0)
    assert warnings == [f"warning: {ckpt / 'config.json'}: no rope_theta; using transformers' default base 10000, "
                        "which may not be the base this model was trained with"]


def test_mtp_blocks_beyond_what_the_config_declares_are_skipped(ckpt, capsys):
    """num_nextn_predict_layers 0 (or absent) while the shards still hold the MTP blocks: transformers
    and llama.cpp's converter leave layers past the declared ones out; the file was refused."""
    edit_json(ckpt / "config.json", lambda c: c.update(num_nextn_predict_layers=0))
    meta, _ = convert(ckpt, capsys)
    names = {t.name for t in gguf.GGUFReader(ckpt.parent / "out.gguf").tensors}
    assert meta[Key.BLOCK_COUNT] == 4 and not any(n.startswith(("blk.4.", "blk.5.", "blk.6.")) for n in names)
    from convert.converter import plan
    from convert.hf_config import HFConfig
    from convert.safetensors_io import Checkpoint

    _, skipped = plan(HFConfig.load(ckpt), Checkpoint(ckpt), "f16")
    assert "model.layers.4.eh_proj.weight" in skipped and "model.layers.6.mlp.up_proj.weight" in skipped
    assert skipped["model.layers.5.self_attn.q_proj.weight"].startswith("block 5 is past the 4 layers and 0 MTP blocks")


def test_tied_embeddings_write_the_output_head_llama_cpp_needs(ckpt, capsys):
    """tie_word_embeddings: the file had no output.weight, which llama.cpp's step35 loader requires
    ("tensor 'output.weight' not found"); and a tied checkpoint that still stores lm_head.weight
    was refused. Now output.weight is the embedding matrix, and the stored head is skipped."""
    import llama_cpp
    import numpy as np

    edit_json(ckpt / "config.json", lambda c: c.update(tie_word_embeddings=True))
    convert(ckpt, capsys)
    out = ckpt.parent / "out.gguf"
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), np.asarray(tensors["token_embd.weight"].data))
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, n_threads=1, verbose=False)
    try:
        assert len(llm.create_completion("def", max_tokens=2, temperature=0)["choices"][0]["text"]) >= 0
    finally:
        llm.close()


def test_block_scales_of_a_weight_that_is_not_fp8_are_refused(ckpt, capsys):
    """The official FP8 repository's block scales (`*.weight_scale_inv`) were refused as 'not part of
    the Step-3.5 layout'; FP8 checkpoints now convert (tests/test_convert_fp8.py), and scales beside a
    bf16 weight are named as such."""
    import numpy as np

    shard = ckpt / "model-00002-of-00002.safetensors"
    raw = shard.read_bytes()  # a link to the shared tiny checkpoint: written anew, not in place
    shard.unlink()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    name = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}
    blob = json.dumps(header).encode()
    shard.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + header_len:][:end] + np.ones(1, np.float32).tobytes())
    edit_json(ckpt / "model.safetensors.index.json", lambda c: c["weight_map"].update({name: shard.name}))
    assert refused(ckpt, capsys) == (f"error: {shard}: tensor {name!r} scales "
                                     "'model.layers.1.self_attn.q_proj.weight', which is BF16, not FP8")


def test_a_config_without_partial_rotary_factors_is_told_what_step_3_5_needs(ckpt, capsys):
    """The line quoted 'partial_rotary_factors[1]=0.5', a value the file does not hold."""
    config = edit_json(ckpt / "config.json", lambda c: c.pop("partial_rotary_factors"))
    want = [1.0 if t == "sliding_attention" else 0.5 for t in config["layer_types"][:config["num_hidden_layers"]]]
    assert refused(ckpt, capsys) == (f"error: {ckpt / 'config.json'}: partial_rotary_factors is missing; Step-3.5 "
                                     f"rotates all dims on sliding layers and half on full ones: {json.dumps(want)} "
                                     "for these layer_types")


def test_float64_weights_are_cast_as_transformers_casts_them(ckpt, capsys):
    """F64 tensors were refused ("supported dtypes are F32, F16, BF16"); transformers and llama.cpp's
    converter cast them. One tensor moved to an F64 shard gives the same file as before."""
    import numpy as np

    from convert.safetensors_io import Checkpoint

    convert(ckpt, capsys)
    before = (ckpt.parent / "out.gguf").read_bytes()
    (ckpt.parent / "out.gguf").unlink()
    name = "model.layers.1.input_layernorm.weight"
    values = Checkpoint(ckpt).read(name).astype(np.float64)
    blob = json.dumps({name: {"dtype": "F64", "shape": list(values.shape), "data_offsets": [0, values.nbytes]}}).encode()
    (ckpt / "extra-f64.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + values.tobytes())
    edit_json(ckpt / "model.safetensors.index.json", lambda c: c["weight_map"].update({name: "extra-f64.safetensors"}))
    convert(ckpt, capsys)
    assert (ckpt.parent / "out.gguf").read_bytes() == before


def _gguf_py_template_fields(value, tmp_path) -> dict:
    """What gguf-py's own writer (llama.cpp's converter) stores for a `chat_template` value."""
    path = tmp_path / "ref.gguf"
    w = gguf.GGUFWriter(path, "step35")
    w.add_chat_template(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.chat_template")}


@pytest.mark.parametrize("with_default", [True, False])
def test_named_chat_templates_are_kept_as_gguf_py_keeps_them(ckpt, capsys, tmp_path, with_default):
    """A list of named templates kept only "default" (and, without one, warned "no chat template"
    while the named ones were dropped); gguf-py writes the others as tokenizer.chat_template.NAME
    and lists their names."""
    template = drop_template(ckpt)
    value = [{"name": "tool-use", "template": template + "{# tools #}"}, {"name": "rag", "template": "{{ 1 }}"}]
    if with_default:
        value.insert(1, {"name": "default", "template": template})
    edit_json(ckpt / "tokenizer_config.json", lambda c: c.update(chat_template=value))
    meta, warnings = convert(ckpt, capsys)
    ours = {k: v for k, v in meta.items() if k.startswith("tokenizer.chat_template")}
    want = _gguf_py_template_fields(value, tmp_path)
    assert {k: sorted(v) if isinstance(v, list) else v for k, v in ours.items()} == \
        {k: sorted(v) if isinstance(v, list) else v for k, v in want.items()}
    assert ("tokenizer.chat_template" in ours) == with_default and ours["tokenizer.chat_template.tool_use"]
    if with_default:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "named tool_use, rag, none 'default'" in warnings[0], warnings


# --- tokenizer.json's own values (a review: a dozen malformed files gave tracebacks, three converted silently) ---

def _tok(ckpt, edit):
    edit_json(ckpt / "tokenizer.json", edit)


def _set_model(key, value):
    return lambda t: t["model"].__setitem__(key, value)


@pytest.mark.parametrize("edit, message", [
    (_set_model("vocab", []), "model.vocab must be an object, got []"),
    (lambda t: t["model"].pop("vocab"), "missing required key 'model.vocab'"),
    (lambda t: t["model"]["vocab"].__setitem__("zzz", "x"), "model.vocab['zzz'] must be a non-negative integer, got \"x\""),
    (lambda t: t["model"]["vocab"].__setitem__("zzz", -5), "model.vocab['zzz'] must be a non-negative integer, got -5"),
    (lambda t: t["model"]["vocab"].__setitem__("zzz", 10), "model.vocab gives id 10 to both"),
    (_set_model("vocab", {}), "model.vocab is empty"),
    (lambda t: t["added_tokens"].append({"content": "<x>"}), "missing required key 'added_tokens[4].id'"),
    (lambda t: t["added_tokens"].append({"id": 700}), "missing required key 'added_tokens[4].content'"),
    (lambda t: t["added_tokens"].append({"id": "700", "content": "<y>"}), "added_tokens[4].id must be a non-negative integer"),
    (lambda t: t.__setitem__("added_tokens", {"a": 1}), "added_tokens must be an array, got {\"a\": 1}"),
    (lambda t: t["added_tokens"].append({"id": 10, "content": "<y>"}), "added_tokens[4] gives id 10 to '<y>', which the vocabulary gives to"),
    (lambda t: t["model"]["merges"].append(5), "must be a string or a pair of strings, got 5"),
    (lambda t: t.__setitem__("model", []), "model must be an object, got []"),
], ids=["vocab-list", "vocab-missing", "id-text", "id-negative", "id-repeated", "vocab-empty", "added-no-id",
        "added-no-content", "added-id-text", "added-not-list", "added-collides", "merge-int", "model-list"])
def test_malformed_tokenizer_json_is_one_line(ckpt, capsys, edit, message):
    _tok(ckpt, edit)
    line = refused(ckpt, capsys)
    assert line.startswith(f"error: {ckpt / 'tokenizer.json'}: ") and message in line, line


def _template_processing(first: str | None, last: str | None) -> dict:
    single = ([{"SpecialToken": {"id": first, "type_id": 0}}] if first else []) + [{"Sequence": {"id": "A", "type_id": 0}}] \
        + ([{"SpecialToken": {"id": last, "type_id": 0}}] if last else [])
    ids = [x for x in (first, last) if x]
    return {"type": "TemplateProcessing", "single": single, "pair": single,
            "special_tokens": {t: {"id": t, "ids": [0 if t == "<|begin_of_text|>" else 3], "tokens": [t]} for t in ids}}


@pytest.mark.parametrize("first, last, config_flag", [
    ("<|begin_of_text|>", None, None),  # BOS from the template: HF and llama.cpp's converter add it
    ("<|begin_of_text|>", "<|im_end|>", None),
    ("<|begin_of_text|>", None, False),  # tokenizer_config.json's flag wins, as in gguf-py
    (None, "<|im_end|>", None),
    (None, None, None),
])
def test_bos_and_eos_from_the_post_processor_as_gguf_py_reads_them(ckpt, capsys, first, last, config_flag):
    """add_bos/add_eos as llama.cpp's converter writes them (gguf-py's SpecialVocab, the reference),
    and BOS as the Hugging Face tokenizer adds it."""
    from tokenizers import Tokenizer

    if first or last:
        _tok(ckpt, lambda t: t.__setitem__("post_processor", _template_processing(first, last)))
    edit_json(ckpt / "tokenizer_config.json",
              lambda c: [c.pop("add_bos_token"), c.pop("add_eos_token")] + ([c.update(add_bos_token=config_flag)]
                                                                            if config_flag is not None else []))
    reference = gguf.SpecialVocab(ckpt, load_merges=False).add_special_token
    meta, _ = convert(ckpt, capsys)
    assert meta[Key.TOK_ADD_BOS] == reference.get("bos", False)
    assert meta[Key.TOK_ADD_EOS] == reference.get("eos", False)
    if config_flag is None:
        hf = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode("hello").ids
        assert meta[Key.TOK_ADD_BOS] == (hf[0] == 0)


def test_additional_chat_templates_become_named_templates_as_in_gguf_py(ckpt, capsys):
    template = drop_template(ckpt)
    (ckpt / "chat_template.jinja").write_text(template, encoding="utf-8")
    (ckpt / "additional_chat_templates").mkdir()
    (ckpt / "additional_chat_templates" / "tool_use.jinja").write_text(template + "{# tools #}", encoding="utf-8")
    (ckpt / "additional_chat_templates" / "rag.jinja").write_text("{{ messages }}", encoding="utf-8")
    reference = gguf.SpecialVocab(ckpt, load_merges=False).chat_template
    meta, warnings = convert(ckpt, capsys)
    assert meta[Key.CHAT_TEMPLATE] == template and warnings == []
    named = {e["name"]: e["template"] for e in reference if e["name"] != "default"}
    assert sorted(named) == ["rag", "tool_use"]
    for name, text in named.items():
        assert meta[f"{Key.CHAT_TEMPLATE}.{name}"] == text
