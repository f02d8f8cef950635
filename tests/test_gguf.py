"""Any llama-family GGUF file, on small files with random weights that the tests write
(testbed/model/gguf_synth.py; nothing is downloaded): the spec from the metadata, the tensors
against the gguf library's dequantisation, the cost model against the live tensors, Qwen2's
Q/K re-ordering against rotation by halves, the tokenizers, one-line errors for broken files,
`model: {gguf: PATH}` and `--model-gguf` in scenarios, and, for every variant x tensor type,
partitioned generation with migrations against the monolithic reference. The comparison
with an independent implementation (transformers) is tests/test_gguf_crosscheck.py.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf reader is not installed (pip install -e '.[gguf]')")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install -e '.[gguf]')")

import gguf  # noqa: E402

from runners import run as cli  # noqa: E402
from testbed.experiments import run as experiment  # noqa: E402
from testbed.model import cost  # noqa: E402
from testbed.model.blocks import HeadBlock, Reference, rope  # noqa: E402
from testbed.model.gguf_file import GGUFError, open_gguf, spec_from_gguf  # noqa: E402
from testbed.model.gguf_synth import READ_ONLY, WRITABLE, Synth, llama3_rope_freqs  # noqa: E402
from testbed.model.gguf_weights import GGUFWeights  # noqa: E402
from testbed.model.tokenizer import load_tokenizer  # noqa: E402
from testbed.model.weights import weights_for  # noqa: E402
from testbed.scenario import ScenarioError, load, parse  # noqa: E402

from .conftest import GGUF_VARIANTS, read_json  # noqa: E402
from .test_smollm2_partitioned import check_partitioned_run, scripted_plans  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TYPES = WRITABLE + READ_ONLY
VARIANTS = list(GGUF_VARIANTS)
PROMPT = "The capital of France is"
SENTENCES = [
    PROMPT,
    "Hello, world! It's 2024 and I've got 3.14159 apples.",
    "  Two leading spaces,\ttabs,\n\nand blank lines  \n",
    "naïve café – “quotes” 日本語 😀 e-mail@example.com",
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> None:
    torch.set_num_threads(experiment.TORCH_THREADS)


def scenario(model: dict[str, Any], new_tokens: int = 7, interval: int = 2,
             shares: tuple[float, ...] = (0.5, 0.45, 0.4, 0.3)) -> dict[str, Any]:
    """Four devices sized as shares of the model (by default none holds it alone)."""
    names = ["src", "a", "b", "c"]
    return {
        "version": 1, "name": "gguf_test", "seed": 0, "model": model,
        "generation": {"prompt": PROMPT, "new_tokens": new_tokens},
        "devices": [{"name": n, "compute_gflops": 4.0, "memory_share": s}
                    for n, s in zip(names, shares, strict=True)],
        "source": "src",
        "network": {"default": {"bandwidth_mbps": 100, "latency_ms": 0.5}},
        "controller": {"algorithm": "resource_aware", "interval_tokens": interval, "telemetry": "oracle"},
    }


# ---------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("variant", VARIANTS)
def test_spec_comes_from_the_metadata(variant: str, synth_gguf: Any) -> None:
    path = synth_gguf(variant, "F16")
    s = Synth(**GGUF_VARIANTS[variant])
    spec = spec_from_gguf(path)
    assert (spec.layers, spec.heads, spec.kv_heads, spec.d_model, spec.d_ff, spec.context) == (
        s.layers, s.heads, s.kv_heads, s.d_model, s.d_ff, s.context)
    assert spec.rope_base == s.rope_base and spec.norm_eps == pytest.approx(s.norm_eps, rel=1e-6)
    assert spec.vocab == open_gguf(path).count("tokenizer.ggml.tokens") == load_tokenizer(path).vocab_size
    assert (spec.attn_bias, spec.proj_bias, spec.tied_head) == (s.arch == "qwen2", False, s.tied)
    if s.llama3_rope:
        want = llama3_rope_freqs(s.d_head, s.rope_base)
        assert spec.rope_freqs == pytest.approx(want, rel=1e-6) and max(want) == 8.0 and min(want) == 1.0
    else:
        assert spec.rope_freqs == ()
    assert (spec.weights, spec.gguf, spec.name) == ("gguf", str(path.resolve()), path.stem)
    assert (spec.norm, spec.mlp, spec.positions, spec.dtype) == ("rmsnorm", "swiglu", "rope", "float32")


@pytest.mark.parametrize("variant", VARIANTS)
def test_cost_model_matches_tensors(variant: str, synth_gguf: Any) -> None:
    """Bytes of every kind of block and of the source equal the live tensors: Qwen2's Q/K/V
    biases and an untied LM head included."""
    spec = spec_from_gguf(synth_gguf(variant, "Q8_0"))
    w = weights_for(spec)
    head = HeadBlock.create(spec, w.block(f"head.1.{spec.groups - 1}"))
    assert cost.weight_bytes(spec, "head") == sum(t.nbytes for t in head.w.values())
    assert ("bqkv" in head.w) == (variant == "qwen2")
    assert cost.weight_bytes(spec, "proj") == sum(t.nbytes for t in w.block("proj.0").values())
    assert cost.weight_bytes(spec, "ffn") == sum(t.nbytes for t in w.block("ffn.1").values())
    source = w.source()
    assert cost.source_weight_bytes(spec) == sum(t.nbytes for t in source.values())
    assert ("wout" in source) == (variant == "tinyllama")


@pytest.mark.parametrize("qtype", TYPES)
def test_rows_equal_the_library_dequantisation(qtype: str, synth_gguf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block tensors, read by row ranges in small chunks, are the gguf library's
    dequantisation of the whole tensor (its reference values, for the read-only k-quants
    too) sliced as the mapping says."""
    from gguf.quants import dequantize

    from testbed.model import gguf_file

    monkeypatch.setattr(gguf_file, "CHUNK_ELEMS", 3 * 256)  # several chunks per tensor
    path = synth_gguf("llama", qtype)
    spec = spec_from_gguf(path)
    w = GGUFWeights(spec)
    reader = gguf.GGUFReader(str(path))
    full = {}
    for t in reader.tensors:
        full[t.name] = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(
            tuple(reversed(t.shape.tolist()))).copy())
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.attn_q.weight"] == types["token_embd.weight"] == qtype
    qd, d = spec.q_per_group * spec.d_head, spec.d_head
    for g in range(spec.groups):
        blk = w.block(f"head.1.{g}")
        assert torch.equal(blk["wq"], full["blk.1.attn_q.weight"][g * qd:(g + 1) * qd])
        assert torch.equal(blk["wk"], full["blk.1.attn_k.weight"][g * d:(g + 1) * d])
        assert torch.equal(blk["wv"], full["blk.1.attn_v.weight"][g * d:(g + 1) * d])
        assert torch.equal(blk["norm.w"], full["blk.1.attn_norm.weight"])
    assert torch.equal(w.block("ffn.0")["wd"], full["blk.0.ffn_down.weight"])
    assert torch.equal(w.source()["wte"], full["token_embd.weight"])
    assert torch.isfinite(full["token_embd.weight"]).all() and full["token_embd.weight"].std() > 0


def test_qwen2_rows_are_reordered_for_interleaved_rope(synth_gguf: Any) -> None:
    """Qwen2 files rotate (i, i + d/2); our blocks rotate (2i, 2i + 1). After the re-ordering
    on load, every query-key score equals the one Hugging Face's rotate-by-halves RoPE gives
    on the file's own rows (biases included), at several positions."""
    path = synth_gguf("qwen2", "F32")
    spec = spec_from_gguf(path)
    g = open_gguf(path)
    wq, bq = torch.from_numpy(g.array("blk.0.attn_q.weight")), torch.from_numpy(g.array("blk.0.attn_q.bias"))
    wk, bk = torch.from_numpy(g.array("blk.0.attn_k.weight")), torch.from_numpy(g.array("blk.0.attn_k.bias"))
    d, base = spec.d_head, spec.rope_base

    def halves(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x [T, d]
        inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        ang = pos[:, None].float() * inv[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        rot = torch.cat([-x[:, d // 2:], x[:, : d // 2]], -1)
        return x * cos + rot * sin

    x = torch.randn(5, spec.d_model, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([0, 1, 7, 100, 3000])
    blk = GGUFWeights(spec).block("head.0.0")
    ours_q = torch.stack([rope((x[i] @ blk["wq"].T + blk["bq"]).view(1, -1, d), int(p), base)[0]
                          for i, p in enumerate(pos)])
    ours_k = torch.stack([rope((x[i] @ blk["wk"].T + blk["bk"]).view(1, 1, d), int(p), base)[0, 0]
                          for i, p in enumerate(pos)])
    theirs_q = halves((x @ wq[:d].T + bq[:d]), pos)  # query head 0 of group 0
    theirs_k = halves((x @ wk[:d].T + bk[:d]), pos)
    assert not torch.allclose(blk["wq"][:d], wq[:d])  # the rows did move
    # float32 angles at position 3000 differ in their last bits between the two formulas;
    # a wrong row order would differ by the size of the scores themselves (about 1)
    scores = theirs_q @ theirs_k.T
    assert scores.abs().max() > 0.5
    torch.testing.assert_close(ours_q[:, 0] @ ours_k.T, scores, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------- partitioned runs


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_partitioned_generation_equals_monolithic(variant: str, qtype: str, synth_gguf: Any,
                                                  tmp_path: Path) -> None:
    """`model: {gguf: PATH}` over four devices sized from the file, with a random placement
    and random migrations (K/V groups with their caches among them) at every decision
    epoch: the tokens equal the monolithic reference's, the logits within 1e-4."""
    path = synth_gguf(variant, qtype)
    # random placements ignore memory: every device can hold the whole model
    scen = parse(scenario({"gguf": str(path)}, shares=(1.2,) * 4), "<test>")
    assert scen.model == spec_from_gguf(path)
    prep = experiment.prepare(scen)
    assert prep.prompt == load_tokenizer(path).encode(PROMPT) and len(prep.prompt) >= 5
    plans = scripted_plans(prep.model, 4, epochs=3, seed=TYPES.index(qtype), moves=4)
    summary = check_partitioned_run(prep, plans, tmp_path / "run")
    assert summary["generated_text"] == load_tokenizer(path).decode(prep.ref_ids)
    assert len(set(prep.ref_ids)) > 1  # a random model that emits varied tokens


def test_reference_follows_rope_freqs(synth_gguf: Any) -> None:
    """The Llama 3 file's rope_freqs change the outputs (so the cross-checks see them)."""
    spec = spec_from_gguf(synth_gguf("llama3", "F32"))
    ids = list(range(3, 40))
    _, with_freqs = Reference(GGUFWeights(spec)).generate(ids, 3)

    class Plain:  # the same tensors under a spec without the factors
        def __init__(self, inner: GGUFWeights) -> None:
            self.inner, self.spec = inner, spec.with_overrides(rope_freqs=())

        def block(self, name: str) -> Any:
            return self.inner.block(name)

        def source(self) -> Any:
            return self.inner.source()

    _, without = Reference(Plain(GGUFWeights(spec))).generate(ids, 3)
    assert (with_freqs - without).abs().max() > 1e-3


# ---------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_round_trip(variant: str, text: str, synth_gguf: Any) -> None:
    tok = load_tokenizer(synth_gguf(variant, "Q4_0"))
    ids = tok.encode(text, add_bos=False)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_special_tokens_and_bos(variant: str, synth_gguf: Any) -> None:
    tok = load_tokenizer(synth_gguf(variant, "Q4_0"))
    assert tok.add_bos == (variant in ("llama3", "tinyllama"))
    assert (tok.encode("Paris")[0] == tok.bos_id) == tok.add_bos
    eos = tok.tokens[tok.eos_id]
    ids = tok.encode(f"Paris{eos}Rome", add_bos=False)
    assert tok.eos_id in ids and tok.decode(ids, skip_special=True).replace(" ", "") == "ParisRome"
    assert tok.eos_id not in tok.encode(eos, special=False)


def test_pre_tokenizers_split_digits_as_each_family_does(synth_gguf: Any) -> None:
    text = "In 2024, 12345 apples"
    assert load_tokenizer(synth_gguf("llama", "F32")).pretokenize(text) == [
        "In", " ", "2", "0", "2", "4", ",", " ", "1", "2", "3", "4", "5", " apples"]
    assert load_tokenizer(synth_gguf("llama3", "F32")).pretokenize(text) == [
        "In", " ", "202", "4", ",", " ", "123", "45", " apples"]
    assert load_tokenizer(synth_gguf("qwen2", "F32")).pretokenize(text) == [
        "In", " ", "2", "0", "2", "4", ",", " ", "1", "2", "3", "4", "5", " apples"]
    assert load_tokenizer(synth_gguf("qwen2", "F32")).pretokenize("It's IT'S") == ["It", "'s", " IT", "'S"]


# ---------------------------------------------------------------------------- broken files


def _edited(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of src with some metadata or tensor info changed in place (same byte size)."""
    shutil.copy(src, dst)
    r = gguf.GGUFReader(str(dst), "r+")
    edit(r)
    r.data.flush()
    return dst


def _set_int(key: str, value: int) -> Any:
    return lambda r: r.fields[key].parts[-1].__setitem__(0, value)


def _set_arch(r: Any) -> None:
    f = r.fields["general.architecture"]
    f.parts[-1][:] = list(b"gemma")


def _set_type(name: str, qtype: str) -> Any:
    def edit(r: Any) -> None:
        t = next(t for t in r.tensors if t.name == name)
        t.field.parts[4][0] = int(gguf.GGMLQuantizationType[qtype])
    return edit


@pytest.mark.parametrize("case,edit,message", [
    ("layers", _set_int("llama.block_count", 3), "tensor 'blk.2.attn_norm.weight': missing"),
    ("ffn", _set_int("llama.feed_forward_length", 1024),
     "tensor 'blk.0.ffn_gate.weight': shape [512, 256], the metadata implies [1024, 256]"),
    ("width", _set_int("llama.embedding_length", 512), "llama.rope.dimension_count: 64, but this testbed "
     "needs the whole head (embedding_length / head_count = 128)"),
    ("heads", _set_int("llama.attention.head_count", 3), "llama.attention.head_count: 3 heads and 2 K/V "
     "heads do not divide embedding_length 256 into equal groups"),
    ("arch", _set_arch, "general.architecture: 'gemma' is not supported (supported: llama, qwen2)"),
    ("type", _set_type("blk.0.ffn_up.weight", "IQ4_NL"), "tensor 'blk.0.ffn_up.weight': type IQ4_NL is not supported"),
])
def test_broken_files_name_the_problem(case: str, edit: Any, message: str, synth_gguf: Any, tmp_path: Path) -> None:
    bad = _edited(synth_gguf("llama", "Q4_0"), tmp_path / f"{case}.gguf", edit)
    with pytest.raises(GGUFError) as info:
        spec_from_gguf(bad)
    assert str(info.value).startswith(f"{bad}: {message}") and "\n" not in str(info.value)


def test_not_gguf_truncated_and_missing(synth_gguf: Any, tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("version: 1\n")
    with pytest.raises(GGUFError, match=r"notes.gguf: not a GGUF file \(bad magic\)$"):
        spec_from_gguf(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(synth_gguf("llama", "Q4_0").read_bytes()[:3000])
    with pytest.raises(GGUFError, match=r"cut.gguf: metadata '[a-z.]+': .*(does not fit|past the end|ends inside)"):
        spec_from_gguf(cut)
    with pytest.raises(GGUFError, match="nowhere.gguf: no such file"):
        spec_from_gguf(tmp_path / "nowhere.gguf")


def _set_array_count(key: str, count: int) -> Any:
    return lambda r: r.fields[key].parts[4].__setitem__(0, count)  # [klen, key, type, item type, count]


def _set_offset(name: str, offset: Any) -> Any:
    def edit(r: Any) -> None:
        t = next(t for t in r.tensors if t.name == name)
        t.field.parts[5][0] = offset(r) if callable(offset) else offset
    return edit


def _set_dim(name: str, dim: int, value: int) -> Any:
    def edit(r: Any) -> None:
        next(t for t in r.tensors if t.name == name).field.parts[3][dim] = value
    return edit


def _hostile_files(src: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, the one line spec_from_gguf must give) for files that hung the reader,
    grew without bound, printed a traceback or ran on wrapped-around weights."""
    out: dict[str, tuple[Path, str]] = {}

    def edited(name: str, edit: Any, message: str) -> None:
        out[name] = (_edited(src, folder / f"{name}.gguf", edit), message)

    # the reader looped 2^62 times on empty reads past the end (numbers), or failed (strings)
    edited("count", _set_array_count("tokenizer.ggml.token_type", 2**62),
           "metadata 'tokenizer.ggml.token_type': array of 4611686018427387904 items exceeds the limit of 16777216")
    edited("strcount", _set_array_count("tokenizer.ggml.tokens", 2**62),
           "metadata 'tokenizer.ggml.tokens': array of 4611686018427387904 items exceeds the limit of 16777216")
    edited("fitcount", _set_array_count("tokenizer.ggml.tokens", 2**23),
           "metadata 'tokenizer.ggml.tokens': array of 8388608 string items does not fit in the ")
    edited("wrap", _set_offset("output_norm.weight", 2**64 - 1),
           "tensor 'output_norm.weight': offset 18446744073709551615 is not a multiple of the alignment 32")
    # aligned, and start + offset wraps to 0 in 64-bit arithmetic: the header's own bytes
    edited("wrap0", _set_offset("output_norm.weight", lambda r: 2**64 - int(r.data_offset)),
           "tensor 'output_norm.weight': offset ")
    # found by the fuzzer: a layer count as large as a uint32 built a dict per layer first
    edited("layers", _set_int("llama.block_count", 2**32 - 1),
           "llama.block_count: 4294967295 layers, but the file holds 20 tensors")
    edited("overlap", _set_offset("output_norm.weight", 0),
           "tensor 'token_embd.weight': offset 0 overlaps the tensor before it (ends at ")
    edited("dims", _set_dim("token_embd.weight", 1, 2**40), "tensor 'token_embd.weight': shape ")
    fifo = folder / "fifo.gguf"
    os.mkfifo(fifo)
    out["fifo"] = (fifo, "is a FIFO, not a regular file")
    loop = folder / "loop.gguf"
    loop.symlink_to(folder / "loop2.gguf")
    (folder / "loop2.gguf").symlink_to(loop)
    out["loop"] = (loop, "symlink loop (too many levels of symbolic links)")
    out["device"] = (Path("/dev/zero"), "is a character device, not a regular file")
    return out


def test_hostile_files_give_one_line_in_bounded_time(synth_gguf: Any, tmp_path: Path) -> None:
    """Each file is refused with one line naming the file and the field: first in a child
    process under a time limit (a regression hangs or grows there, not here), then through
    the runner, exit 2. The wrapped offsets ran before on weights read from the header."""
    files = _hostile_files(synth_gguf("llama", "F16"), tmp_path)
    code = ("import sys, time\nfrom testbed.model.gguf_file import GGUFError, spec_from_gguf\n"
            "for p in sys.argv[1:]:\n    t = time.monotonic()\n    try:\n        spec_from_gguf(p)\n"
            "        print('ACCEPTED', p)\n    except GGUFError as e:\n        print(e)\n"
            "    assert time.monotonic() - t < 5, p\n")
    res = subprocess.run([sys.executable, "-c", code, *(str(p) for p, _ in files.values())], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(files), res.stdout
    for (path, message), line in zip(files.values(), lines, strict=True):
        assert line.startswith(f"{path}: {message}"), line
    scen = ROOT / "scenarios" / "gguf_model.yaml"
    for name in ("count", "wrap0", "fifo", "loop"):
        path, message = files[name]
        res = subprocess.run([sys.executable, "-m", "runners.run", str(scen), "--model-gguf", str(path),
                              "--clock", "virtual", "--out", str(tmp_path / "out")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (name, res.stdout, res.stderr)
        err = res.stderr.strip()
        assert "\n" not in err and err.startswith(f"error: {scen}: --model-gguf: {path}: {message}"), err
    assert not (tmp_path / "out").exists()


def test_header_walk_accepts_every_written_file(synth_gguf: Any) -> None:
    """The walk's data offset and tensor count are the reader's, for every variant."""
    from testbed.model.gguf_header import check_file

    for variant in VARIANTS:
        path = synth_gguf(variant, "Q4_K")
        h, r = check_file(path), gguf.GGUFReader(str(path))
        assert (h.data_offset, h.tensors, h.size) == (r.data_offset, len(r.tensors), len(r.data))


# ---------------------------------------------------------------------------- scenarios


def test_scenario_paths_overrides_and_round_trip(synth_gguf: Any, tmp_path: Path) -> None:
    path = synth_gguf("qwen2", "Q8_0")
    (tmp_path / "models").mkdir()
    shutil.copy(path, tmp_path / "models" / "m.gguf")
    import yaml

    doc = scenario({"gguf": "models/m.gguf", "dtype": "float16", "context": 512})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    s = load(tmp_path / "s.yaml")  # relative to the scenario file, not the working directory
    assert s.model.gguf == str((tmp_path / "models" / "m.gguf").resolve())
    assert (s.model.dtype, s.model.context, s.model.layers) == ("float16", 512, 2)
    assert parse(s.to_dict(), s.file) == s
    whole = (cost.model_weight_bytes(s.model) + cost.source_weight_bytes(s.model)
             + cost.model_cache_bytes(s.model, s.final_length))
    assert s.devices[1].memory_mib == pytest.approx(0.45 * whole / 2**20, abs=1e-3)
    assert s.devices[1].memory_high_mib == pytest.approx(0.9 * s.devices[1].memory_mib)
    # --model-gguf replaces the model section (the devices are sized from the new model)
    other = synth_gguf("tinyllama", "F16")
    o = load(tmp_path / "s.yaml", model_gguf=str(other))
    assert o.model == spec_from_gguf(other) and o.devices[1].memory_mib != s.devices[1].memory_mib


@pytest.mark.parametrize("model,path,text", [
    ({"layers": 3}, "model.layers", "gives layers = 2; a GGUF model's sizes come from its file"),
    ({"context": 4096}, "model.context", "must be in 1..2048"),
    ({"preset": "gpt-tiny"}, "model", "give exactly one of preset or gguf"),
    ({"dtype": "float8"}, "model.dtype", "must be one of"),
])
def test_scenario_model_errors(model: dict, path: str, text: str, synth_gguf: Any) -> None:
    with pytest.raises(ScenarioError) as info:
        parse(scenario({"gguf": str(synth_gguf("llama", "F32")), **model}), "s.yaml")
    assert info.value.path == path and text in info.value.message, str(info.value)


def test_scenario_memory_needs_mib_or_share(synth_gguf: Any) -> None:
    doc = scenario({"gguf": str(synth_gguf("llama", "F32"))})
    doc["devices"][0]["memory_mib"] = 64
    with pytest.raises(ScenarioError, match=r"devices\[0\]: give exactly one of memory_mib or memory_share"):
        parse(doc, "s.yaml")


def test_cli_bad_files_exit_2_with_one_line(synth_gguf: Any, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    scen = ROOT / "scenarios" / "gguf_model.yaml"
    assert cli.main([str(scen), "--model-gguf", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {scen}: --model-gguf: {bad}: not a GGUF file (bad magic)"
    import yaml

    doc = scenario({"gguf": "bad.gguf"})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    assert cli.main([str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 's.yaml'}: model.gguf: {bad}: not a GGUF file (bad magic)"
    assert not (tmp_path / "out").exists()


def test_readme_scenario_runs_a_model_named_by_path(synth_gguf: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """scenarios/gguf_model.yaml with --model-gguf: the devices are sized from the file, the
    run keeps the reference's tokens and prints the text."""
    path = synth_gguf("llama3", "Q4_K")
    scen_file = ROOT / "scenarios" / "gguf_model.yaml"
    code = cli.main([str(scen_file), "--model-gguf", str(path), "--clock", "virtual", "--tokens", "8",
                     "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "tokens equal the reference" in printed and path.stem in printed
    (run,) = (tmp_path / "gguf_model").glob("*-s0")
    meta, summary = read_json(run / "meta.json"), read_json(run / "summary.json")
    assert meta["scenario"]["model"]["gguf"] == str(path.resolve())
    assert summary["correctness"]["tokens_match"] and summary["prompt_text"] == PROMPT
    s = load(scen_file, model_gguf=str(path))
    assert sum(d.memory_mib for d in s.devices) > max(d.memory_mib for d in s.devices) * 2
    whole = (cost.model_weight_bytes(s.model) + cost.source_weight_bytes(s.model)
             + cost.model_cache_bytes(s.model, s.final_length)) / 2**20
    assert all(d.memory_mib < whole for d in s.devices)  # no device holds the model alone
    assert math.isclose(sum(d.memory_mib for d in s.devices), 1.5 * whole, rel_tol=1e-3)


# ---------------------------------------------------------------------------- fuzzing the header

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from .conftest import fresh_dir  # noqa: E402

# examples per fuzz test, as in test_protocol.py: TESTBED_FUZZ_EXAMPLES=5000 searches longer
# (TESTBED_HYPOTHESIS=explore draws new ones)
EXAMPLES = int(os.environ.get("TESTBED_FUZZ_EXAMPLES", "200"))
# values that break readers: zero, one, the edges of 32 and 64 bits, huge counts
EDGES = [0, 1, 2, 31, 32, 33, 64, 255, 2**16, 2**31 - 1, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 32, 2**64 - 1]


@st.composite
def _header_edits(draw: Any, header_len: int) -> list[tuple[int, int, int]]:
    """(offset in the header, width in bytes, value) overwrites, little-endian."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        width = draw(st.sampled_from([1, 4, 8]))
        offset = draw(st.integers(0, header_len - width))
        value = draw(st.one_of(st.sampled_from(EDGES), st.integers(0, 2**(8 * width) - 1)))
        out.append((offset, width, value % 2**(8 * width)))
    return out


class _Base(tuple):
    """(bytes, header length), shown short in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<{len(self[0])} bytes, header {self[1]}>"


@pytest.fixture(scope="module")
def fuzz_base(synth_gguf: Any) -> tuple[bytes, int]:
    """A small valid file's bytes and its header's length (where the data starts)."""
    path = synth_gguf("llama", "Q8_0")
    return _Base((path.read_bytes(), int(gguf.GGUFReader(str(path)).data_offset)))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_gguf_headers(data: Any, fuzz_base: tuple[bytes, int], tmp_path: Path) -> None:
    """Overwrite bytes, 32- and 64-bit fields of a valid header with edge values (counts,
    lengths, types, dims, offsets), maybe cut the file: reading it gives a spec or one
    GGUFError line naming the file, in well under a second (5 s allows for a busy host),
    and never anything else; a file the header walk accepts has every tensor inside it."""
    from testbed.model.gguf_header import HeaderError, check_header, type_sizes

    base, header_len = fuzz_base
    buf = bytearray(base)
    for offset, width, value in data.draw(_header_edits(header_len), label="edits"):
        buf[offset:offset + width] = value.to_bytes(width, "little")
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(buf))), label="cut")
    if cut is not None:
        del buf[cut:]
    path = fresh_dir(tmp_path) / "fuzz.gguf"
    path.write_bytes(buf)
    t0 = time.monotonic()
    try:
        spec_from_gguf(path)
    except GGUFError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
    assert time.monotonic() - t0 < 5.0
    try:
        h = check_header(bytes(buf), type_sizes())
    except HeaderError:
        return
    for t in gguf.GGUFReader(str(path)).tensors:  # accepted: the reader's view is in bounds
        assert h.data_offset <= t.data_offset and t.data_offset + t.n_bytes <= len(buf)
