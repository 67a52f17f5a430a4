"""Bad input to the converter: one `error: ...` line on stderr, exit status 2, no DST (nor temporary) left behind."""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_oracle
import indexcache_jax as ic
from checkpoints_convert.cli import main as cli_main

INDEX = "model.safetensors.index.json"
Q_A = "model.layers.0.self_attn.q_a_proj.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GLM checkpoint in several shards, and an FP8 variant of it (q_a_proj of layer 0 quantized)."""
    root = tmp_path_factory.mktemp("errors")
    model = hf_oracle.build(hf_oracle.glm_config(num_hidden_layers=3, first_k_dense_replace=1), seed=17)
    model.save_pretrained(root / "bf16", max_shard_size="30KB")
    fp8_dir = root / "fp8"
    shutil.copytree(root / "bf16", fp8_dir)
    shard = os.path.join(fp8_dir, weight_map(fp8_dir)[Q_A])
    tensors = load_file(shard)
    w = tensors[Q_A]
    scale = w.abs().max() / 448.0
    tensors[Q_A] = (w / scale).to(torch.float8_e4m3fn)
    tensors[Q_A + "_scale_inv"] = scale.reshape(1, 1).float()
    save_file(tensors, shard)
    update_index(fp8_dir, lambda wm: wm.__setitem__(Q_A + "_scale_inv", wm[Q_A]))
    edit_config(fp8_dir, lambda c: c.__setitem__("quantization_config", {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}))
    return root


def weight_map(directory) -> dict:
    with open(os.path.join(directory, INDEX)) as f:
        return json.load(f)["weight_map"]


def update_index(directory, edit):
    path = os.path.join(directory, INDEX)
    with open(path) as f:
        index = json.load(f)
    edit(index["weight_map"])
    with open(path, "w") as f:
        json.dump(index, f)


def edit_config(directory, edit):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)


def edit_header(directory, tensor: str, edit):
    """Rewrites the JSON header of the shard holding `tensor`, keeping its data section."""
    path = os.path.join(directory, weight_map(directory)[tensor])
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def shard_of(directory, tensor: str) -> str:
    return os.path.join(directory, weight_map(directory)[tensor])


def set_entry(tensor: str, **fields):
    return lambda h: h[tensor].update(fields)


def _missing_shard(d):
    os.remove(shard_of(d, "model.norm.weight"))


def _header_past_eof(d):
    with open(shard_of(d, "model.norm.weight"), "r+b") as f:
        f.write(struct.pack("<Q", 10 ** 9))


def _too_short(d):
    with open(shard_of(d, "model.norm.weight"), "r+b") as f:
        f.truncate(5)


def _truncated_data(d):
    path = shard_of(d, "model.embed_tokens.weight")
    os.truncate(path, os.path.getsize(path) - 9)


def _bad_json(d):
    path = shard_of(d, "model.norm.weight")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{'not json")


def _offsets_out_of_range(d):
    edit_header(d, "model.norm.weight", set_entry("model.norm.weight", data_offsets=[0, 10 ** 9]))


def _offsets_disagree_with_shape(d):
    edit_header(d, "model.norm.weight", set_entry("model.norm.weight", data_offsets=[0, 4]))


def _shape_vs_config(d):
    name = "model.layers.0.self_attn.o_proj.weight"
    edit_header(d, name, lambda h: h[name].update(shape=h[name]["shape"][::-1]))


def _unknown_dtype(d):
    edit_header(d, "model.norm.weight", set_entry("model.norm.weight", dtype="Q4"))


def _unsupported_dtype(d):
    edit_header(d, "model.norm.weight", set_entry("model.norm.weight", dtype="I32"))


def _unexpected_key(d):
    extra = "model.layers.0.mlp.extra_proj.weight"
    edit_header(d, "model.norm.weight", lambda h: h.__setitem__(extra, h["model.norm.weight"]))
    update_index(d, lambda wm: wm.__setitem__(extra, wm["model.norm.weight"]))


def _missing_key(d):
    update_index(d, lambda wm: wm.pop("model.layers.1.mlp.experts.3.up_proj.weight"))


def _index_points_to_wrong_shard(d):
    wm = weight_map(d)
    other = next(s for s in sorted(set(wm.values())) if s != wm["model.norm.weight"])
    update_index(d, lambda m: m.__setitem__("model.norm.weight", other))


def _bad_index_json(d):
    with open(os.path.join(d, INDEX), "w") as f:
        f.write("{\"weight_map\": ")


def _no_weights(d):
    os.remove(os.path.join(d, INDEX))


def _missing_config(d):
    os.remove(os.path.join(d, "config.json"))


def _config_disagrees(d):
    edit_config(d, lambda c: c.__setitem__("q_lora_rank", c["q_lora_rank"] + 8))


def _unsupported_arch(d):
    edit_config(d, lambda c: c.__setitem__("architectures", ["LlamaForCausalLM"]))


BAD_BF16 = {
    "missing_shard": (_missing_shard, "missing shard model-"),
    "header_past_eof": (_header_past_eof, "header length 1000000000 runs past the end"),
    "too_short": (_too_short, "too short for a header"),
    "truncated_data": (_truncated_data, "out of range of the"),
    "bad_header_json": (_bad_json, "header is not valid JSON"),
    "offsets_out_of_range": (_offsets_out_of_range, "data_offsets [0, 1000000000] out of range"),
    "offsets_disagree_with_shape": (_offsets_disagree_with_shape, "spans 4 bytes"),
    "shape_vs_config": (_shape_vs_config, "'model.layers.0.self_attn.o_proj.weight' has shape [40, 48], the "
                                          "config expects [48, 40]"),
    "unknown_dtype": (_unknown_dtype, "unknown dtype 'Q4'"),
    "unsupported_dtype": (_unsupported_dtype, "'model.norm.weight' has dtype I32"),
    "unexpected_key": (_unexpected_key, "unexpected tensor(s) 'model.layers.0.mlp.extra_proj.weight'"),
    "missing_key": (_missing_key, "lacks tensor(s) 'model.layers.1.mlp.experts.3.up_proj.weight'"),
    "index_wrong_shard": (_index_points_to_wrong_shard, "does not hold it"),
    "bad_index_json": (_bad_index_json, "is not valid JSON"),
    "no_weights": (_no_weights, "holds neither model.safetensors.index.json nor model.safetensors"),
    "missing_config": (_missing_config, "missing HF config"),
    "config_disagrees": (_config_disagrees, "config expects [32, 48]"),
    "unsupported_arch": (_unsupported_arch, "unsupported architecture"),
}


def _scale_missing(d):
    update_index(d, lambda wm: wm.pop(Q_A + "_scale_inv"))


def _scale_wrong_shape(d):
    edit_header(d, Q_A, lambda h: h[Q_A + "_scale_inv"].update(shape=[1], data_offsets=[
        h[Q_A + "_scale_inv"]["data_offsets"][0], h[Q_A + "_scale_inv"]["data_offsets"][0] + 4]))


def _no_quantization_config(d):
    edit_config(d, lambda c: c.pop("quantization_config"))


def _other_quant_method(d):
    edit_config(d, lambda c: c["quantization_config"].__setitem__("quant_method", "awq"))


BAD_FP8 = {
    "scale_missing": (_scale_missing, f"FP8 tensor '{Q_A}' has no '{Q_A}_scale_inv'"),
    "scale_wrong_shape": (_scale_wrong_shape, f"scale '{Q_A}_scale_inv' has shape [1]"),
    "no_quantization_config": (_no_quantization_config, "config.json has no quantization_config"),
    "other_quant_method": (_other_quant_method, "quant_method 'awq' is not supported"),
}


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    rc = cli_main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def assert_clean_failure(rc, lines, fragment, tmp_path):
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ["src"]  # neither DST nor a temporary directory


@pytest.mark.parametrize("case", sorted(BAD_BF16) + sorted(BAD_FP8))
def test_bad_input_fails_cleanly(case, base, tmp_path, capsys):
    damage, fragment = BAD_BF16[case] if case in BAD_BF16 else BAD_FP8[case]
    src = tmp_path / "src"
    shutil.copytree(base / ("bf16" if case in BAD_BF16 else "fp8"), src)
    damage(src)
    rc, lines = run_cli(capsys, src, tmp_path / "dst", "--dtype", "float32")
    assert_clean_failure(rc, lines, fragment, tmp_path)
    with pytest.raises((ValueError, OSError)):
        ic.load(src, dtype="float32")


def test_fp8_variant_converts(base, tmp_path, capsys):
    """The undamaged FP8 variant converts, and its quantized weight is W_fp8 * scale_inv."""
    rc, _ = run_cli(capsys, base / "fp8", tmp_path / "dst", "--dtype", "float32")
    assert rc == 0
    cfg, params = ic.load(tmp_path / "dst")
    tensors = load_file(shard_of(base / "fp8", Q_A))
    want = tensors[Q_A].double().numpy() * float(tensors[Q_A + "_scale_inv"][0, 0])
    np.testing.assert_allclose(np.asarray(params["segment_0"]["full"]["mla"]["wq_a"][0]), want.T, rtol=1e-6)


def test_existing_destination_needs_overwrite(base, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("previous content")
    rc, lines = run_cli(capsys, base / "bf16", dst)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "already exists" in lines[0]
    assert (dst / "keep.txt").read_text() == "previous content"
    rc, _ = run_cli(capsys, base / "bf16", dst, "--overwrite", "--dtype", "float32")
    assert rc == 0 and not (dst / "keep.txt").exists()
    cfg, params = ic.load(dst)
    ref = ic.params_from_hf(cfg, {k: v.float().numpy() for s in sorted(set(weight_map(base / "bf16").values()))
                                  for k, v in load_file(base / "bf16" / s).items()})
    np.testing.assert_equal(np.asarray(params["embed"]), np.asarray(ref["embed"]))
    assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_module_entry_point_reports_one_line(base, tmp_path):
    """`python -m checkpoints_convert` on a damaged checkpoint: exit 2, one error line, no traceback."""
    src = tmp_path / "src"
    shutil.copytree(base / "bf16", src)
    _truncated_data(src)
    proc = subprocess.run([sys.executable, "-m", "checkpoints_convert", str(src), str(tmp_path / "dst")],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: corrupt safetensors file"), \
        proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "dst").exists()


# A conversion that stops after a few leaves (touching a marker file) and waits to be killed.
# The child stands for a foreground run, where Ctrl-C raises KeyboardInterrupt. Started from a background job
# (a CI runner's), it would inherit SIGINT ignored, as POSIX shells start background commands.
SLOW_CONVERT = """
import importlib, pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
convert = importlib.import_module("checkpoints_convert.convert")
leaves = convert.Plan.leaves

def slow_leaves(self, progress=None):
    for i, item in enumerate(leaves(self, progress)):
        yield item
        if i == 3:
            pathlib.Path(sys.argv[3]).touch()
            time.sleep(120)

convert.Plan.leaves = slow_leaves
from checkpoints_convert.cli import main
raise SystemExit(main(sys.argv[1:3]))
"""


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_killed_conversion_leaves_nothing(base, tmp_path, sig, status):
    """SIGTERM and Ctrl-C in the middle of a conversion: the temporary directory is removed, no traceback."""
    (tmp_path / "slow.py").write_text(SLOW_CONVERT)
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), str(base / "bf16"), str(tmp_path / "dst"),
                             str(marker)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "conversion did not start"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".dst.tmp-")]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "Traceback" not in err, err
    if sig == signal.SIGINT:
        assert err.strip().splitlines()[-1] == "interrupted; the partial output was removed"
    assert sorted(os.listdir(tmp_path)) == ["slow.py", "started"]


def test_rerun_removes_stale_temporaries(base, tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [f".dst.tmp-{dead_pid}-0123abcd", ".dst.tmp-89abcdef", f".dst.old-{dead_pid}-fedcba98"]
    kept = [f".dst.tmp-{os.getpid()}-00000000", ".other.tmp-12345678"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "leaf").write_bytes(b"x" * 100)
    with caplog.at_level(logging.INFO, logger="checkpoints_convert"):
        assert cli_main([str(base / "bf16"), str(tmp_path / "dst"), "--dtype", "float32"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["dst"])
    removed = sorted(r.getMessage() for r in caplog.records if "left by an interrupted run" in r.getMessage())
    assert removed == sorted(f"removed {tmp_path / n}, left by an interrupted run" for n in stale)
