"""The ``spallm`` quantization method in a real vLLM (nox session ``vllm``; skipped where vLLM is absent).

Every vLLM here runs in a child process on 127.0.0.1 and is stopped by the test that started it.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import sketched_default_model, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

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
    model, tp, prompts_file, out_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    prompts = json.load(open(prompts_file))
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=128, tensor_parallel_size=tp,
              seed=0, gpu_memory_utilization=0.5)
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


def run_offline(tmp_path: Path, model: Path, prompts: list[list[int]], tp: int = 1) -> list[dict]:
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / f"out-tp{tp}.json"
    env = _env()
    if tp > 1:
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), str(model), str(tp), str(tmp_path / "prompts.json"), str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
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
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.pipeline import sketch_to_folder

    root = tmp_path_factory.mktemp("tiny")
    dense = root / "dense"
    tiny_llama(
        hidden_size=384, intermediate_size=768, num_attention_heads=6, num_key_value_heads=3, vocab_size=192
    ).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    sketch_to_folder(dense, root / "sketched", SketchConfig(bits=4, groups_per_row=3), progress=False)
    return root / "sketched"


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


def test_offline_tiny_llama_matches_transformers(tmp_path, tiny_sketched):
    assert_same(run_offline(tmp_path, tiny_sketched, PROMPTS), transformers_reference(tiny_sketched, PROMPTS))


def test_tensor_parallel_3_matches_tp_1(tmp_path, tiny_sketched):
    one = run_offline(tmp_path, tiny_sketched, PROMPTS, tp=1)
    three = run_offline(tmp_path, tiny_sketched, PROMPTS, tp=3)
    assert_same(three, one)


def test_merged_fine_tuned_checkpoint_serves_and_differs_where_tables_differ(tmp_path, tiny_sketched):
    from peft import get_peft_model
    from safetensors.torch import load_file

    from spallm_plugins import SpaLLMConfig
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
    before, after = (
        load_file(next(tiny_sketched.glob("model*.safetensors"))),
        load_file(next(merged_dir.glob("model*.safetensors"))),
    )
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith("down_proj.tables") for n in changed)
    (tmp_path / "base").mkdir()
    served_base = run_offline(tmp_path / "base", tiny_sketched, PROMPTS)
    served_merged = run_offline(tmp_path, merged_dir, PROMPTS)
    assert_same(served_merged, transformers_reference(merged_dir, PROMPTS))
    assert all(a["prompt_logprobs"] != b["prompt_logprobs"] for a, b in zip(served_base, served_merged))


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
    return sketched_default_model(tmp_path_factory.mktemp("smollm2") / "sketched", groups_per_row=1)


def test_offline_smollm2_matches_transformers(tmp_path, smollm2_sketched):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_sketched)
    prompts = [tok(t)["input_ids"] for t in ("The capital of France is", "Bicycles are", "One, two, three,")]
    assert_same(run_offline(tmp_path, smollm2_sketched, prompts), transformers_reference(smollm2_sketched, prompts))


def test_smollm2_tensor_parallel_3_matches_tp_1(tmp_path, smollm2_sketched):
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 29101, 359, 253, 2583]]
    assert_same(
        run_offline(tmp_path, smollm2_sketched, prompts, tp=3), run_offline(tmp_path, smollm2_sketched, prompts)
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
def smollm2_server(smollm2_sketched, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "spallm_plugins.cli", "serve", str(smollm2_sketched), "--host", "127.0.0.1",
        "--port", str(port), "--quantization", "spallm", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "1024", "--served-model-name", "smollm2-spallm", "--max-num-seqs", "64",
    ]  # fmt: skip
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
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
