"""``spallm bench quality --peers``: the real quantizers (bitsandbytes NF4, HQQ, GPTQModel's GPTQ) on a
tiny random Llama, checked against the math of their formats and their bits-per-weight formulas."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import needs, sample_words, tiny_llama

from spallm_plugins.bench import quality
from spallm_plugins.config import SketchConfig
from spallm_plugins.convert import resolve_targets

NF4_LARGEST_HALF_STEP = max(b - a for a, b in zip(quality.NF4_VALUES, quality.NF4_VALUES[1:])) / 2


def weights(seed: int = 0, shape=(48, 256)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[3, 10] = 0.6  # an outlier
    return w


def test_nf4_bnb_is_nf4_with_double_quant_and_counts_its_bits():
    needs("bitsandbytes")
    w = weights()
    dequantized, bits = quality.nf4_bnb(w)
    blocks = w.reshape(-1, 64)
    error = (dequantized.reshape(-1, 64) - blocks).abs().amax(-1)
    absmax = blocks.abs().amax(-1)
    # half the widest NF4 gap times the block's absmax, plus what 8-bit double quant does to the absmax
    assert (error <= absmax * (NF4_LARGEST_HALF_STEP + 0.02)).all()
    assert torch.allclose(dequantized, quality.nf4_quantize(w), atol=0.02 * float(w.abs().max()))
    n = w.numel()
    assert bits == n * 4 + (n // 64) * 8 + -(-(n // 64) // 256) * 32 + 32  # codes, 8-bit absmax, fp32 per 256, offset


def test_hqq_g64_rounds_to_its_own_grid_and_counts_its_bits():
    needs("hqq")
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    w = weights()
    dequantized, bits = quality.hqq_g64(w)
    params = hqq_base_quant_config(nbits=4, group_size=64, axis=1)["weight_quant_params"]
    _, meta = Quantizer.quantize(w, **params, compute_dtype=torch.float16, device="cpu")
    scale, zero = meta["scale"].float(), meta["zero"].float()  # [groups, 1]: w ~ (q - zero) * scale
    groups = w.reshape(-1, 64)
    lo, hi = (
        torch.minimum((0 - zero) * scale, (15 - zero) * scale),
        torch.maximum((0 - zero) * scale, (15 - zero) * scale),
    )
    # round to nearest on the group's 16-point grid, clamped to its ends: half a step plus any overshoot
    bound = scale.abs() / 2 + (lo - groups).clamp_min(0) + (groups - hi).clamp_min(0) + 1e-3 * scale.abs()
    assert ((dequantized.reshape(-1, 64) - groups).abs() <= bound).all()
    assert bits == w.numel() * 4 + (w.numel() // 64) * 2 * 16  # 4.5 bits/weight
    assert bits / w.numel() == 4.5


def test_gptq_g128_on_a_tiny_llama_is_4_bit_per_group_and_counts_its_bits():
    needs("gptqmodel")
    model = tiny_llama()
    config = SketchConfig()
    original = {n: m.weight.detach().clone() for n, m in resolve_targets(model, config).items()}
    ids = torch.randint(4, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    bpw = quality.apply_peer(model, "gptq-g128", config, ids)
    targets = resolve_targets(model, config)
    expected = sum(m.weight.numel() * 4 + m.out_features * -(-m.in_features // 128) * 20 for m in targets.values())
    assert bpw == pytest.approx(expected / sum(m.weight.numel() for m in targets.values()))
    for name, linear in targets.items():
        w, q = original[name], linear.weight.detach()
        # symmetric 4-bit with float16 scales: at most 16 levels per group of 128 columns per row
        for group in q.split(128, dim=1):
            assert all(row.unique().numel() <= 16 for row in group)
        # error feedback moves weights beyond the round-to-nearest half step, but not far overall
        assert (q - w).norm() <= 0.2 * w.norm()
        assert not torch.equal(q, w)


def test_peer_selection():
    assert quality.select_peers([], None) == ([], {})
    with pytest.raises(ValueError, match="unknown peer"):
        quality.select_peers(["awq"], None)
    run, missing = quality.select_peers(None, ["original", "nf4-bnb"])
    assert set(run) | set(missing) == {"nf4-bnb"}
    run, missing = quality.select_peers(None, None)
    assert set(run) | set(missing) == set(quality.PEERS)
    assert all(quality.peer_unavailable(p) is None for p in run)


def test_bench_quality_writes_the_peer_rows(tmp_path, dense_dir):
    available = [p for p in quality.PEERS if quality.peer_unavailable(p) is None]
    if not available:
        needs("bitsandbytes")
    text = tmp_path / "text.txt"
    text.write_text(sample_words(400))
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_words(600, seed=1))
    from spallm_plugins.cli import main

    rc = main(["bench", "quality", "--model", str(dense_dir), "--text", str(text), "--calib", str(calib),
               "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "64", "--only", "original", "nf4-b64",
               "--peers", ",".join(available), "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"original", "nf4-b64", *available}
    assert "re-implementation" in rows["nf4-b64"]["implementation"]
    nominal = {"nf4-bnb": 4 + 8 / 64, "hqq-g64": 4.5, "gptq-g128": 4 + 20 / 128}
    for peer in available:
        assert rows[peer]["implementation"].startswith(quality.PEERS[peer].distribution)
        assert result["peers"][peer]["version"]
        assert rows[peer]["perplexity"] > 1 and rows[peer]["ratio_to_original"] > 0.5
        assert rows[peer]["bits_per_weight"] >= nominal[peer] - 1e-9  # + per-tensor constants, partial groups
    assert result["peers_unavailable"] == {}


def test_bench_quality_evaluates_json_rows_up_to_max_windows(tmp_path, dense_dir):
    from spallm_plugins.cli import main
    from spallm_plugins.evaluate import perplexity
    from spallm_plugins.models import load_model

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"instruction": sample_words(50, seed=i), "output": "yes"}) for i in range(8)))
    rc = main(["bench", "quality", "--model", str(dense_dir), "--text", str(rows), "--max-windows", "2",
               "--eval-seqlen", "32", "--only", "original", "--peers", "none", "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    model, tokenizer = load_model(dense_dir, dtype=torch.float32)
    text = "\n\n".join(f"{sample_words(50, seed=i)}\nyes" for i in range(8))
    two, every = (perplexity(model, tokenizer, text, seqlen=32, max_windows=n) for n in (2, None))
    assert result["max_windows"] == 2 and result["rows"][0]["perplexity"] == pytest.approx(two, rel=1e-6)
    assert two != pytest.approx(every, rel=1e-3)
