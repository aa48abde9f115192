"""Compressed checkpoints on the CPU: save_compressed / load_compressed, save_pretrained / from_pretrained,
compress-while-loading, the compress-model CLI, bad input, trust; SmolLM2 (real weights) saved and reloaded."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("safetensors.torch")

from fuzzing import mutate, recompute_crcs  # noqa: E402
from helpers import flip_bits, resident_pages  # noqa: E402

import cupycodec as cc  # noqa: E402
import cupycodec.integrations  # noqa: E402  (registers the quantizer with transformers)
from cupycodec.integrations.torch import (  # noqa: E402
    CompressedLinear,
    CupycodecConfig,
    compress_model,
    load_compressed,
    save_compressed,
)
from cupycodec.integrations.torch._shards import ShardFile  # noqa: E402

pytestmark = pytest.mark.torch

MODES = ["lossless", "int8", "int8+entropy"]
IDS = torch.tensor([[1, 17, 33, 5, 99, 64, 2, 250, 7, 8]])


@pytest.fixture(autouse=True)
def _own_key(tmp_path, monkeypatch):
    """Every test signs and checks with a key of its own (never the user's)."""
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "keys" / "signing.key"))


def _config(**kw):
    args = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bf16")
    transformers.LlamaForCausalLM(_config()).to(torch.bfloat16).save_pretrained(d)
    return str(d)


def _load(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def _logits(model):
    """On the CPU, whichever device the model loaded onto (a GPU host loads onto CUDA by default)."""
    with torch.no_grad():
        return model(IDS.to(next(model.parameters()).device)).logits.cpu()


def _compressed(bf16_dir, mode):
    model = _load(bf16_dir)
    compress_model(model, mode, progress=False)
    return model


def _table(path):
    with ShardFile(path) as f:
        return json.loads(f.metadata["cupycodec"])


def _shards(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))


def _rewrite(path, edit_tensors=None, edit_table=None):
    """Rewrite one shard, changing its tensors and/or the cupycodec table, and give every shard beside it the same
    table (what a crafted checkpoint does)."""
    tensors = st.load_file(path)
    with ShardFile(path) as f:
        meta = dict(f.metadata)
    table = json.loads(meta["cupycodec"])
    if edit_tensors:
        edit_tensors(tensors, table)
    if edit_table:
        edit_table(table)
    text = json.dumps(table)
    for other in _shards(os.path.dirname(path)):
        other = os.path.join(os.path.dirname(path), other)
        with ShardFile(other) as f:
            m = dict(f.metadata)
        m["cupycodec"] = text
        st.save_file(tensors if other == str(path) else st.load_file(other), other, metadata=m)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_save_compressed_and_load_compressed(bf16_dir, tmp_path, mode):
    model = _compressed(bf16_dir, mode)
    want = _logits(model)
    out = tmp_path / "ckpt"
    names = save_compressed(model, out, max_shard_size="40KB")
    shards = _shards(out)
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(out)
    assert set(names) >= {*shards, "config.json"} and not [n for n in os.listdir(out) if n.endswith((".bin", ".pt"))]
    table = _table(out / shards[0])
    assert table["format_version"] == 1 and set(table["layers"]) == {
        f for f, m in model.named_modules() if isinstance(m, CompressedLinear)}
    for entry in table["tensors"].values():  # every container header is in the metadata, and parses
        if entry["role"] != "plain":
            head = cc.container.header_json(base64.b64decode(entry["header"]))
            assert head["array"]["shape"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "cupycodec"

    # a transformers checkpoint: through from_pretrained (on the CPU, where `want` was computed; the default is CUDA
    # where there is one)
    loaded = load_compressed(out, device="cpu", progress=False)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, CompressedLinear)
    assert torch.equal(_logits(loaded), want)
    for m in loaded.modules():  # a layer's template keeps no view of the bytes read (the host copy, on a GPU load)
        if isinstance(m, CompressedLinear) and m.mode != "int8":
            host = m.packed.numpy()
            assert not any(np.shares_memory(a, host) for s in m._template.segments
                           for a in (s.table.comp_nbytes, s.table.crc32, s.table.flags))

    fresh = transformers.AutoModelForCausalLM.from_config(_config(), dtype=torch.bfloat16).eval()
    assert load_compressed(out, fresh, progress=False) is fresh  # into a model you built
    assert torch.equal(_logits(fresh), want)


@pytest.mark.parametrize("mode", MODES)
def test_save_pretrained_and_from_pretrained(bf16_dir, tmp_path, mode):
    base = _logits(_load(bf16_dir))
    model = _compressed(bf16_dir, mode)
    want = _logits(model)
    if mode == "lossless":
        assert torch.equal(want, base)
    model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "cupycodec" and cfg["mode"] == mode
    again = _load(tmp_path / "hf")  # no extra argument
    assert isinstance(again.model.layers[0].self_attn.q_proj, CompressedLinear)
    assert again.hf_quantizer.is_compileable  # generate may compile its decode step
    assert torch.equal(_logits(again), want)
    again.save_pretrained(tmp_path / "hf2")  # and once more, from the reloaded model
    assert torch.equal(_logits(_load(tmp_path / "hf2")), want)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and madvise: Linux")
def test_a_load_gives_back_the_mapped_pages_of_what_it_decodes(tmp_path, monkeypatch):
    # the embedding, head and norms are decoded while loading, so the model holds them decoded; the mapped pages of
    # their compressed bytes then leave the resident set (SmolLM2 on the CPU: peak RSS 309.6 -> 274.2 MiB, lossless)
    import mmap

    from cupycodec.integrations.torch import checkpoint

    page = mmap.PAGESIZE
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(_config(vocab_size=8192)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = _compressed(tmp_path / "bf16", "lossless")
    want = _logits(model)
    model.save_pretrained(tmp_path / "hf")
    calls, real = [], checkpoint.release_clean_file_pages

    def release(addr, nbytes):
        got = real(addr, nbytes)
        calls.append((nbytes, got, int(resident_pages(addr, nbytes).sum()), addr))
        return got

    monkeypatch.setattr(checkpoint, "release_clean_file_pages", release)
    again = _load(tmp_path / "hf")
    assert torch.equal(_logits(again), want)
    big = max(calls)
    assert big[0] > 128 * page and big[1] >= big[0] - 2 * page  # the embedding's or the head's compressed bytes
    # per tensor, once after its decode and once after its MAC check (another thread), which may read the pages
    # back in between: right after one of the two, none of them is resident
    by_tensor = {}
    for _, _, resident, addr in calls:
        by_tensor[addr] = min(resident, by_tensor.get(addr, resident))
    assert not any(by_tensor.values()), calls


@pytest.mark.parametrize("mode", MODES)
def test_compress_while_loading_matches_compress_model(bf16_dir, mode):
    model = _load(bf16_dir, quantization_config=CupycodecConfig(mode=mode))
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 14 and not any("weight" in m._parameters for m in layers)  # no placeholder left
    assert not [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert torch.equal(_logits(model), _logits(_compressed(bf16_dir, mode)))
    report = model.cupycodec_report
    assert len(report.layers) == 14 and report.skipped == {"lm_head": "output head"} and report.ratio > 1.2
    assert (mode == "lossless") == all(r.sqnr_db is None for r in report.layers)


def test_compress_while_loading_filters(bf16_dir):
    model = _load(bf16_dir, quantization_config=CupycodecConfig(mode="int8", modules_to_convert=[r"mlp\."],
                                                                modules_to_not_convert=["model.layers.1"]))
    names = sorted(n for n, m in model.named_modules() if isinstance(m, CompressedLinear))
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="chose none"):
        _load(bf16_dir, quantization_config=CupycodecConfig(mode="int8", modules_to_convert=["nothing"]))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_classification_head_is_left_alone_by_both_ways_of_compressing(tmp_path, arch):
    # compress_model took `score` / `classifier` (it knew only output embeddings as a head) where loading left
    # `score` alone (transformers' last-module rule) and took `classifier` (that rule misses a last module with a
    # bias): a frozen, quantized head in fine-tuning, and a base checkpoint with a new head could not load
    if arch == "llama":
        cls, base, head = transformers.LlamaForSequenceClassification, transformers.LlamaModel, "score"
        make = lambda: _config(num_labels=3, pad_token_id=0)  # noqa: E731
    else:
        cls, base, head = transformers.BertForSequenceClassification, transformers.BertModel, "classifier"
        make = lambda: transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,  # noqa: E731
                                               num_attention_heads=2, intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    model = cls(make())
    report = compress_model(model, "int8", progress=False)
    assert type(getattr(model, head)) is torch.nn.Linear and report.skipped == {head: "output head"}
    assert getattr(model, head).weight.requires_grad  # still trained by a fine-tuning step
    cls(make()).save_pretrained(tmp_path / "full")
    base(make()).save_pretrained(tmp_path / "base")  # a base checkpoint: the head is made new on load
    for d in ("full", "base"):
        loaded = cls.from_pretrained(tmp_path / d, quantization_config=CupycodecConfig(mode="int8"))
        assert type(getattr(loaded, head)) is torch.nn.Linear
        assert loaded.cupycodec_report.skipped == {head: "output head"}
        assert len(loaded.cupycodec_report.layers) == len(report.layers)


def test_tied_and_plain_modules(tmp_path):
    """A model that is not a transformers one, with a weight shared by two layers: stored once, tied again."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32),
                              torch.nn.LayerNorm(32), torch.nn.Linear(48, 32)).to(torch.bfloat16)
    net[4].weight = net[2].weight  # tied
    compress_model(net, "lossless", progress=False)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    want = net[3](net[2](net[1](net[0](x))))
    save_compressed(net, tmp_path / "net")
    assert not (tmp_path / "net" / "config.json").exists()
    table = _table(tmp_path / "net" / "model.safetensors")
    assert table["aliases"] == {"4.packed": "2.packed"}
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32),
                                torch.nn.LayerNorm(32), torch.nn.Linear(48, 32)).to(torch.bfloat16)
    load_compressed(tmp_path / "net", fresh, progress=False)
    assert fresh[4].packed is fresh[2].packed
    assert torch.equal(fresh[3](fresh[2](fresh[1](fresh[0](x)))), want)
    with pytest.raises(ValueError, match="model.* lacks|not in this"):
        load_compressed(tmp_path / "net", torch.nn.Sequential(torch.nn.Linear(32, 48)), progress=False)


# -- transformers without cupycodec ----------------------------------------------------------------------------


def _python(code, cwd):
    """A fresh interpreter outside the source tree (whose cupycodec/ lacks the installed integrations)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd)


def test_transformers_refuses_the_checkpoint_until_cupycodec_is_imported(bf16_dir, tmp_path):
    _compressed(bf16_dir, "int8").save_pretrained(tmp_path / "hf")
    load = f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})\n" \
           "print(type(m.model.layers[0].mlp.up_proj).__name__)"
    alone = _python(f"from transformers import AutoModelForCausalLM\n{load}", tmp_path)
    assert alone.returncode != 0  # a size mismatch, not a model of random weights
    assert "import cupycodec.integrations before from_pretrained" in alone.stdout + alone.stderr
    for first in ("import cupycodec.integrations\nfrom transformers import AutoModelForCausalLM",
                  "from transformers import AutoModelForCausalLM\nimport cupycodec.integrations",
                  # transformers first imported by cupycodec's own quantizer module, while it is being imported
                  "from cupycodec.integrations.torch import CupycodecConfig\n"
                  "from transformers import AutoModelForCausalLM",
                  "import cupycodec.integrations.torch.hf\nfrom transformers import AutoModelForCausalLM"):
        run = _python(f"{first}\n{load}", tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip().endswith("CompressedLinear")


def test_a_load_and_a_forward_never_import_ml_dtypes(saved, tmp_path):
    # ml_dtypes costs ~0.6 s of import: a third of a small model's from_pretrained on the CPU (RESULTS.md);
    # bfloat16 tensors are decoded into through integer bit views instead
    _, out = saved
    code = ("import sys, torch\nimport cupycodec.integrations\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "with torch.no_grad():\n    m(torch.tensor([[1, 2, 3]]))\n"
            "print('ml_dtypes' in sys.modules)")
    run = _python(code, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("False")


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(bf16_dir, tmp_path):
    """A lossless model and its two-shard checkpoint."""
    model = _compressed(bf16_dir, "lossless")
    out = tmp_path / "ckpt"
    save_compressed(model, out, max_shard_size="100KB")
    assert len(_shards(out)) == 2
    return model, out


def _fresh():
    return transformers.AutoModelForCausalLM.from_config(_config(), dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1"])
def test_a_format_version_that_is_not_a_positive_int_is_refused(saved, version):
    _, out = saved
    _rewrite(out / _shards(out)[0], edit_table=lambda t: t.update(format_version=version))
    with pytest.raises(cc.FormatError, match=r"no valid format_version \(an int from 1\), got"):
        load_compressed(out, _fresh(), progress=False)


def test_a_newer_format_version_is_refused(saved):
    _, out = saved
    shard = out / _shards(out)[1]
    _rewrite(shard, edit_table=lambda t: t.update(format_version=2))
    with pytest.raises(cc.UnsupportedVersionError, match=r"model-0000\d-of-00002.safetensors: checkpoint format "
                                                        r"version 2 .*upgrade cupycodec"):
        load_compressed(out, _fresh(), progress=False)


def test_a_missing_shard_is_named(saved):
    _, out = saved
    name = _shards(out)[1]
    os.unlink(out / name)
    with pytest.raises(FileNotFoundError, match=rf"shard {name} is missing"):
        load_compressed(out, _fresh(), progress=False)


def test_a_shape_mismatch_names_the_tensor_and_changes_nothing(saved):
    _, out = saved
    other = transformers.AutoModelForCausalLM.from_config(_config(vocab_size=300), dtype=torch.bfloat16)
    before = _state(other)
    with pytest.raises(ValueError, match=r"model-0000\d-of-00002.safetensors: tensor '(model.embed_tokens|lm_head)"
                                         r".weight' holds BF16\[256, 64\]; the model expects BF16\[300, 64\]"):
        load_compressed(out, other, progress=False)
    assert _same_state(_state(other), before) and not any(
        isinstance(m, CompressedLinear) for m in other.modules())


def test_an_unknown_mode_is_refused(saved, tmp_path):
    model, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["mode"] = "int4"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'int4'.*upgrade"):
        _load(out)
    with pytest.raises(ValueError, match="'int4'"):
        CupycodecConfig(mode="int4")
    shard = out / _shards(out)[0]
    _rewrite(shard, edit_table=lambda t: next(iter(t["layers"].values())).update(mode="int4"))
    for kw in ({}, {"trusted": True}):  # signed by this user: the table's MAC is checked first, trusted or not
        with pytest.raises(cc.AuthenticationError):
            load_compressed(out, _fresh(), progress=False, **kw)
    save_compressed(model, tmp_path / "unsigned", key=False)
    shard = tmp_path / "unsigned" / _shards(tmp_path / "unsigned")[0]
    _rewrite(shard, edit_table=lambda t: next(iter(t["layers"].values())).update(mode="int4"))
    with pytest.raises(cc.FormatError, match=r"layer .* has mode 'int4'.*upgrade cupycodec"):
        load_compressed(tmp_path / "unsigned", _fresh(), trusted=True, progress=False)


def test_a_truncated_shard_names_file_and_tensor(saved):
    _, out = saved
    shard = out / _shards(out)[1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    with pytest.raises(cc.FormatError, match=rf"{shard.name}: tensor '.*': its bytes .*run past .*truncated"):
        load_compressed(out, _fresh(), progress=False)


def _raw_shard(path, header: bytes, data: bytes = b""):
    """A safetensors file of exactly ``header`` (padded to 8 bytes with spaces) and ``data``: what a crafted file
    holds, which safetensors' own writer would refuse to make."""
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize("shape, why", [
    ([2**62] * 5000, "5000 dimensions, more than the 64"),  # math.prod over 100k of these took minutes
    ([1, "2"], "non-negative integers"),
    ([1, -2], "non-negative integers"),
    ([1, 2**63], "non-negative integers"),
])
def test_a_shard_shape_of_too_many_dimensions_or_bad_entries_is_refused(tmp_path, shape, why):
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}).encode()
    shard = _raw_shard(tmp_path / "model.safetensors", header, bytes(8))
    with pytest.raises(cc.FormatError, match=rf"model.safetensors: tensor 'w': .*{re.escape(why)}"):
        ShardFile(str(shard))


@pytest.mark.parametrize("where", ["shard header", "table", "index"])
@pytest.mark.parametrize("value, why", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                        ("[" * 65 + "]" * 65, "nested deeper than 64 levels"),
                                        ("9" * 5000, "not valid JSON: Exceeds the limit")])
def test_hostile_json_in_a_checkpoint_is_a_format_error(saved, where, value, why):
    # RecursionError and a bare ValueError escaped (a bug hunt, 2026-12-05); the container's parser refused these
    _, out = saved
    shard = out / _shards(out)[0]
    if where == "index":
        index = out / "model.safetensors.index.json"
        index.write_text(index.read_text()[:-2] + f', "x": {value}}}')
    else:
        header = json.loads(_raw_header(shard))
        if where == "table":
            header["__metadata__"]["cupycodec"] = header["__metadata__"]["cupycodec"][:-1] + f',"x":{value}}}'
        text = json.dumps(header).encode()
        if where == "shard header":
            text = text[:-1] + f', "x": {value}}}'.encode()
        _raw_shard(shard, text, shard.read_bytes()[8 + len(_raw_header(shard)):])
    with pytest.raises(cc.FormatError, match=why):
        load_compressed(out, _fresh(), progress=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="FIFOs, /dev/zero: POSIX")
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "huge"])
def test_an_index_that_is_no_regular_file_or_too_large_is_refused_at_once(saved, kind):
    # a FIFO hung the load (waiting for a writer), /dev/zero ate memory until none was left (a bug hunt, 2026-12-05)
    import threading

    _, out = saved
    index = out / "model.safetensors.index.json"
    index.unlink()
    if kind == "fifo":
        os.mkfifo(index)
    elif kind == "/dev/zero":
        index.symlink_to("/dev/zero")
    else:
        with open(index, "wb") as f:  # sparse: 64 MiB of nothing, and one byte more than the cap
            f.truncate(64 * 2**20 + 1)
    got = []

    def load():
        try:
            load_compressed(out, _fresh(), progress=False)
        except Exception as exc:
            got.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive() and len(got) == 1
    why = "more than 64 MiB" if kind == "huge" else "not a regular file; cupycodec reads checkpoints from files"
    assert isinstance(got[0], cc.FormatError) and re.search(why, str(got[0])), got[0]
    assert "CompressedArray.from_bytes" not in str(got[0])  # advice for containers, not checkpoints


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="FIFOs, /dev/zero: POSIX")
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory"])
def test_a_shard_that_is_no_regular_file_is_a_format_error_with_checkpoint_advice(saved, kind):
    # a ValueError advised passing the bytes to CompressedArray.from_bytes, which is for containers (a bug hunt)
    _, out = saved
    shard = out / _shards(out)[1]
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    elif kind == "directory":
        shard.mkdir()
    else:
        shard.symlink_to("/dev/zero")
    with pytest.raises(cc.FormatError, match=rf"{shard.name}' is not a regular file; cupycodec reads checkpoints "
                                             r"from files \(a checkpoint is a directory of regular files") as info:
        load_compressed(out, _fresh(), progress=False)
    assert "from_bytes" not in str(info.value)


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_an_index_naming_no_file_as_a_shard_is_refused(saved, name):
    _, out = saved
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.packed"] = name
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(cc.FormatError, match=rf"names a shard '{re.escape(name)}' that is no file name in the "
                                             "checkpoint directory"):
        load_compressed(out, _fresh(), progress=False)


def _raw_header(path) -> bytes:
    data = path.read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")]


def test_a_corrupt_payload_names_file_and_tensor_and_changes_nothing(saved):
    _, out = saved
    shard = out / _shards(out)[0]
    with ShardFile(shard) as f:
        name = next(n for n in f.tensors if n.endswith("mlp.up_proj.packed"))
        pos = (f.tensors[name].start + f.tensors[name].end) // 2
    flip_bits(shard, pos, 0x40)
    model = _fresh()
    before = _state(model)
    with pytest.raises(cc.ChecksumError, match=rf"{shard.name}: tensor '{name}': checksum mismatch"):
        load_compressed(out, model, progress=False)
    assert _same_state(_state(model), before)
    with pytest.raises(cc.ChecksumError, match=rf"{shard.name}: tensor '{name}': checksum mismatch"):
        _load(out)  # through transformers: the checks end before from_pretrained returns


def test_a_shard_whose_table_was_edited_alone_is_refused(saved):
    _, out = saved
    shard = out / _shards(out)[1]
    tensors = st.load_file(shard)
    with ShardFile(shard) as f:
        meta = dict(f.metadata)
    meta["cupycodec"] = meta["cupycodec"].replace('"aliases":{}', '"aliases": {}')
    st.save_file(tensors, shard, metadata=meta)
    with pytest.raises(cc.FormatError, match=rf"{shard.name}: its 'cupycodec' metadata differs"):
        load_compressed(out, _fresh(), progress=False)


def test_shards_of_two_saves_are_told_apart(saved, bf16_dir, tmp_path):
    model, out = saved
    save_compressed(model, tmp_path / "again", max_shard_size="100KB")
    name = _shards(out)[1]
    shutil.copyfile(tmp_path / "again" / name, out / name)  # what an interrupted save over an older one leaves
    with pytest.raises(cc.FormatError, match="another save.*interrupted"):
        load_compressed(out, _fresh(), progress=False)


# -- trust ----------------------------------------------------------------------------------------------------


def _templates(model):
    return [m._template for m in model.modules() if isinstance(m, CompressedLinear) and m._template is not None]


def test_signed_here_loads_trusted_elsewhere_untrusted(saved, tmp_path, monkeypatch):
    model, out = saved
    want = _logits(model)
    mine = load_compressed(out, _fresh(), progress=False)
    assert _templates(mine) and all(t.trusted for t in _templates(mine))
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "another-user.key"))  # someone else
    theirs = load_compressed(out, _fresh(), progress=False)
    assert not any(t.trusted for t in _templates(theirs))
    assert torch.equal(_logits(theirs), want)  # zstd payloads: hardened CPU decoders read them untrusted
    # nvCOMP: refused before any byte is read (without CUDA, the missing device is named first)
    error = (cc.UntrustedError, r"not signed with your key.*trusted=True.*key=") if torch.cuda.is_available() else \
        (cc.BackendUnavailableError, "no CUDA device is usable here")
    with pytest.raises(error[0], match=error[1]):
        load_compressed(out, _fresh(), device="cuda", progress=False)
    assert all(t.trusted for t in _templates(load_compressed(out, _fresh(), trusted=True, progress=False)))


def test_a_signing_key_file_of_a_long_name_is_created(tmp_path, monkeypatch):
    # the key is written under a temporary name beside it first: a name near NAME_MAX made that one too long
    from cupycodec.integrations.torch import _signing

    path = tmp_path / "keys" / ("k" * 250 + ".key")
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(path))
    key = _signing.local_key(create=True)
    assert key is not None and path.read_bytes() == key
    assert os.listdir(path.parent) == [path.name]


def test_save_compressed_and_load_compressed_take_a_bytes_path(saved, tmp_path):
    model, _ = saved
    want = _logits(model)
    out = os.fsencode(tmp_path / "bytes")
    names = save_compressed(model, out)
    assert all(isinstance(n, str) for n in names)
    assert torch.equal(_logits(load_compressed(out, _fresh(), progress=False)), want)
    assert torch.equal(_logits(load_compressed(out, progress=False)), want)


def test_keys_must_match(saved, tmp_path, bf16_dir):
    model, out = saved
    with pytest.raises(cc.AuthenticationError, match="another key"):
        load_compressed(out, _fresh(), key=b"k" * 32, progress=False)
    save_compressed(model, tmp_path / "unsigned", key=False)
    with pytest.raises(cc.AuthenticationError, match="not signed"):
        load_compressed(tmp_path / "unsigned", _fresh(), key=b"k" * 32, progress=False)
    save_compressed(model, tmp_path / "theirs", key=b"s" * 32)
    assert torch.equal(_logits(load_compressed(tmp_path / "theirs", _fresh(), key=b"s" * 32, progress=False)),
                       _logits(model))


def _craft(out, tensor, rng_seed=0):
    """Change bytes of a tensor's encoded chunks and recompute every CRC: a crafted checkpoint CRCs do not catch."""
    import numpy as np

    shard = next(out / n for n in _shards(out) if tensor in ShardFile(out / n).tensors)

    def edit(tensors, table):
        entry = table["tensors"][tensor]
        assert entry["role"] == "packed"  # the whole container is the tensor; its header also in the metadata
        prefix = base64.b64decode(entry["header"])
        blob = tensors[tensor].numpy().tobytes()
        assert blob.startswith(prefix)
        bad = mutate(blob, np.random.default_rng(rng_seed), 8)
        assert recompute_crcs(bad) == bad and bad != blob
        tensors[tensor] = torch.frombuffer(bytearray(bad), dtype=torch.uint8)
        head = cc.container.PRELUDE_NBYTES + cc.container.parse_prelude(memoryview(bad))[0]  # it may have grown
        entry["header"] = base64.b64encode(bad[:head]).decode()

    _rewrite(shard, edit_tensors=edit)


def test_a_crafted_checkpoint_fails_cleanly_on_the_cpu(saved, tmp_path, monkeypatch):
    model, out = saved
    want = _logits(model)
    _craft(out, "model.layers.0.mlp.up_proj.packed")
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "another-user.key"))
    crafted = load_compressed(out, _fresh(), progress=False)  # CRCs recomputed: loading cannot tell
    try:  # the hardened zstd decoder rejects the chunk, or decodes other weights; it never crashes the process
        got = _logits(crafted)
    except (cc.CupycodecError, ValueError) as exc:
        assert "zstd" in str(exc).lower() or "chunk" in str(exc).lower(), exc
    else:
        assert not torch.equal(got, want)


def test_a_tampered_signed_checkpoint_is_refused(saved, monkeypatch):
    _, out = saved
    name = "model.layers.1.self_attn.o_proj.packed"
    _craft(out, name)
    with pytest.raises(cc.AuthenticationError, match=rf"tensor '{name}'"):
        load_compressed(out, _fresh(), progress=False)  # signed by this user: its MACs are checked, and fail


def test_a_key_is_checked_when_trusted_is_passed_too(saved, tmp_path):
    # trusted=True (to allow nvCOMP) must not switch off the integrity a key= asks for: the key wins, as in the core
    model, _ = saved
    out, key = tmp_path / "theirs", b"s" * 32
    save_compressed(model, out, max_shard_size="100KB", key=key)
    _craft(out, "model.layers.1.self_attn.o_proj.packed")
    with pytest.raises(cc.AuthenticationError, match="o_proj"):
        load_compressed(out, _fresh(), key=key, trusted=True, progress=False)
    with pytest.raises(cc.AuthenticationError, match="o_proj"):  # from_pretrained: CupycodecConfig(key=, trusted=)
        load_compressed(out, key=key, trusted=True, progress=False)
    with pytest.raises(TypeError, match="key must be bytes"):  # validated as without trusted
        load_compressed(out, _fresh(), key="nonsense", trusted=True, progress=False)
    mine = tmp_path / "mine"  # signed with this user's key (the default): checked with trusted=True too
    save_compressed(model, mine, max_shard_size="100KB")
    _craft(mine, "model.layers.1.self_attn.o_proj.packed")
    with pytest.raises(cc.AuthenticationError, match="o_proj"):
        load_compressed(mine, _fresh(), trusted=True, progress=False)


def test_a_layer_mode_edited_in_a_signed_table_is_an_authentication_error(saved, tmp_path):
    # the mode was checked while the table was parsed, before its MAC: "upgrade cupycodec" (a ValueError) for a
    # tampered signed table; unsigned, an unknown mode is a FormatError that says both what it may be
    model, _ = saved
    for key in (b"s" * 32, False):
        out = tmp_path / ("signed" if key else "plain")
        save_compressed(model, out, key=key)

        def edit(table):
            for cfg in table["layers"].values():
                cfg["mode"] = "int4"

        _rewrite(out / _shards(out)[0], edit_table=edit)
        if key:
            with pytest.raises(cc.AuthenticationError, match="changed after it was signed"):
                load_compressed(out, _fresh(), key=key, progress=False)
        with pytest.raises(cc.FormatError, match="mode 'int4'.*upgrade cupycodec.*crafted"):
            load_compressed(out, _fresh(), trusted=True, progress=False)
    _rewrite(out / _shards(out)[0], edit_table=lambda table: table.update(signed_by=["a"]))
    with pytest.raises(cc.FormatError, match="signed_by must be a key fingerprint or null"):
        load_compressed(out, _fresh(), trusted=True, progress=False)


def test_a_refused_checkpoint_leaves_no_shard_mapped(saved, tmp_path):
    # the files-versus-table check raised after the shards were mapped, and a shard whose header failed stayed
    # mapped: a caller keeping the errors (a retry loop, a logger) kept a map of every shard per failure
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    model, _ = saved
    out = tmp_path / "extra"
    save_compressed(model, out)
    shard = out / _shards(out)[0]
    _rewrite(shard, edit_tensors=lambda tensors, table: tensors.update({"extra.tensor": torch.zeros(4)}))
    bad = tmp_path / "badjson" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(struct.pack("<Q", 2) + b"[]" + bytes(64))  # a header that is no JSON object, then data

    def mapped(path):
        with open("/proc/self/maps") as f:
            return sum(str(path) in line for line in f)

    errors = []
    for _ in range(3):
        with pytest.raises(cc.FormatError, match="the metadata and the files disagree") as info:
            load_compressed(out, _fresh(), progress=False)
        errors.append(info.value)
        with pytest.raises(cc.FormatError, match="not a JSON object") as info:
            ShardFile(str(bad))
        errors.append(info.value)
    assert mapped(shard) == 0 and mapped(bad) == 0


class _SharedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = self.a  # one module under two names
        self.c = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
def test_a_module_under_two_names_saves_and_loads(tmp_path, mode):
    # the table recorded the layer under its first name only, and its tensors under the second as aliases, which
    # the loader refused as "a tensor that is not there" (or, into a compressed model, "corrupt or crafted")
    torch.manual_seed(0)
    net, x = _SharedNet(), torch.randn(2, 16)
    compress_model(net, mode, progress=False)
    with torch.no_grad():
        want = net(x)
    save_compressed(net, tmp_path / "ck", key=False)
    for target in (_SharedNet(), None):
        if target is None:
            target = _SharedNet()
            compress_model(target, mode, progress=False)
        got = load_compressed(tmp_path / "ck", target, progress=False)
        assert isinstance(got.a, CompressedLinear) and got.a is got.b
        with torch.no_grad():
            assert torch.equal(got(x), want)


def test_a_config_json_of_another_save_is_refused(tmp_path):
    # a load racing a save (or files of two saves) built the model from one save's config.json and loaded the
    # other's weights into it, with no error: config.json now names its save, and a loader compares
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    compress_model(model, "int8", progress=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        want = model(ids).logits
    save_compressed(model, tmp_path / "a")
    save_compressed(model, tmp_path / "b")
    table = _table(tmp_path / "a" / "model.safetensors")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["checkpoint"] == \
        table["checkpoint"]
    back = load_compressed(tmp_path / "a", device="cpu", progress=False)  # and a loaded model saves as any other
    assert back.config.quantization_config.checkpoint is None
    back.save_pretrained(tmp_path / "c")
    for d in ("a", "c"):  # on the CPU, where `want` was computed
        with torch.no_grad():
            assert torch.equal(load_compressed(tmp_path / d, device="cpu", progress=False)(ids).logits, want)
    shutil.copyfile(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    with pytest.raises(cc.FormatError, match="config.json was written by another save than its weights"):
        load_compressed(tmp_path / "b", device="cpu", progress=False)


def _edit_dense_header(table, name, edit):
    """Change the container header a dense tensor's table entry holds (its CRC recomputed, as a crafted file has)."""
    import zlib

    entry = table["tensors"][name]
    prefix = base64.b64decode(entry["header"])
    (n,) = struct.unpack("<Q", prefix[8:16])
    head = json.loads(prefix[24 : 24 + n])
    edit(head)
    text = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    entry["header"] = base64.b64encode(prefix[:8] + struct.pack("<QI", len(text), zlib.crc32(text)) + bytes(4) +
                                       text).decode()


@pytest.mark.parametrize("edit, why", [
    (lambda h: h["array"].update(dtype=["F32"]), r"is no dtype name"),
    (lambda h: h.update(segments=None), r"segments must be a list"),
])
def test_a_crafted_container_header_in_the_table_is_a_format_error(saved, tmp_path, edit, why):
    # a list dtype raised "unhashable type: 'list'", null segments "'NoneType' object is not iterable"
    model, _ = saved
    out = tmp_path / "ck"
    save_compressed(model, out, key=False)
    shard = out / _shards(out)[0]
    _rewrite(shard, edit_table=lambda t: _edit_dense_header(t, "model.norm.weight", edit))
    with pytest.raises(cc.FormatError, match=why):
        load_compressed(out, _fresh(), progress=False)


def test_a_shard_with_bytes_after_its_tensors_or_a_list_dtype_is_a_format_error(saved, tmp_path):
    # appended bytes: load_compressed(dir, model) took the shard, from_pretrained raised safetensors' own error
    model, _ = saved
    out = tmp_path / "ck"
    save_compressed(model, out, key=False)
    shard = out / _shards(out)[0]
    with open(shard, "ab") as f:
        f.write(b"\0")
    for load in (lambda: load_compressed(out, _fresh(), progress=False), lambda: load_compressed(out, progress=False)):
        with pytest.raises(cc.FormatError, match="1 bytes after its last tensor"):
            load()
    head = json.dumps({"t": {"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "list.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0")
    with pytest.raises(cc.FormatError, match=r"dtype \['U8'\] is not one"):  # unhashable type: 'list' before
        ShardFile(str(tmp_path / "list.safetensors"))


class _TwoNet(torch.nn.Module):  # _SharedNet's names, two modules
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_two_saved_layers_into_one_shared_module_load_as_two(tmp_path):
    # the loader gave both names the first name's layer (the table said two layers): silently other weights
    torch.manual_seed(0)
    net, x = _TwoNet(), torch.randn(2, 16)
    compress_model(net, "lossless", progress=False)
    with torch.no_grad():
        want = net(x)
    save_compressed(net, tmp_path / "ck", key=False)
    got = load_compressed(tmp_path / "ck", _SharedNet(), progress=False)
    assert got.a is not got.b
    with torch.no_grad():
        assert torch.equal(got(x), want)


def test_a_stored_checkpoint_id_is_not_written_by_a_later_save(bf16_dir, tmp_path):
    # CupycodecConfig.from_dict of a compressed checkpoint's config.json, used to compress another model while
    # loading: its save_pretrained wrote that id, and the checkpoint then never loaded
    stored = {"quant_method": "cupycodec", "mode": "int8", "checkpoint": "cf03aa37bf3109f7"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        bf16_dir, quantization_config=CupycodecConfig.from_dict(stored))
    model.save_pretrained(tmp_path / "out")
    assert "checkpoint" not in json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    _load(tmp_path / "out")


def test_compress_checkpoint_takes_only_a_model_class(bf16_dir, tmp_path):
    from cupycodec.integrations.torch import compress_checkpoint

    src = tmp_path / "in"
    shutil.copytree(bf16_dir, src)
    _edit_config(src, architectures=["GenerationConfig"])  # an AttributeError from the loader's output before
    with pytest.raises(cc.FormatError, match="names no transformers model class"):
        compress_checkpoint(src, tmp_path / "out", mode="int8", progress=False)


def test_a_crafted_layer_configuration_is_a_format_error_through_from_pretrained(saved, tmp_path):
    model, _ = saved
    out = tmp_path / "ck"
    save_compressed(model, out, key=False)

    def edit(table):
        next(iter(table["layers"].values()))["group_size"] = 0

    _rewrite(out / _shards(out)[0], edit_table=edit)
    for load in (lambda: load_compressed(out, trusted=True, progress=False),
                 lambda: load_compressed(out, _fresh(), trusted=True, progress=False)):
        with pytest.raises(cc.FormatError, match="bad CompressedLinear configuration"):
            load()


def test_an_index_naming_no_shard_is_a_format_error(saved, tmp_path):
    model, _ = saved
    out = tmp_path / "ck"
    save_compressed(model, out, max_shard_size="100KB", key=False)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(cc.FormatError, match="weight_map names no shard"):  # AttributeError on None before
        load_compressed(out, _fresh(), progress=False)


def test_compressed_weights_beside_a_plain_config_json_get_advice_that_works(bf16_dir, tmp_path):
    # "load it with transformers" failed (transformers' size-mismatch RuntimeError): the weights are cupycodec's
    model = _load(bf16_dir)
    compress_model(model, "int8", progress=False)
    save_compressed(model, tmp_path / "ck")
    shutil.copyfile(os.path.join(bf16_dir, "config.json"), tmp_path / "ck" / "config.json")
    with pytest.raises(ValueError, match=r"its weights are a cupycodec checkpoint.*load_compressed\(directory, model\)"):
        load_compressed(tmp_path / "ck", progress=False)
    with pytest.raises(ValueError, match="is not a cupycodec checkpoint.*load it with transformers"):
        load_compressed(bf16_dir, progress=False)


# -- the command line -----------------------------------------------------------------------------------------


def test_compress_model_cli(bf16_dir, tmp_path, capsys):
    from cupycodec.__main__ import main

    (tmp_path / "in").mkdir()
    for n in os.listdir(bf16_dir):
        shutil.copyfile(os.path.join(bf16_dir, n), tmp_path / "in" / n)
    (tmp_path / "in" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "in" / "original" / "deep").mkdir(parents=True)  # a subfolder's files are copied, weights not
    (tmp_path / "in" / "original" / "params.json").write_text("{}")
    (tmp_path / "in" / "original" / "deep" / "tokenizer.model").write_bytes(b"tok")
    (tmp_path / "in" / "original" / "consolidated.00.pth").write_bytes(b"weights")
    (tmp_path / "in" / ".cache").mkdir()
    (tmp_path / "in" / ".cache" / "x.lock").write_text("")
    rc = main(["compress-model", str(tmp_path / "in"), str(tmp_path / "out"), "--mode", "int8", "--skip",
               "model.layers.1", "--json", str(tmp_path / "r.json"), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in printed and "SQNR" in printed and "left alone" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["layers"]) == 7 and report["ratio"] > 1.5
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert (tmp_path / "out" / "original" / "params.json").read_text() == "{}"
    assert (tmp_path / "out" / "original" / "deep" / "tokenizer.model").read_bytes() == b"tok"
    assert not (tmp_path / "out" / "original" / "consolidated.00.pth").exists()
    assert not (tmp_path / "out" / ".cache").exists()
    model = _load(tmp_path / "out")
    assert isinstance(model.model.layers[0].mlp.up_proj, CompressedLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj, torch.nn.Linear)
    assert main(["compress-model", str(tmp_path / "out"), str(tmp_path / "x"), "--mode", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err


# -- real weights ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning:gguf")
def test_smollm2_lossless_checkpoint_reloads_identical(smollm2, tmp_path):
    base, tok, ids, base_logits, base_text = smollm2
    model = copy.deepcopy(base)
    compress_model(model, "lossless", progress=False)
    names = save_compressed(model, tmp_path / "smollm2")
    disk = sum(os.path.getsize(tmp_path / "smollm2" / n) for n in names if n.endswith(".safetensors"))
    again = load_compressed(tmp_path / "smollm2", progress=False)  # from_pretrained under the hood
    assert again.lm_head.weight is again.model.embed_tokens.weight  # tied again
    with torch.no_grad():
        logits = again(**ids).logits
        text = tok.decode(again.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert torch.equal(logits, base_logits) and text == base_text
    bf16 = sum(p.numel() * p.element_size() for p in base.parameters())
    print(f"SmolLM2 lossless checkpoint: {disk} bytes on disk vs {bf16} bytes of bf16 parameters "
          f"({bf16 / disk:.3f}x)")
    assert disk < bf16 / 1.3


# -- CRCs checked where the tensors were placed -----------------------------------------------------------------


def _placed_container():
    x = (np.random.default_rng(3).standard_normal(40_000) * 0.02).astype(np.float32)
    c = cc.compress(x, codec="zstd", chunk_nbytes=16_384)
    prefix, payload = c.header_bytes(), bytes(c.host_payload())
    template = cc.CompressedArray.from_parts(prefix, payload, verify=False, trusted=True).without_payload()
    return template, torch.frombuffer(bytearray(prefix + payload), dtype=torch.uint8), len(prefix)


def test_placed_checks_on_the_host_name_file_tensor_and_chunk():
    """A tensor registered for a GPU check that stayed on the host (a device map with "cpu" blocks) is checked there:
    whole-tensor CRCs (codes, scales) and every chunk of a container, each error naming its file and tensor."""
    from cupycodec.integrations.torch.checkpoint import PlacedChecks

    template, blob, head = _placed_container()
    codes = torch.arange(-100, 100, dtype=torch.int8).repeat(7)
    tensors = {"l.packed": blob.clone(), "l.qweight": codes.clone(), "l.empty": torch.zeros(0, dtype=torch.int8)}

    def checks():
        p = PlacedChecks()
        p.add("f.safetensors: tensor 'l.packed'", "l.packed", container=template)
        p.add("f.safetensors: tensor 'l.qweight'", "l.qweight", crc=cc.backends.cpu.crc32(codes.numpy()))
        p.add("f.safetensors: tensor 'l.empty'", "l.empty", crc=0)
        return p

    checks().run(tensors.__getitem__)
    tensors["l.packed"][head + 3 * 16_384 // 2] ^= 1  # a byte of a later chunk
    with pytest.raises(cc.ChecksumError, match=r"f.safetensors: tensor 'l.packed': checksum mismatch.*chunk"):
        checks().run(tensors.__getitem__)
    tensors["l.packed"] = blob.clone()
    tensors["l.qweight"][5] += 1
    with pytest.raises(cc.ChecksumError, match=r"f.safetensors: tensor 'l.qweight': checksum mismatch"):
        checks().run(tensors.__getitem__)
    tensors["l.qweight"] = codes.clone()
    tensors["l.packed"] = blob[:-16].clone()
    with pytest.raises(cc.FormatError, match=r"tensor 'l.packed': \d+ bytes were placed, its container has \d+"):
        checks().run(tensors.__getitem__)


def test_an_empty_layer_of_the_same_configuration_is_its_own_probe():
    # _plan checks a checkpoint's containers against an empty layer of each layer's configuration: the one
    # from_pretrained swapped in serves, if its configuration is the checkpoint's exactly (types included)
    from cupycodec.integrations.torch.checkpoint import _empty_as

    cfg = CompressedLinear(64, 32, True, mode="int8+entropy", device="meta").config()
    empty = CompressedLinear.from_config(cfg, device="meta")
    assert _empty_as(empty, cfg)
    assert not _empty_as(empty, {**cfg, "bias": 1})  # equal to True, but from_config refuses it
    assert not _empty_as(empty, {**cfg, "group_size": float(cfg["group_size"])})
    assert not _empty_as(empty, {**cfg, "out_features": 33})
    assert not _empty_as(CompressedLinear.from_config(cfg, device="cpu"), cfg)  # holds tensors: not empty
    assert not _empty_as(torch.nn.Linear(64, 32), cfg)
    with pytest.raises(ValueError, match="bias a bool"):
        CompressedLinear.from_config({**cfg, "bias": 1}, device="meta")


# -- through transformers: what save_pretrained leaves, what from_pretrained checks ----------------------------------


def _edit_config(out, **changes):
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))


def test_save_pretrained_over_a_checkpoint_of_another_layout_leaves_none_of_its_files(bf16_dir, tmp_path):
    a, b = _compressed(bf16_dir, "int8"), _compressed(bf16_dir, "lossless")
    want_a, want_b = _logits(a), _logits(b)
    assert not torch.equal(want_a, want_b)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # not a checkpoint's file: left alone
    a.save_pretrained(out)  # one file, then shards over it
    b.save_pretrained(out, max_shard_size="40KB")
    assert "model.safetensors" not in os.listdir(out) and len(_shards(out)) > 1
    assert torch.equal(_logits(_load(out)), want_b)  # transformers took the stale model.safetensors first
    assert torch.equal(_logits(load_compressed(out, _fresh(), progress=False)), want_b)
    a.save_pretrained(out)  # shards, then one file over them
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json"]
    assert torch.equal(_logits(_load(out)), want_a)
    # an index beside model.safetensors (left by another tool, or by a save that could not clear it): which save is
    # the stale one cannot be told, and transformers would read model.safetensors whichever it is, so both readers
    # refuse rather than load what may be the older model
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    for load in (lambda: load_compressed(out, _fresh(), progress=False), lambda: _load(out)):
        with pytest.raises(cc.FormatError, match="holds both model.safetensors and model.safetensors.index.json: "
                                                 "files of two saves"):
            load()


@pytest.mark.parametrize("fail_at", ["shard", "index"])
def test_a_sharded_save_pretrained_that_fails_keeps_the_one_file_checkpoint(bf16_dir, tmp_path, monkeypatch,
                                                                            fail_at):
    """A full disk while writing shards (or the index, written last) over a one-file checkpoint: the earlier
    model.safetensors is still there and loads, as plain transformers keeps it; the next save that succeeds removes
    it."""
    import transformers.modeling_utils as mu

    a = _compressed(bf16_dir, "int8")
    want = _logits(a)
    out = tmp_path / "hf"
    a.save_pretrained(out)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        if fail_at == "shard":
            m.setattr(mu, "safe_save_file", full)
        else:
            m.setattr(a, "num_parameters", full)  # asked for the index, written after every shard
        with pytest.raises(OSError, match="No space left on device"):
            a.save_pretrained(out, max_shard_size="40KB")
    assert "model.safetensors" in os.listdir(out)
    assert torch.equal(_logits(_load(out)), want)
    assert torch.equal(_logits(load_compressed(out, _fresh(), progress=False)), want)
    a.save_pretrained(out, max_shard_size="40KB")
    assert "model.safetensors" not in os.listdir(out) and len(_shards(out)) > 1
    assert torch.equal(_logits(_load(out)), want)


@pytest.mark.parametrize("failure", ["config.json read-only", "generation_config.json read-only", "serializing"])
@pytest.mark.parametrize("shard_size", ["50GB", "40KB"])
def test_save_compressed_whose_config_cannot_be_written_keeps_the_old_checkpoint(bf16_dir, tmp_path, monkeypatch,
                                                                                 failure, shard_size):
    """save_compressed over a checkpoint of another model (other shapes), when a config file cannot be written: the
    weights were written first, and the new weights beside the old config.json loaded nothing. The configs are now
    ready (serialized, written beside their targets) before any weight is written: the old checkpoint still loads."""
    import cupycodec._files as files

    old = _compressed(bf16_dir, "lossless")
    want = _logits(old)
    torch.manual_seed(1)
    new = transformers.LlamaForCausalLM(_config(hidden_size=32, intermediate_size=64)).to(torch.bfloat16).eval()
    compress_model(new, "int8", progress=False)
    out = tmp_path / "ckpt"
    save_compressed(old, out, max_shard_size=shard_size)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def fail(*args, **kwargs):
        raise ValueError("cannot serialize")

    access = os.access
    with monkeypatch.context() as m:
        if failure == "serializing":
            m.setattr(type(new.generation_config), "to_json_string", fail)
        else:  # as a non-root user sees a read-only file (root may write any)
            name = failure.partition(" ")[0]
            m.setattr(files.os, "access", lambda p, mode, **kw: not os.fspath(p).endswith(os.sep + name) and
                      access(p, mode, **kw))
        with pytest.raises((PermissionError, ValueError)):
            save_compressed(new, out, max_shard_size="40KB")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # nothing replaced, nothing left over
    assert torch.equal(_logits(_load(out)), want)


def _checks_threads():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("cupycodec-checks")]


@pytest.mark.parametrize("tensor", ["model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"])
def test_a_corrupt_dense_tensor_raises_the_library_error_through_from_pretrained(saved, tensor):
    _, out = saved
    shard = next(out / n for n in _shards(out) if tensor in ShardFile(out / n).tensors)
    with ShardFile(shard) as f:
        pos = (f.tensors[tensor].start + f.tensors[tensor].end) // 2
    flip_bits(shard, pos, 0x01)
    transformers.utils.logging.set_verbosity_error()  # an application that silences transformers' report
    try:
        for load in (lambda: load_compressed(out, device="cpu", progress=False), lambda: _load(out)):
            with pytest.raises(cc.ChecksumError, match=rf"{shard.name}: tensor '{tensor}': checksum mismatch"):
                load()
            assert not _checks_threads()  # the checks' pool was shut down
    finally:
        transformers.utils.logging.set_verbosity_warning()


def test_a_packed_layer_whose_header_differs_is_named_through_from_pretrained(saved):
    _, out = saved
    name = "model.layers.0.mlp.up_proj.packed"
    shard = next(out / n for n in _shards(out) if name in ShardFile(out / n).tensors)
    with ShardFile(shard) as f:
        pos = f.tensors[name].start + 20  # in the container's header, which the metadata also holds
    flip_bits(shard, pos, 0x01)
    with pytest.raises(cc.FormatError, match=rf"{shard.name}: tensor '{name}': .*differ from the metadata's copy"):
        _load(out)
    assert not _checks_threads()


def test_an_error_while_compressing_reaches_the_caller(bf16_dir, monkeypatch):
    def fail(self, w, codec, home):
        raise ValueError("no room for it")

    monkeypatch.setattr(CompressedLinear, "_compress", fail)
    with pytest.raises(ValueError, match=r"^layer 'model.layers.0.[a-z_.]+': no room for it$"):
        _load(bf16_dir, quantization_config=CupycodecConfig(mode="int8"))


def test_load_compressed_of_a_directory_honours_strict_and_progress(saved, capfd):
    _, out = saved
    _edit_config(out, num_hidden_layers=3)  # a model with a layer the checkpoint lacks
    with pytest.raises(ValueError, match=r"lacks 9 tensors of this LlamaForCausalLM: \['model.layers.2.*strict="
                                         r"False"):
        load_compressed(out, device="cpu", progress=False)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    capfd.readouterr()
    model = load_compressed(out, device="cpu", strict=False, progress=False)  # the missing layer: random, as asked
    assert len(model.model.layers) == 3 and isinstance(model.model.layers[2].mlp.up_proj, torch.nn.Linear)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled() == bars  # put back


@pytest.mark.parametrize(("edit", "layer", "stored", "described"), [
    ({"intermediate_size": 96}, "mlp.down_proj", r"Linear\(128, 64", r"Linear\(96, 64"),
    ({"num_key_value_heads": 4}, "self_attn.k_proj", r"Linear\(64, 32", r"Linear\(64, 64"),
])
def test_from_pretrained_refuses_layers_that_config_json_does_not_describe(bf16_dir, tmp_path, edit, layer, stored,
                                                                           described):
    out = tmp_path / "hf"
    _compressed(bf16_dir, "int8").save_pretrained(out)
    _edit_config(out, **edit)
    with pytest.raises(ValueError, match=rf"layer 'model.layers.0.{layer}' holds a {stored}, bias=False\); the "
                                         rf"model that config.json describes has {described}, bias=False\) there"):
        _load(out)


def test_cupycodec_config_checks_its_arguments(saved, tmp_path, monkeypatch):
    for mode in ("lossless", "int8"):  # int8 stores no payload: a codec it would never use is still a mistake
        with pytest.raises(cc.UnknownCodecError, match=r"quantization_config: unknown codec 'nonexistent'; "
                                                       r"registered: .*zstd"):
            CupycodecConfig(mode=mode, codec="nonexistent")
    assert CupycodecConfig(codec="zstd").codec == "zstd" and CupycodecConfig(codec="auto").codec == "auto"
    with pytest.raises(TypeError, match="trusted must be True or False"):
        CupycodecConfig(trusted="yes")
    with pytest.raises(TypeError, match=r"unexpected arguments \['mod'\]"):
        CupycodecConfig(mod="int8")
    # config.json: a newer writer's key is ignored, and a checkpoint cannot vouch for itself
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].update(a_newer_option=1, trusted=True)
    (out / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "another-user.key"))
    with pytest.warns(UserWarning, match="'a_newer_option', 'trusted' ignored"):
        model = _load(out)
    assert _templates(model) and not any(t.trusted for t in _templates(model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_compress_model_cli_refuses_a_device_that_is_not_there(bf16_dir, tmp_path, capsys):
    from cupycodec.__main__ import main

    assert main(["compress-model", bf16_dir, str(tmp_path / "out"), "--mode", "int8", "--device", "cuda"]) == 2
    assert "device 'cuda': no CUDA device is usable here" in capsys.readouterr().err
    assert main(["compress-model", bf16_dir, str(tmp_path / "out"), "--mode", "int8", "--codec", "nope"]) == 2
    assert "unknown codec 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compress_model_cli_takes_a_shard_size_in_bytes(bf16_dir, tmp_path, capsys):
    from cupycodec.__main__ import main
    from cupycodec.integrations.torch.checkpoint import _shard_nbytes

    assert _shard_nbytes("1000000") == _shard_nbytes(" 1000000 ") == _shard_nbytes(1_000_000) == 1_000_000
    assert _shard_nbytes("5GB") == 5 * 10**9 and _shard_nbytes("500MiB") == 500 * 2**20
    for bad in ("0", "-5", "0GB", "1.5", "5 apples", True, 0):
        with pytest.raises(ValueError, match="max_shard_size must be a byte count"):
            _shard_nbytes(bad)
    assert main(["compress-model", bf16_dir, str(tmp_path / "out"), "--mode", "int8", "--quiet",
                 "--max-shard-size", "40000"]) == 0
    assert len(_shards(tmp_path / "out")) > 1
    assert isinstance(_load(tmp_path / "out").model.layers[0].mlp.up_proj, CompressedLinear)


def test_compress_model_refuses_a_bad_shard_size_or_output_before_loading(bf16_dir, tmp_path, capsys, monkeypatch):
    from cupycodec.__main__ import main

    def load(*args, **kwargs):
        raise AssertionError("loaded the model before checking its arguments")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", load)
    assert main(["compress-model", bf16_dir, str(tmp_path / "out"), "--mode", "int8", "--quiet",
                 "--max-shard-size", "5 apples"]) == 2
    assert "max_shard_size must be a byte count or a size like '5GB'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").write_text("a file")
    assert main(["compress-model", bf16_dir, str(tmp_path / "out"), "--mode", "int8", "--quiet"]) == 2
    assert "is a file, not a directory: give a directory" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "a file"


def test_compress_model_cli_refuses_an_input_that_is_not_a_directory(tmp_path, capsys, monkeypatch):
    from cupycodec.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it looked up on the Hub, fail at once rather than retry
    monkeypatch.chdir(tmp_path)
    for name in ("no_such_model_dir", "acme/tiny"):
        assert main(["compress-model", name, "out", "--mode", "int8", "--quiet"]) == 2
        assert f"'{name}' is not a directory: compress-model takes a local model directory" in \
            capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:.*tied to an embedding")  # compressed on purpose here
def test_a_tied_head_compressed_by_compress_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_config(tie_word_embeddings=True)).to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16")
    model = _load(tmp_path / "bf16")  # loaded, as the checkpoint will be (.to(bfloat16) casts rotary inv_freq too)
    compress_model(model, "int8", filter_fn=lambda module, fqn: True, progress=False)  # the tied head too
    assert isinstance(model.lm_head, CompressedLinear)
    want = _logits(model)
    model.save_pretrained(tmp_path / "hf")
    assert torch.equal(_logits(_load(tmp_path / "hf")), want)
    save_compressed(model, tmp_path / "sc")
    assert torch.equal(_logits(load_compressed(tmp_path / "sc", device="cpu", progress=False)), want)


def test_load_compressed_names_a_missing_directory_and_one_without_config_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for name in ("no_such_dir", str(tmp_path / "no_such_dir")):
        with pytest.raises(FileNotFoundError, match=rf"'{name}' is not a directory"):
            load_compressed(name, progress=False)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48)).to(torch.bfloat16)
    compress_model(net, "int8", progress=False)
    save_compressed(net, tmp_path / "net")
    with pytest.raises(FileNotFoundError, match=r"no config.json.*load_compressed\(directory, model="):
        load_compressed(tmp_path / "net", progress=False)


def test_a_checkpoint_loaded_in_another_dtype_says_which_to_use(saved):
    _, out = saved
    for dtype, name in ((torch.float32, "F32"), (torch.float16, "F16")):
        with pytest.raises(ValueError, match=rf"{re.escape(str(out))}/model-0000\d-of-00002.safetensors: tensor "
                                             rf"'.*' holds BF16\[.*\]; the model expects {name}\[.*"
                                             r"dtype=torch.bfloat16, or dtype=\"auto\" where config.json names it"):
            _load(out, dtype=dtype)


def test_from_pretrained_refuses_a_shard_outside_the_directory(saved, tmp_path):
    model, out = saved
    save_compressed(model, tmp_path / "other")  # another checkpoint, one file
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.packed"] = "../other/model.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(cc.FormatError, match="outside the checkpoint directory"):
        load_compressed(out, _fresh(), progress=False)
    # through transformers: refused by its own index check where it has one (5.25: a ValueError "points outside
    # the model directory"), else by the quantizer's (FormatError, a ValueError too)
    for load in (lambda: _load(out), lambda: load_compressed(out, device="cpu", progress=False)):
        with pytest.raises(ValueError, match="outside the (checkpoint|model) directory"):
            load()


def test_load_compressed_advises_what_works_for_a_transformers_model(saved):
    doc = " ".join(load_compressed.__doc__.split())
    assert "Build it on the meta device" not in doc and "inv_freq" in doc
    _, out = saved
    with torch.device("meta"):  # what the docstring warns of: non-persistent buffers are never in a checkpoint
        meta = transformers.AutoModelForCausalLM.from_config(_config(), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"rotary_emb.inv_freq \(buffer\).*still on the meta device"):
        load_compressed(out, meta, device="cpu", progress=False)


@pytest.mark.parametrize("arch", [["GenerationConfig"], ["pipeline"], ["PreTrainedModel"], [5], "LlamaForCausalLM"])
def test_load_compressed_of_a_directory_builds_only_a_model_class_config_json_names(saved, arch):
    # getattr(transformers, architectures[0]): "GenerationConfig" returned a GenerationConfig, its MACs unchecked
    _, out = saved
    _edit_config(out, architectures=arch)
    with pytest.raises(cc.FormatError, match=r"config.json: its \"architectures\" .* names no transformers model "
                                             r"class .*PreTrainedModel"):
        load_compressed(out, progress=False)


def test_a_key_that_is_not_bytes_is_named(saved, tmp_path):
    model, out = saved
    with pytest.raises(TypeError, match="key must be bytes"):
        save_compressed(model, tmp_path / "again", key="secret")  # "string argument without an encoding" before
    with pytest.raises(TypeError, match="key must be bytes"):
        load_compressed(out, _fresh(), key="secret", progress=False)
    assert not (tmp_path / "again").exists()
    # checked when the config is made, as its other fields are (it failed only inside from_pretrained's load)
    with pytest.raises(TypeError, match="quantization_config: key must be bytes"):
        CupycodecConfig(key="secret")
    with pytest.raises(ValueError, match="quantization_config: key must be at least 16 bytes"):
        CupycodecConfig(key=b"short")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_loading_onto_a_cuda_device_that_is_not_there_says_so(saved):
    """It raised an UntrustedError about nvCOMP's decoders (or, trusted, torch's AssertionError)."""
    _, out = saved
    for kw in ({}, {"trusted": True}):
        with pytest.raises(cc.BackendUnavailableError, match="no CUDA device is usable here"):
            load_compressed(out, _fresh(), device="cuda", progress=False, **kw)


def test_a_filter_that_takes_no_layer_says_why_each_was_left(bf16_dir):
    with pytest.raises(ValueError, match=r"chose none of LlamaForCausalLM's Linear layers \(left alone, by reason: "
                                         r"modules_to_convert: 14 \(model\.layers\.0\.self_attn\.q_proj, .*, "
                                         r"\.\.\.\); output head: 1 \(lm_head\)\)"):
        transformers.AutoModelForCausalLM.from_pretrained(
            bf16_dir, quantization_config=CupycodecConfig(mode="int8", modules_to_convert=["lm_head"]))


@pytest.mark.filterwarnings("ignore:.*tied to an embedding")  # compressed on purpose here
@pytest.mark.parametrize("mode", ["lossless", "int8"])
def test_a_compressed_head_tied_again_by_transformers_saves_a_loadable_checkpoint(mode, tmp_path):
    """tie_weights() (resize_token_embeddings calls it) put the embedding back on a compressed head as its weight;
    saved as an alias, it named a tensor the loader refused."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    # from_config in bf16 keeps the rotary buffer in float32, as from_pretrained builds it: the same logits after
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    compress_model(model, mode, filter_fn=lambda m, fqn: True, progress=False)
    model.tie_weights()
    ids = torch.tensor([[1, 17, 33, 5, 99, 64, 2]])

    def logits(m):
        with torch.no_grad():
            return m(ids).logits

    want = logits(model)
    model.save_pretrained(tmp_path / "hf")
    save_compressed(model, tmp_path / "plain")
    assert torch.equal(logits(_load(tmp_path / "hf", device_map={"": "cpu"})), want)  # where it was computed
    assert torch.equal(logits(load_compressed(tmp_path / "plain", device="cpu", progress=False)), want)


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8)).bfloat16().eval()


def test_a_model_cast_after_compressing_is_refused_at_save(tmp_path):
    """.float() after compress_model casts the biases but not the compressed weights' dtype, which the layer table
    records: the checkpoint saved, and no model could load it (its bias was refused as the wrong dtype)."""
    model = _small_net()
    compress_model(model, "lossless", progress=False, filter_fn=lambda m, f: True)
    model.float()
    with pytest.raises(ValueError, match=r"layer '0': its bias is torch.float32 and its compressed weight "
                                         r"torch.bfloat16.*model.to\(torch.bfloat16\)"):
        save_compressed(model, tmp_path / "cast")
    assert not (tmp_path / "cast").exists() or not os.listdir(tmp_path / "cast")
    model.bfloat16()  # cast back, as the message says: saves and loads
    save_compressed(model, tmp_path / "back")
    load_compressed(tmp_path / "back", _small_net(), progress=False)


def test_load_compressed_keeps_the_flags_of_the_layers_it_replaces(tmp_path):
    """Layers installed by load_compressed came in training mode (into a model in eval) with biases that no
    longer required grad, where compress_model keeps both."""
    model = _small_net()
    compress_model(model, "int8", progress=False, filter_fn=lambda m, f: True)
    save_compressed(model, tmp_path / "ck")
    target = _small_net()
    load_compressed(tmp_path / "ck", target, progress=False)
    layers = [m for m in target.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 2 and not any(m.training for m in layers)
    assert all(m.bias.requires_grad for m in layers)


def test_a_second_compress_model_call_leaves_config_json_saying_what_most_layers_are(tmp_path):
    """A second call (the head, another mode) rewrote quantization_config with its mode: save_pretrained's
    config.json said lossless for a model of 14 INT8 layers and one lossless head."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100)).bfloat16().eval()
    compress_model(m, "int8", progress=False)
    compress_model(m, "lossless", progress=False, filter_fn=lambda mod, fqn: fqn == "lm_head")
    m.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert saved["mode"] == "int8"


def _shard_of(out, name):
    for shard in _shards(out):
        with ShardFile(out / shard) as f:
            if name in f.tensors:
                return out / shard
    raise KeyError(name)


def _resign(table):
    """Sign the table again with this test's key: what no attacker can do, so that one check is reached alone."""
    from cupycodec.integrations.torch import _signing
    from cupycodec.integrations.torch.checkpoint import _manifest_text

    table["manifest_mac"] = _signing.mac(_signing.local_key(create=False), b"manifest", _manifest_text(table))


def test_a_signed_checkpoint_binds_names_codes_and_tables(bf16_dir, tmp_path):
    """With the key, a signed checkpoint loaded: INT8 codes negated (their CRC fixed in the table), two layers'
    packed weights swapped with their entries, and the embedding swapped with the head (a bug hunt, 2026-12-04).
    Container MACs covered bytes but not names, and codes and scales had none."""
    model = _compressed(bf16_dir, "int8")
    out = tmp_path / "int8"
    save_compressed(model, out)
    codes = "model.layers.0.self_attn.q_proj.qweight"

    def negate(tensors, table):
        tensors[codes] = -tensors[codes]
        table["tensors"][codes]["crc32"] = cc.backends.cpu.crc32(tensors[codes].numpy().view(np.uint8))

    _rewrite(_shard_of(out, codes), edit_tensors=negate)
    with pytest.raises(cc.AuthenticationError, match="changed after it was signed"):
        load_compressed(out, _fresh(), progress=False)
    _rewrite(_shard_of(out, codes), edit_table=_resign)  # the table passes: the codes' own MAC still fails
    with pytest.raises(cc.AuthenticationError, match=rf"tensor '{codes}'.*MAC mismatch"):
        load_compressed(out, _fresh(), progress=False)

    lossless = _compressed(bf16_dir, "lossless")
    out = tmp_path / "lossless"
    save_compressed(lossless, out)
    a, b = "model.layers.0.mlp.up_proj.packed", "model.layers.1.mlp.up_proj.packed"
    c, d = "model.embed_tokens.weight", "lm_head.weight"

    def swap(x, y):
        def edit(tensors, table):
            tensors[x], tensors[y] = tensors[y], tensors[x]
            table["tensors"][x], table["tensors"][y] = table["tensors"][y], table["tensors"][x]
        return edit

    for x, y in ((a, b), (c, d)):
        fresh = tmp_path / f"swap-{x}"
        shutil.copytree(out, fresh)
        assert _shard_of(fresh, x) == _shard_of(fresh, y)  # one shard: both move in one rewrite
        _rewrite(_shard_of(fresh, x), edit_tensors=swap(x, y))
        with pytest.raises(cc.AuthenticationError, match=rf"tensor '({re.escape(x)}|{re.escape(y)})'"):
            load_compressed(fresh, _fresh(), progress=False)
    assert torch.equal(_logits(load_compressed(out, _fresh(), progress=False)), _logits(lossless))


def test_a_checkpoint_signed_before_the_manifest_asks_to_be_saved_again(saved):
    _, out = saved
    _rewrite(out / _shards(out)[0], edit_table=lambda t: t.pop("manifest_mac"))
    with pytest.raises(cc.AuthenticationError, match="its table is not.*save it again.*trusted=True"):
        load_compressed(out, _fresh(), progress=False)


def test_a_head_sharing_the_embedding_untied_in_config_reloads_through_every_loader(bf16_dir, tmp_path):
    """save_pretrained stored the shared head once, as an alias; from_pretrained (and load_compressed(dir)) never
    applied aliases, so the head kept its fresh initialization, even with strict=True."""
    model = _load(bf16_dir)  # (as loaded: a model cast with .to() has its rotary buffer in bf16 too)
    model.lm_head.weight = model.model.embed_tokens.weight  # shared, while config.json says untied
    compress_model(model, "lossless", progress=False)
    want = _logits(model)
    model.save_pretrained(tmp_path / "hf")
    assert _table(tmp_path / "hf" / "model.safetensors")["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    # on the CPU, where want was computed (a GPU host loads onto CUDA by default, and sums in another order)
    assert torch.equal(_logits(_load(tmp_path / "hf", device_map="cpu")), want)
    assert torch.equal(_logits(load_compressed(tmp_path / "hf", device="cpu", progress=False)), want)


def test_an_alias_to_a_tensor_of_another_shape_or_kind_is_refused(bf16_dir, tmp_path):
    """An alias was checked for its source's existence only: a layer's codes could alias another layer's of
    another shape, or a norm a vector of another length, and load (trusted) into a model that failed at forward."""
    model = _compressed(bf16_dir, "int8")
    out = tmp_path / "int8"
    save_compressed(model, out, key=False)
    cases = {
        "model.layers.0.mlp.down_proj.qweight": "model.layers.0.mlp.up_proj.qweight",  # 64x128 for 128x64
        "model.norm.weight": "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.scale": "model.layers.0.self_attn.q_proj.qweight",
    }
    for alias, src in cases.items():
        fresh = tmp_path / alias
        shutil.copytree(out, fresh)

        def edit(tensors, table, alias=alias, src=src):
            tensors.pop(alias)
            table["tensors"].pop(alias)
            table["aliases"][alias] = src

        _rewrite(_shard_of(fresh, alias), edit_tensors=edit)
        with pytest.raises(cc.FormatError, match=rf"alias '{re.escape(alias)}' -> '{re.escape(src)}'"):
            load_compressed(fresh, _fresh(), trusted=True, progress=False)


def _sequential_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


@pytest.mark.parametrize("edit, why", [
    (lambda t: t["aliases"].update({"2.bias": ["0.bias"]}), r"alias '2.bias' -> \['0.bias'\]"),
    (lambda t: t["aliases"].update({"2.bias": 5}), "alias '2.bias' -> 5"),
    (lambda t: t["aliases"].update({"2.bias": "0.bias"}), "alias '2.bias' -> '0.bias'.* stored itself"),
    (lambda t: t["aliases"].update({"0.bias": "0.bias"}), "alias '0.bias' -> '0.bias'"),
    (lambda t: t["aliases"].update({"2.bias": "9.bias"}), "alias '2.bias' -> '9.bias'"),
    (lambda t: t["layers"]["0"].update(in_features=10**30), "layer '0': .*sizes must be integers from 0"),
    (lambda t: t["layers"]["0"].update(out_features=-16), "layer '0': .*sizes must be integers from 0"),
    (lambda t: t["layers"]["0"].update(group_size=0), "layer '0': .*group_size"),
    (lambda t: t["layers"]["0"].update(dtype=["F32"]), r"layer '0': .*dtype must be a name .*\['F32'\]"),
    (lambda t: t["layers"]["0"].update(dtype="I8"), "layer '0': .*dtype"),
], ids=["alias-list", "alias-int", "alias-stored-too", "alias-itself", "alias-to-nothing", "huge-in-features",
        "negative-out-features", "zero-group-size", "dtype-list", "dtype-int"])
def test_a_crafted_table_of_aliases_or_layers_is_a_format_error(tmp_path, edit, why):
    # KeyError, TypeError (unhashable, torch's overflow) escaped, or a key both stored and aliased skipped its checks
    model = _sequential_net()
    compress_model(model, "int8", progress=False)
    out = tmp_path / "ckpt"
    save_compressed(model, out, key=False)
    _rewrite(out / "model.safetensors", edit_table=edit)
    with pytest.raises(cc.FormatError, match=why):
        load_compressed(out, _sequential_net(), trusted=True, progress=False)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")  # nn.Linear(0, 8)
@pytest.mark.parametrize("mode", ["lossless", "int8"])
@pytest.mark.parametrize("shape, granularity", [((0, 8), "channel"), ((8, 0), "channel"), ((0, 8), "group"),
                                                ((8, 0), "group")])
def test_a_layer_of_zero_features_saves_and_loads(tmp_path, mode, shape, granularity):
    # the constructor takes 0 "as for nn.Linear" and compress_model compresses such a layer, but from_config refused
    # it; INT8 layers of no outputs, or in groups, then failed torch's byte view of their empty scales
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(*shape))

    model = build()
    compress_model(model, mode, granularity=granularity, progress=False)
    assert isinstance(model[1], CompressedLinear)
    save_compressed(model, tmp_path / "ckpt")
    back = load_compressed(tmp_path / "ckpt", build(), progress=False)
    x = torch.randn(2, shape[0])
    assert isinstance(back[1], CompressedLinear) and torch.equal(back[1](x), model[1](x))
    assert CompressedLinear.from_config(model[1].config()).in_features == shape[0]


@pytest.mark.parametrize("mode", ["lossless", "int8"])
def test_a_t5_checkpoint_reloads(tmp_path, mode):
    """T5's _init_weights writes module.q.weight (and its kind: CLIP, GPT-2, ...): a compressed layer has no weight,
    so reloading a saved T5 raised AttributeError in from_pretrained and load_compressed(dir)."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "base", quantization_config=CupycodecConfig(mode=mode), device_map="cpu").eval()
    ids = IDS[:, :6]

    def logits(m):
        x = ids.to(next(m.parameters()).device)
        with torch.no_grad():
            return m(input_ids=x, decoder_input_ids=x[:, :4]).logits.cpu()

    want = logits(model)
    model.save_pretrained(tmp_path / "saved")
    for again in (transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved", device_map="cpu"),
                  load_compressed(tmp_path / "saved", device="cpu", progress=False)):
        assert torch.equal(logits(again.eval()), want)
        assert not any("weight" in m.__dict__ for m in again.modules() if isinstance(m, CompressedLinear))


def test_a_model_whose_keys_transformers_renames_on_save_reloads(tmp_path):
    """save_pretrained renamed GPT-NeoX's lm_head.weight to embed_out.weight in the files (its original format)
    after the table was written under the model's names: no loader could read the checkpoint."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = _load(tmp_path / "base", quantization_config=CupycodecConfig(mode="int8"), device_map="cpu")
    want = _logits(model)
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(_load(tmp_path / "saved", device_map="cpu")), want)
    assert torch.equal(_logits(load_compressed(tmp_path / "saved", device="cpu", progress=False)), want)


def test_save_pretrained_with_a_variant_is_refused_before_writing(bf16_dir, tmp_path):
    """variant="int8" wrote model.int8.safetensors, which neither from_pretrained(variant=...) nor
    load_compressed could read back."""
    model = _compressed(bf16_dir, "int8")
    with pytest.raises(ValueError, match=r"variant='int8'.*model.int8.safetensors.*save without variant"):
        model.save_pretrained(tmp_path / "v", variant="int8")
    assert not (tmp_path / "v").exists() or not [n for n in os.listdir(tmp_path / "v") if "safetensors" in n]


# --- compress-while-loading from a checkpoint that disagrees with its config (a bug hunt, 2026-12-04) ------------

def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


@pytest.mark.parametrize("mode", ["int8", "lossless"])
def test_compress_while_loading_refuses_layers_the_checkpoint_lacks(bf16_dir, tmp_path, mode):
    """config.json with a layer more than the checkpoint: its layers held uninitialized memory (int8: garbage
    scales, non-finite logits, saved as they were)."""
    d = _copy_with_config(bf16_dir, tmp_path / "more", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"holds no weight for model\.layers\.2\..*needs every weight"):
        _load(d, quantization_config=CupycodecConfig(mode=mode))


@pytest.mark.parametrize("mode", ["int8", "lossless"])
def test_compress_while_loading_checks_weight_shapes_against_the_config(bf16_dir, tmp_path, mode):
    d = _copy_with_config(bf16_dir, tmp_path / "narrow", intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj.: the checkpoint.s weight has shape \[\d+, \d+\]; .* expects \[(96, 64|64, 96)\]"):
        _load(d, quantization_config=CupycodecConfig(mode=mode))


@pytest.mark.parametrize("mode", ["int8", "lossless"])
def test_compress_while_loading_zeroes_missing_biases_and_keeps_stored_ones(tmp_path, mode):
    """A config with biases the checkpoint lacks: plain transformers zeroes them; ours held uninitialized memory
    (|bias| up to 2.6e38). Biases the checkpoint holds must come through unchanged."""
    torch.manual_seed(0)
    with_bias = transformers.LlamaForCausalLM(_config(attention_bias=True)).to(torch.bfloat16)
    with torch.no_grad():
        for m in with_bias.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_()
    with_bias.save_pretrained(tmp_path / "biased")
    loaded = _load(str(tmp_path / "biased"), quantization_config=CupycodecConfig(mode=mode))
    stored = {n: p for n, p in with_bias.named_parameters() if n.endswith(".bias")}
    assert stored and all(torch.equal(loaded.get_parameter(n), p) for n, p in stored.items())
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_config()).to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    d = _copy_with_config(tmp_path / "plain", tmp_path / "wants_bias", attention_bias=True)
    model = _load(d, quantization_config=CupycodecConfig(mode=mode))
    biases = [m.bias for m in model.modules() if isinstance(m, CompressedLinear) and m.bias is not None]
    assert biases and all(not b.any() for b in biases)
    assert torch.isfinite(_logits(model)).all()


@pytest.mark.parametrize("max_shard_size", [None, "40KB"])
def test_a_save_pretrained_that_fails_leaves_the_checkpoint_it_was_replacing(bf16_dir, tmp_path, max_shard_size):
    """The earlier save's files were removed before transformers wrote anything: an invalid generation config (or a
    read-only config.json, a full disk) then lost the checkpoint."""
    a = _compressed(bf16_dir, "int8")
    want = _logits(a)
    out = tmp_path / "hf"
    a.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    before = sorted(os.listdir(out))
    b = _compressed(bf16_dir, "lossless")
    b.generation_config.max_new_tokens = -5  # transformers refuses it after the quantizer's state dict
    with pytest.raises(ValueError, match="max_new_tokens"):
        b.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    assert sorted(os.listdir(out)) == before
    assert torch.equal(_logits(_load(out)), want)


def test_save_pretrained_refuses_a_state_dict_it_would_not_write(bf16_dir, tmp_path):
    model = _compressed(bf16_dir, "int8")
    with pytest.raises(ValueError, match=r"save_pretrained\(state_dict=...\)"):
        model.save_pretrained(tmp_path / "x", state_dict=model.state_dict())
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")


def test_a_dict_quantization_config_warns_of_keys_it_drops(bf16_dir):
    """A typo in a dict config gave int8 silently, and trusted/strict in a dict were dropped without a word."""
    with pytest.warns(UserWarning, match="'mdoe' ignored .*a typo"):
        model = _load(bf16_dir, quantization_config={"quant_method": "cupycodec", "mdoe": "lossless"})
    assert {m.mode for m in model.modules() if isinstance(m, CompressedLinear)} == {"int8"}
    with pytest.warns(UserWarning, match="'trusted' ignored .*pass CupycodecConfig"):
        CupycodecConfig.from_dict({"quant_method": "cupycodec", "mode": "int8", "trusted": True})


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_compress_checkpoint_refuses_an_output_that_links_to_its_input(bf16_dir, tmp_path):
    """A link to the input passed the name check, and the original weights were replaced by INT8 ones."""
    from cupycodec.integrations.torch import compress_checkpoint

    src = shutil.copytree(bf16_dir, tmp_path / "model")
    before = (src / "model.safetensors").read_bytes()
    os.symlink(src, tmp_path / "out")
    with pytest.raises(ValueError, match="give an output other than the input"):
        compress_checkpoint(src, tmp_path / "out", mode="int8", progress=False)
    assert (src / "model.safetensors").read_bytes() == before


def test_a_model_from_an_untrusted_checkpoint_is_saved_unsigned(bf16_dir, tmp_path, monkeypatch):
    """Its payloads were signed with this user's key on save, so the copy loaded as trusted: nobody had vouched
    for them, and trust makes them eligible for nvCOMP's unhardened decoders."""
    model = _compressed(bf16_dir, "lossless")
    model.save_pretrained(tmp_path / "theirs")
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "other" / "signing.key"))  # another user
    theirs = _load(str(tmp_path / "theirs"), device_map="cpu")
    assert not any(m._template.trusted for m in theirs.modules() if isinstance(m, CompressedLinear))
    with pytest.warns(UserWarning, match="came from an untrusted checkpoint: this checkpoint is saved unsigned"):
        theirs.save_pretrained(tmp_path / "copy")
    assert _table(tmp_path / "copy" / "model.safetensors")["signed_by"] is None
    again = _load(str(tmp_path / "copy"), device_map="cpu")
    assert not any(m._template.trusted for m in again.modules() if isinstance(m, CompressedLinear))
    assert torch.equal(_logits(again), _logits(model))


@pytest.mark.parametrize("bad", ["1", 1.0, None, True, 0, -1])
def test_a_format_version_that_is_no_version_is_refused_as_such(bad):
    with pytest.raises(ValueError, match="format_version must be an int of at least 1"):
        CupycodecConfig(format_version=bad)


def test_a_key_file_that_is_a_fifo_is_refused_at_once(tmp_path, monkeypatch):
    # opening it waited for a writer forever: save_compressed / load_compressed hung
    import threading

    from cupycodec.integrations.torch import _signing

    fifo = tmp_path / "signing.key"
    os.mkfifo(fifo)
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(fifo))
    got = []
    t = threading.Thread(target=lambda: got.append(_signing.local_key(create=True)), daemon=True)
    with pytest.warns(UserWarning, match="not a regular file"):
        t.start()
        t.join(10)
    assert not t.is_alive() and got == [None]


_LOAD_AT_EXIT = """
import atexit, sys, torch
from cupycodec.integrations.torch import compress_model, load_compressed, save_compressed

def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))

model = net()
compress_model(model, sys.argv[2], progress=False)
save_compressed(model, sys.argv[1])
x = torch.randn(2, 256)
with torch.no_grad():
    want = model(x)

def at_exit():
    back = load_compressed(sys.argv[1], net(), device="cpu", progress=False)
    with torch.no_grad():
        print(torch.equal(back(x), want))

atexit.register(at_exit)
"""


@pytest.mark.parametrize("mode", ["lossless", "int8"])
def test_a_checkpoint_loads_in_an_atexit_handler(tmp_path, mode):
    # the load's check pool is made per load: at exit Python refuses it work ("cannot schedule new futures after
    # interpreter shutdown"), and the checks now run in the calling thread
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _LOAD_AT_EXIT, str(tmp_path / "ck"), mode], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "True\n", proc.stderr


@pytest.mark.parametrize("device_map", ["auto", "balanced", "sequential", {"": 0}, None])
def test_a_named_device_map_on_a_gpu_machine_is_decided_as_the_gpu_before_loading(bf16_dir, tmp_path, monkeypatch,
                                                                                   device_map):
    # transformers resolves "auto" (and the other named maps) after the quantizer's preprocess_model, onto the GPUs
    # first: the load's device was decided as the CPU there, so an untrusted checkpoint skipped the refusal that GPU
    # payloads get before anything is read, and the GPU CRC pass was off. Stopped at that decision, on a machine
    # made to look as if it had CUDA.
    from cupycodec.integrations.torch import hf

    out = tmp_path / "hf"
    _compressed(bf16_dir, "lossless").save_pretrained(out)
    seen = []

    def decided(ckpt, model, device, trusted, strict):
        seen.append(torch.device(device).type)
        raise KeyboardInterrupt  # nothing more is needed, and no CUDA call follows

    monkeypatch.setattr(hf, "_plan", decided)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kwargs = {} if device_map is None else {"device_map": device_map}
    with pytest.raises(KeyboardInterrupt):
        _load(out, **kwargs)
    assert seen == ["cpu" if device_map is None else "cuda"]


def test_a_checkpoint_loaded_into_a_transformers_model_saves_and_dequantizes(bf16_dir, tmp_path):
    # load_compressed(dir, model) did not attach the quantizer: save_pretrained wrote the compressed buffers without
    # a quantization_config, and the checkpoint reloaded with random Linear weights; dequantize() was refused
    a = _compressed(bf16_dir, "int8")
    save_compressed(a, tmp_path / "c")
    model = load_compressed(tmp_path / "c", _fresh(), device="cpu", progress=False)
    want = _logits(model)
    model.save_pretrained(tmp_path / "hf")
    assert torch.equal(_logits(_load(tmp_path / "hf", device_map="cpu")), want)
    model.dequantize()
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())


def test_dequantize_after_save_pretrained_and_in_the_dtype_the_model_computes_in(bf16_dir, tmp_path):
    # transformers' dequantize passes model.config.dtype: a string after save_pretrained ("Invalid device string"),
    # and stale after .to() (weights came back bf16 in a float32 model, whose next forward raised)
    model = _compressed(bf16_dir, "lossless")
    model.save_pretrained(tmp_path / "hf")
    assert isinstance(model.config.dtype, str) or model.config.dtype is not None
    model.to(torch.float32)
    want = _logits(model)
    model.dequantize()
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert torch.equal(_logits(model), want)
    other = _compressed(bf16_dir, "int8")
    with pytest.raises(ValueError, match=r"dequantize\(dtype=torch.int8\): give a floating-point torch dtype"):
        other.dequantize(dtype=torch.int8)
    assert any(isinstance(m, CompressedLinear) for m in other.modules())


def test_invalid_patterns_and_strict_when_compressing_while_loading_are_refused(bf16_dir):
    # an invalid modules_to_not_convert regex raised re.error mid-load; strict=True was silently ignored
    import cupycodec.integrations  # noqa: F401  (registers the quantizer)
    from cupycodec.integrations.torch import CupycodecConfig

    with pytest.raises(ValueError, match=r"modules_to_not_convert pattern '\['"):
        CupycodecConfig(modules_to_not_convert=["["])
    with pytest.raises(ValueError, match=r"strict=True\) refuses compressed checkpoints.*output_loading_info"):
        _load(bf16_dir, quantization_config=CupycodecConfig(mode="int8", strict=True))


def test_a_base_model_class_on_a_checkpoint_with_a_head_names_the_class_to_load(bf16_dir, tmp_path):
    # AutoModel (the base class) on a compressed LlamaForCausalLM checkpoint said only "layer ... is not in this
    # LlamaModel"; transformers strips the prefix for plain weights, and this reader names the class instead
    _compressed(bf16_dir, "int8").save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"is not in this LlamaModel; the checkpoint was saved from a "
                                         r"LlamaForCausalLM.*transformers.LlamaForCausalLM.from_pretrained.*\.model "):
        transformers.AutoModel.from_pretrained(tmp_path / "hf")


def test_compress_model_into_a_folder_of_its_input_copies_nothing_of_its_own_output(bf16_dir, tmp_path):
    # the other files were listed after the output was written, so an output inside the input got its own
    # config.json copied into OUTPUT/<name>/, one folder deeper each run
    from cupycodec.__main__ import main

    shutil.copytree(bf16_dir, tmp_path / "in")
    (tmp_path / "in" / "tokenizer.json").write_text("{}")
    assert main(["compress-model", str(tmp_path / "in"), str(tmp_path / "in" / "int8"), "--mode", "int8",
                 "--quiet"]) == 0
    out = tmp_path / "in" / "int8"
    assert not (out / "int8").exists() and (out / "tokenizer.json").read_text() == "{}"
    assert any(isinstance(m, CompressedLinear) for m in _load(out, device_map="cpu").modules())
