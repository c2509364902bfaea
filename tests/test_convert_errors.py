"""Bad input: a clear error naming the file and tensor, exit status 2, and no output left behind."""

import json
import shutil
import struct

import pytest

from runtime.cli import main


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def shard_of(d, name):
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (n - len(blob))
    assert len(blob) == n, "edited header must keep its length"
    path.write_bytes(raw[:8] + blob + raw[8 + n:])
    return 8 + n, header


def run_convert(capsys, d, out_dir):
    out = out_dir / "out.gguf"
    rc = main(["convert", str(d), str(out), "--type", "q8_0", "--no-progress"])
    err = capsys.readouterr().err
    leftovers = sorted(p.name for p in out_dir.iterdir())
    return rc, err, leftovers


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_shard(capsys, ckpt, out_dir):
    shard = shard_of(ckpt, "model.norm.weight")
    shard.unlink()
    rc, err, left = run_convert(capsys, ckpt, out_dir)
    assert rc == 2 and shard.name in err and "missing" in err and left == []


def test_index_names_absent_tensor(capsys, ckpt, out_dir):
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = "model.layers.1.moe.router_bias"
    shards = sorted(set(data["weight_map"].values()))
    data["weight_map"][name] = next(s for s in shards if s != data["weight_map"][name])
    index.write_text(json.dumps(data))
    rc, err, left = run_convert(capsys, ckpt, out_dir)
    assert rc == 2 and name in err and data["weight_map"][name] in err and "absent" in err and left == []


def test_shape_disagrees_with_config(capsys, ckpt, out_dir):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["moe_intermediate_size"] = 512
    (ckpt / "config.json").write_text(json.dumps(cfg))
    rc, err, left = run_convert(capsys, ckpt, out_dir)
    assert rc == 2 and "moe.gate_proj.weight" in err and "[16, 256, 256]" in err and "[16, 512, 256]" in err
    assert ".safetensors" in err and left == []


def test_unsupported_dtype(capsys, ckpt, out_dir):
    name = "model.layers.0.input_layernorm.weight"
    shard = shard_of(ckpt, name)

    def edit(h):
        h[name]["dtype"] = "I16"
    rewrite_header(shard, edit)
    rc, err, left = run_convert(capsys, ckpt, out_dir)
    assert rc == 2 and name in err and "I16" in err and shard.name in err and left == []


@pytest.mark.parametrize("bits, what", [(0x7FC0, "NaN"), (0x7F80, "Inf")])
def test_nan_or_inf_weight(capsys, ckpt, out_dir, bits, what):
    name = "model.layers.2.moe.down_proj.weight"  # late in the file: the failure comes mid-write
    shard = shard_of(ckpt, name)
    base, header = rewrite_header(shard, lambda h: None)
    begin = base + header[name]["data_offsets"][0]
    with open(shard, "r+b") as f:
        f.seek(begin + 2 * (7 * 256 * 256 + 1000))  # expert 7
        f.write(struct.pack("<H", bits))
    rc, err, left = run_convert(capsys, ckpt, out_dir)
    assert rc == 2 and name in err and "NaN or Inf" in err and "expert 7" in err and shard.name in err
    assert "first at flat index 1000)" in err
    assert left == [], "a failed conversion must not leave a partial file"


def test_nan_in_a_later_chunk_is_placed_in_its_slice(capsys, ckpt, out_dir, monkeypatch):
    from convert import tensor_stream

    monkeypatch.setattr(tensor_stream, "CHUNK_WEIGHTS", 300)  # one 256-weight row a chunk
    name = "model.layers.2.moe.up_proj.weight"
    shard = shard_of(ckpt, name)
    base, header = rewrite_header(shard, lambda h: None)
    with open(shard, "r+b") as f:
        f.seek(base + header[name]["data_offsets"][0] + 2 * (3 * 256 * 256 + 77 * 256 + 5))  # expert 3, row 77
        f.write(struct.pack("<H", 0xFF80))  # -Inf
    rc, err, left = run_convert(capsys, ckpt, out_dir)
    assert rc == 2 and "(expert 3) holds NaN or Inf (first at flat index 19717)" in err and left == []


@pytest.mark.parametrize("threads", ["0", "100000"])
def test_threads_out_of_range(capsys, tiny_ckpt, out_dir, threads):
    rc = main(["convert", str(tiny_ckpt), str(out_dir / "m.gguf"), "--threads", threads, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--threads {threads}" in err and list(out_dir.iterdir()) == []


def test_not_a_step35_config(capsys, ckpt, out_dir):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    rc, err, left = run_convert(capsys, ckpt, out_dir)
    assert rc == 2 and "config.json" in err and "not a Step-3.5 config" in err and left == []


def test_unknown_tensor_is_an_error(capsys, ckpt, out_dir):
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = shard_of(ckpt, "model.norm.weight")
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["model.layers.0.mystery.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:] + b"\0\0\0\0")
    data["weight_map"]["model.layers.0.mystery.weight"] = shard.name
    index.write_text(json.dumps(data))
    rc, err, left = run_convert(capsys, ckpt, out_dir)
    assert rc == 2 and "model.layers.0.mystery.weight" in err and "not part of the Step-3.5 layout" in err and left == []


def test_unwritable_output(capsys, tiny_ckpt, tmp_path):
    for out in (tmp_path / "no" / "such" / "dir" / "m.gguf", "/proc/stepstream-test.gguf"):
        rc = main(["convert", str(tiny_ckpt), str(out), "--type", "f16", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and str(out) in err and "cannot write" in err


def test_existing_output_survives_a_failed_conversion(capsys, ckpt, out_dir):
    out = out_dir / "out.gguf"
    out.write_bytes(b"previous model")
    shard_of(ckpt, "model.norm.weight").unlink()
    assert main(["convert", str(ckpt), str(out), "--no-progress"]) == 2
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.gguf"]


def test_existing_output_survives_a_failed_forced_conversion(capsys, ckpt, out_dir):
    """--force replaces the output only with a complete file: a failure keeps the old one."""
    out = out_dir / "out.gguf"
    out.write_bytes(b"previous model")
    shard_of(ckpt, "model.norm.weight").unlink()
    assert main(["convert", str(ckpt), str(out), "--no-progress", "--force"]) == 2
    assert "missing" in capsys.readouterr().err
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.gguf"]
