"""Sharded training with FSDP2 on real ``torch.distributed``: 2 processes on gloo (CPU), tiny models.

Each distributed test spawns two ranks that ``fully_shard`` a model built in-process (the same seed
as the single-process reference the test computes itself) and return what they saw through files.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

from spallm_plugins.config import SketchConfig
from spallm_plugins.layer import SketchedLinear
from spallm_plugins.sharding import check_sharded, is_sharded, local_state_dict
from spallm_plugins.sketch import sketch_layer

pytestmark = pytest.mark.slow  # scheduled first under pytest-xdist (conftest.py)

WORLD = 2
STEPS = 3
LR = 0.5
FAST = {"groups_per_row": 2, "kmeans_iters": 4, "kmeans_restarts": 1}  # any sketch will do: tests compare runs

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


# ------------------------------------------------------------------------------------------------
# models and the two-rank launcher


def sketched(in_f: int, out_f: int, bits: int, bias: bool = False) -> SketchedLinear:
    linear = nn.Linear(in_f, out_f, bias=bias)
    layer, _ = sketch_layer(linear, SketchConfig(bits=bits, table_dtype="float32", **FAST))
    return layer


def tiny_model(seed: int = 0) -> nn.Sequential:
    """Two blocks of sketched linears (3- and 4-bit, 24 and 16 rows) and a 9-row head (uneven on 2 ranks)."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(sketched(16, 24, 3), nn.ReLU(), sketched(24, 16, 4, bias=True)) for _ in range(2)]
    return nn.Sequential(*blocks, sketched(16, 9, 4, bias=True))


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 16, generator=g), torch.randn(8, 9, generator=g)


def shard(model: nn.Module, blocks: list[nn.Module], **kwargs: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model)


def local_half(t: torch.Tensor, rank: int) -> torch.Tensor:
    n = t.shape[0] // WORLD
    return t[rank * n : (rank + 1) * n]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], torch.optim.Optimizer]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(global_mean(loss.detach()))
    return losses, opt


def global_mean(value: torch.Tensor, sharded: bool = True) -> float:
    """The mean of ``value`` over the ranks (each rank's loss is its half batch's): the whole batch's loss."""
    if sharded and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, scenarios: list[str], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        SPALLM_TEST_RANKS_DIR=out,
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        for scenario in scenarios:  # one failing scenario fails its own test, not the others
            try:
                results[scenario] = globals()[scenario](rank)
            except Exception:
                results[scenario] = RankError(traceback.format_exc())
            dist.barrier()
        _write_results(results, Path(out) / f"rank{rank}")
    finally:
        dist.destroy_process_group()


class RankError(str):
    """A scenario's traceback on one rank."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` (saved as safetensors): what a rank returns
    reaches the test as the same objects, with no pickle on disk."""
    from torch.distributed.tensor import Placement

    if isinstance(value, RankError):
        return {"__rank_error__": str(value)}
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, Placement):
        return {"__placement__": repr(value)}
    if isinstance(value, (tuple, list)):
        items = [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{path}: a rank's result has a dict with non-string keys")
        return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{path}: a rank's result holds a {type(value).__name__}, which the tests do not carry")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__rank_error__" in value:
        return RankError(value["__rank_error__"])
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    if "__placement__" in value:
        return value["__placement__"]  # compared with other placements only, by their repr
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    return {k: _decode(v, tensors) for k, v in value.items()}


def _write_results(results: dict[str, Any], stem: Path) -> None:
    import json

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    stem.with_suffix(".json").write_text(json.dumps(_encode(results, tensors, "results")))
    save_file(tensors, str(stem.with_suffix(".safetensors")))


def _read_results(stem: Path) -> dict[str, Any]:
    import json

    from safetensors.torch import load_file

    return _decode(json.loads(stem.with_suffix(".json").read_text()), load_file(stem.with_suffix(".safetensors")))


def run_ranks(scenarios: list[str], out: Path) -> list[dict[str, Any]]:
    """Run each ``scenario(rank)`` on 2 gloo ranks (one process group for all: starting ranks is the
    slow part); returns, per rank, what each scenario returned or its traceback."""
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(_free_port(), scenarios, str(out)), nprocs=WORLD, join=True)
    return [_read_results(out / f"rank{r}") for r in range(WORLD)]


SCENARIOS = [
    "scenario_placement",
    "scenario_train_and_save",
    "scenario_load",
    "scenario_bad_input",
    "scenario_peft",
    "scenario_peft_dense",
    "scenario_zero3",
    "scenario_zero3_peft",
    "scenario_requires_grad",
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    return run_ranks(SCENARIOS, tmp_path_factory.mktemp("ranks"))


def results(two_ranks: list[dict[str, Any]], scenario: str) -> list[Any]:
    seen = [r[scenario] for r in two_ranks]
    errors = [f"rank {rank}:\n{s}" for rank, s in enumerate(seen) if isinstance(s, RankError)]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    return seen


# ------------------------------------------------------------------------------------------------
# scenarios (run on each rank)


def scenario_requires_grad(rank: int) -> dict[str, Any]:
    """``model.requires_grad_(True)`` on a sharded model, then a backward: (sharded, requires_grad, has grad)."""
    model = tiny_model()
    shard(model, list(model[:2]))
    check_sharded(model)
    model.requires_grad_(True)
    x, _ = data()
    model(local_half(x, rank)).sum().backward()
    return {n: (is_sharded(p), p.requires_grad, p.grad is not None) for n, p in model.named_parameters()}


def scenario_placement(rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import Shard

    from spallm_plugins import ops

    model = tiny_model()
    shard(model, list(model[:2]))
    check_sharded(model)  # what the trainer integrations call once the model is sharded
    prepared = len(ops._PREPARED)
    _, opt = train(model, *(local_half(t, rank) for t in data()))
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, SketchedLinear):
            codes, tables = m.codes, m.tables
            layers[name] = {
                "sharded": is_sharded(codes) and is_sharded(tables),
                "placements": (tuple(codes.placements), tuple(tables.placements)) if is_sharded(codes) else None,
                "dtype": codes.dtype,
                "requires_grad": codes.requires_grad,
                "optimized": id(codes) in optimized,
                "rows": (m.out_features, codes.to_local().shape[0] if is_sharded(codes) else codes.shape[0]),
                "table_rows": tables.to_local().shape[0] if is_sharded(tables) else tables.shape[0],
                "bytes": (codes.to_local() if is_sharded(codes) else codes).nbytes,
                "full_bytes": m.out_features * codes.shape[1],
            }
    cache = [m.cache_prepared for m in model.modules() if isinstance(m, SketchedLinear)]
    pinned = len(ops._PREPARED) - prepared  # layouts kept alive by the unsharded codes FSDP2 holds on to
    return {"layers": layers, "shard0": (Shard(0),), "cache_prepared": cache, "pinned": pinned}


def scenario_train_and_save(rank: int) -> dict[str, Any]:
    model = tiny_model()
    shard(model, list(model[:2]))
    x, y = data()
    losses, _ = train(model, local_half(x, rank), local_half(y, rank))
    sd = model.state_dict()  # collective: every rank gathers
    with local_state_dict():
        local = model.state_dict()
    kept = {k: is_sharded(v) for k, v in local.items()}
    checkpoint = Path(os.environ["SPALLM_TEST_RANKS_DIR"]) / "dcp-train"
    dcp.save(local, checkpoint_id=checkpoint)  # each rank writes its own shards
    return {"losses": losses, "state_dict": sd, "local_kept_sharded": kept, "dcp": str(checkpoint)}


def scenario_load(rank: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    x, _ = data()
    other = tiny_model(seed=5).state_dict()  # a format-v1 state dict from another model
    model = tiny_model()
    shard(model, list(model[:2]))
    result = model.load_state_dict(other)
    placed = all(is_sharded(m.codes) for m in model.modules() if isinstance(m, SketchedLinear))
    with torch.no_grad():
        out_plain = model(x).detach()
    back = model.state_dict()
    model2 = tiny_model()
    shard(model2, list(model2[:2]))
    set_model_state_dict(model2, other, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        out_dcp = model2(x).detach()
    # after a forward the root's layers (here the head) stay unsharded: plain tensors until FSDP2's own
    # load hook reshards them, which runs after ours unless ours runs it first
    model3 = tiny_model()
    shard(model3, list(model3[:2]))
    with torch.no_grad():
        model3(x)
        model3.load_state_dict(other)
        out_after_forward = model3(x).detach()
    return {
        "missing": result.missing_keys,
        "placed": placed,
        "out": out_plain,
        "out_dcp": out_dcp,
        "out_after_forward": out_after_forward,
        "back": back,
    }


def scenario_bad_input(rank: int) -> dict[str, str]:
    from torch.distributed.fsdp import fully_shard

    errors = {}
    model = tiny_model()
    shard(model, list(model[:2]))
    with local_state_dict():
        sharded_sd = model.state_dict()
    head = model[2]
    local_rows = head.codes.to_local().clone()  # one rank's rows, saved as a plain tensor
    full = model.state_dict()
    try:
        model.load_state_dict({**full, "2.codes": local_rows})
    except ValueError as err:
        errors["shard_into_sharded"] = str(err)
    try:
        tiny_model().load_state_dict(sharded_sd)
    except ValueError as err:
        errors["dtensor_into_unsharded"] = str(err)
    # codes left out of sharding while the tables are sharded: runs, but replicates the codes
    mixed = tiny_model()
    fully_shard(mixed[0], ignored_params={mixed[0][0].codes})
    fully_shard(mixed)
    try:
        check_sharded(mixed)
    except ValueError as err:
        errors["check_sharded"] = str(err)
    return errors


def scenario_peft(rank: int) -> dict[str, Any] | None:
    """The sharded PEFT run and, first, the same fine-tune unsharded in this process (no collectives):
    computed here so the test process never imports transformers and peft."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return None
    expected = peft_run(None)
    return {"expected": expected, "sharded": peft_run(rank, load=expected["adapter"])}


def scenario_peft_dense(rank: int) -> dict[str, Any] | None:
    """``scenario_peft`` on a dense base: the adapter sketches each linear at injection and carries its
    own codes (``sketched_codes``, saved as ``spallm_codes``), which must shard by rows like its tables."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return None
    expected = peft_run(None, dense=True)
    return {"expected": expected, "sharded": peft_run(rank, load=expected["adapter"], dense=True)}


def zero3_engine(model: nn.Module, batch: int | None = None):
    """``model`` under DeepSpeed ZeRO-3 (CPU accelerator, gloo) with the tests' SGD; every parameter is
    partitioned (persistence threshold 0) and gradients are not clipped (DeepSpeed clips at 1.0 by default)."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": (batch or data()[0].shape[0]) // WORLD,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def scenario_zero3(rank: int) -> dict[str, Any] | None:
    """ZeRO-3 on the same tiny model: placement, 3 steps, state_dict(), loading format v1, a DeepSpeed
    checkpoint round trip, and a wrong shape."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return None
    x, y = data()
    engine = zero3_engine(tiny_model())
    model = engine.module
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, SketchedLinear):
            codes = m.codes
            layers[name] = {
                "partitioned": hasattr(codes, "ds_id") and codes.numel() == 0,
                "dtype": (codes.dtype, codes.ds_tensor.dtype),
                "requires_grad": codes.requires_grad,
                "local_numel": codes.ds_tensor.numel(),
                "full_numel": math.prod(codes.ds_shape),
            }
    losses = []
    for _ in range(STEPS):
        loss = (engine(local_half(x, rank)) - local_half(y, rank)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(global_mean(loss.detach()))
    trained = model.state_dict()  # collective
    cache = [m.cache_prepared for m in model.modules() if isinstance(m, SketchedLinear)]
    with tempfile.TemporaryDirectory() as folder:
        folder = [folder]
        dist.broadcast_object_list(folder)  # one directory for both ranks
        engine.save_checkpoint(folder[0], tag="step3")
        resumed = zero3_engine(tiny_model(seed=7))
        resumed.load_checkpoint(folder[0], tag="step3")
        resumed_state = resumed.module.state_dict()
        dist.barrier()
    other = tiny_model(seed=5).state_dict()
    result = model.load_state_dict(other)
    with torch.no_grad():
        out = model(x).detach()
    error = ""
    try:
        model.load_state_dict({**other, "2.codes": other["2.codes"][:5]})
    except ValueError as err:
        error = str(err)
    return {
        "layers": layers,
        "losses": losses,
        "state_dict": trained,
        "cache_prepared": cache,
        "resumed": resumed_state,
        "missing": result.missing_keys,
        "out": out,
        "error": error,
    }


def scenario_zero3_peft(rank: int) -> dict[str, Any] | None:
    """The PEFT fine-tune of ``scenario_peft`` under ZeRO-3: the adapter reads its base layer's codes
    without calling it (DeepSpeed fetches them on access)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
        from peft import get_peft_model_state_dict
    except ImportError:
        return None
    ids = peft_ids()
    engine = zero3_engine(peft_model(), batch=ids.shape[0])
    engine.train()
    losses = []
    for _ in range(STEPS):
        loss = engine(local_half(ids, rank), labels=local_half(ids, rank)).loss
        engine.backward(loss)
        engine.step()
        losses.append(global_mean(loss.detach()))
    return {"losses": losses, "adapter": get_peft_model_state_dict(engine.module)}


def peft_model(dense: bool = False):
    """A tiny Llama with a SpaLLM adapter: on a sketched base (tables over the base's codes) or, with
    ``dense``, on the dense base (sketched at injection, the adapter holds the codes)."""
    from conftest import tiny_llama
    from peft import get_peft_model

    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.sketch import sketch_model

    base = tiny_llama(seed=0)
    if dense:
        config = SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False, bits=4, table_dtype="float32", **FAST)
    else:
        sketch_model(base, SketchConfig(bits=4, table_dtype="float32", **FAST))
        config = SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False)
    torch.manual_seed(0)
    return get_peft_model(base, config)


def peft_ids() -> torch.Tensor:
    return torch.randint(4, 30, (4, 12), generator=torch.Generator().manual_seed(3))


def peft_train(model, ids: torch.Tensor, sharded: bool) -> list[float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(global_mean(loss.detach(), sharded))
    return losses


def peft_run(rank: int | None, load: dict[str, torch.Tensor] | None = None, dense: bool = False) -> dict[str, Any]:
    """The PEFT fine-tune on one process (``rank=None``) or as one rank of a sharded run; then, if
    given, the adapter state dict ``load`` loaded into it and read back."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = peft_model(dense)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    ids = peft_ids()
    sharded = {}
    if rank is not None:
        layers = model.base_model.model.model.layers
        shard(model, list(layers))
        check_sharded(model)
        ids = local_half(ids, rank)
        for name, p in model.named_parameters():
            if ".spallm_tables." in name or ".sketched_codes." in name or name.endswith(".codes"):
                sharded[name] = (is_sharded(p), p.dtype, p.requires_grad, local_nbytes(p))
    losses = peft_train(model, ids, sharded=rank is not None)
    adapter = get_peft_model_state_dict(model)  # collective when sharded: model.state_dict() gathers
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, is_main_process=rank in (None, 0))  # every rank calls it, rank 0 writes
        file = Path(folder) / "adapter_model.safetensors"
        saved = load_file(file) if file.exists() else None
    held = held_bytes(model) if rank is not None else None
    reloaded = None
    if load is not None:
        set_peft_model_state_dict(model, load)
        reloaded = get_peft_model_state_dict(model)
    return {
        "losses": losses,
        "adapter": adapter,
        "saved": saved,
        "trainable": trainable,
        "sharded": sharded,
        "held": held,
        "reloaded": reloaded,
        "info": spallm_info_world_size() if rank is not None else None,
    }


def local_nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` this rank holds (its shard when sharded)."""
    return (t.to_local() if is_sharded(t) else t).nbytes


def held_bytes(model: nn.Module) -> dict[str, int]:
    """What this rank holds: local shards by kind, buffers, and the Adam training state of the tables
    (one step on the gradients the last backward left)."""
    nbytes = local_nbytes

    held = dict.fromkeys(("codes_bytes", "tables_bytes", "dense_bytes", "adapter_bytes"), 0)
    for name, p in model.named_parameters():
        kind = "adapter" if ".spallm_tables." in name else name.rsplit(".", 1)[-1]
        held[f"{kind}_bytes" if kind in ("adapter", "codes", "tables") else "dense_bytes"] += nbytes(p)
    held["buffer_bytes"] = sum(b.nbytes for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable)
    opt.step()
    moments = sum(nbytes(v) for state in opt.state.values() for k, v in state.items() if k != "step")
    held["optimizer_bytes"] = held["adapter_bytes"] + sum(nbytes(p.grad) for p in trainable) + moments
    return held


def spallm_info_world_size() -> dict[str, int]:
    """``spallm info CONFIG --world-size 2 --json`` for the tiny Llama sketched as the PEFT scenario does."""
    import contextlib
    import io
    import json

    from conftest import tiny_llama_config

    from spallm_plugins.cli import main

    with tempfile.TemporaryDirectory() as folder:
        tiny_llama_config().save_pretrained(folder)
        args = ["info", folder, "--bits", "4", "--gpr", "2", "--table-dtype", "float32", "--dense-dtype", "float32"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            main([*args, "--world-size", str(WORLD), "--json"])
    return json.loads(out.getvalue())["sharded"]


# ------------------------------------------------------------------------------------------------
# tests


def test_codes_shard_as_frozen_uint8_rows_aligned_with_tables(two_ranks):
    ranks = results(two_ranks, "scenario_placement")
    for rank, seen in enumerate(ranks):
        assert seen["layers"], "no SketchedLinear found"
        for name, layer in seen["layers"].items():
            assert layer["sharded"], f"rank {rank}: {name} codes/tables are not DTensors (a buffer is replicated)"
            assert layer["placements"] == (seen["shard0"], seen["shard0"]), name
            assert layer["dtype"] == torch.uint8 and not layer["requires_grad"] and not layer["optimized"], name
            out_f, local_rows = layer["rows"]
            assert local_rows == len(torch.arange(out_f).chunk(WORLD)[rank]) == layer["table_rows"], name
            assert local_rows <= math.ceil(out_f / WORLD), name
            assert layer["bytes"] == local_rows * layer["full_bytes"] // out_f, name  # this rank's rows only
        assert seen["pinned"] == 0, "prepared codes layouts stay pinned by FSDP2's unsharded codes"
        assert not any(seen["cache_prepared"]), "check_sharded leaves the prepared-codes cache on"
    for name in ranks[0]["layers"]:
        assert sum(r["layers"][name]["bytes"] for r in ranks) == ranks[0]["layers"][name]["full_bytes"]
    head = [ranks[r]["layers"]["2"]["rows"][1] for r in range(WORLD)]
    assert head == [5, 4]  # 9 rows: uneven is fine


def test_two_ranks_train_like_one_process_and_save_format_v1(two_ranks):
    model = tiny_model()
    x, y = data()
    expected_losses, _ = train(model, x, y)
    expected = model.state_dict()
    ranks = results(two_ranks, "scenario_train_and_save")
    for seen in ranks:
        assert seen["losses"] == pytest.approx(expected_losses, rel=1e-5)
        sd = seen["state_dict"]
        assert list(sd) == list(expected)
        for key, value in expected.items():
            got = sd[key]
            assert type(got) is torch.Tensor and got.dtype == value.dtype and got.shape == value.shape, key
            if value.dtype == torch.uint8:
                assert torch.equal(got, value), key  # codes never change and come back whole
            else:
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
        assert all(seen["local_kept_sharded"].values())  # local_state_dict() keeps DTensors for DCP


def test_requires_grad_true_on_a_sharded_model_leaves_codes_frozen(two_ranks):
    for seen in results(two_ranks, "scenario_requires_grad"):
        codes = {n: v for n, v in seen.items() if n.endswith(".codes")}
        assert len(codes) == 5 and set(codes.values()) == {(True, False, False)}, codes
        assert all(v == (True, True, True) for n, v in seen.items() if n not in codes), seen


def test_a_dcp_checkpoint_of_two_ranks_resumes_in_one_process(two_ranks):
    """Resuming at another world size: DCP reshards the 2 ranks' codes and tables into whole tensors."""
    model = tiny_model()
    x, y = data()
    train(model, x, y)
    expected = model.state_dict()
    checkpoint = results(two_ranks, "scenario_train_and_save")[0]["dcp"]
    resumed = tiny_model(seed=5)
    state = resumed.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in expected.items() if v.dtype == torch.uint8)
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    resumed.load_state_dict(state)
    for key, value in expected.items():
        got = resumed.state_dict()[key]
        assert got.dtype == value.dtype, key
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_format_v1_state_dict_loads_into_a_sharded_model(two_ranks):
    reference = tiny_model(seed=5)
    x, _ = data()
    with torch.no_grad():
        expected = reference(x)
    ranks = results(two_ranks, "scenario_load")
    for seen in ranks:
        assert seen["missing"] == [] and seen["placed"]
        torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen["out_dcp"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen["out_after_forward"], expected, rtol=1e-5, atol=1e-6)
        for key, value in reference.state_dict().items():
            assert torch.equal(seen["back"][key], value), key


def test_bad_state_dicts_and_mixed_layouts_are_refused_by_name(two_ranks):
    ranks = results(two_ranks, "scenario_bad_input")
    for rank, errors in enumerate(ranks):
        assert set(errors) == {"shard_into_sharded", "dtensor_into_unsharded", "check_sharded"}, errors
        assert (
            "2.codes" in errors["shard_into_sharded"]
            and "one rank's shard (world size 2?)" in errors["shard_into_sharded"]
        ), rank
        assert "comes from a sharded model" in errors["dtensor_into_unsharded"]
        assert errors["dtensor_into_unsharded"].split(":")[0] in ("0.0.tables", "0.0.codes")
        assert "codes and tables of 0.0 are sharded differently" in errors["check_sharded"]


def test_prepared_codes_are_made_per_call_without_the_cache():
    from spallm_plugins import ops
    from spallm_plugins.hooks import hookimpl, register_plugin, unregister_plugin
    from spallm_plugins.kernels.reference import ReferenceBackend

    class Preparing(ReferenceBackend):  # a backend with a load-time layout step, chosen over the CPU kernels
        name, priority = "preparing-reference", 1_000_000

    class Plugin:
        @hookimpl
        def spallm_kernel_backends(self) -> list:
            return [Preparing()]

    plugin = Plugin()
    register_plugin(plugin, name="test-preparing-reference")
    try:
        layer = tiny_model()[2]
        x = torch.randn(2, 16)
        expected = layer(x)
        assert layer.codes in ops._PREPARED  # an unsharded layer keeps its backend's layout
        ops._PREPARED.pop(layer.codes)
        layer.cache_prepared = False
        torch.testing.assert_close(layer(x), expected)
        assert layer.codes not in ops._PREPARED
    finally:
        unregister_plugin(plugin)
    codes = layer.codes.detach()
    ops.lut_linear(x, codes, layer.tables, layer.bias, 4, backend=ReferenceBackend(), cache=False)
    assert codes not in ops._PREPARED


def test_one_ranks_shard_into_an_unsharded_layer_is_refused():
    model = tiny_model()
    state = model.state_dict()
    state["2.tables"] = state["2.tables"][:5].clone()  # rank 0's rows of 9
    with pytest.raises(ValueError, match=r"2\.tables: 5 rows where this layer has 9: it is one rank's shard"):
        model.load_state_dict(state)


def assert_peft_like_one_process(ranks: list[dict[str, Any]]) -> None:
    """Each rank's sharded PEFT run trained, gathered, saved and reloaded what one process did."""
    for both in ranks:
        expected, seen = both["expected"], both["sharded"]
        assert expected["trainable"] and all(".spallm_tables." in n for n in expected["trainable"])
        assert seen["trainable"] == expected["trainable"]
        assert seen["sharded"] and all(s for s, *_ in seen["sharded"].values())
        assert all(
            (dtype == torch.float32 and grad) if ".spallm_tables." in n else (dtype == torch.uint8 and not grad)
            for n, (_, dtype, grad, _) in seen["sharded"].items()
        )
        assert seen["losses"] == pytest.approx(expected["losses"], rel=1e-5)
        assert list(seen["adapter"]) == list(expected["adapter"])
        for key, value in expected["adapter"].items():
            got = seen["adapter"][key]
            assert type(got) is torch.Tensor and got.dtype == value.dtype and got.shape == value.shape, key
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
        assert seen["reloaded"].keys() == expected["adapter"].keys()  # v1 loads into the sharded tables
        assert all(torch.equal(seen["reloaded"][k], v) for k, v in expected["adapter"].items())
    saved, expected_saved = ranks[0]["sharded"]["saved"], ranks[0]["expected"]["saved"]
    assert ranks[1]["sharded"]["saved"] is None  # only rank 0 wrote
    assert saved.keys() == expected_saved.keys()
    for key, value in expected_saved.items():
        assert saved[key].dtype == value.dtype and saved[key].shape == value.shape, key
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6)


def test_peft_adapter_on_a_sharded_base_trains_and_saves_like_one_process(two_ranks):
    ranks = results(two_ranks, "scenario_peft")
    if ranks[0] is None:
        pytest.skip("peft is not installed")
    assert_peft_like_one_process(ranks)


def test_peft_adapter_on_a_sharded_dense_base_shards_its_own_codes(two_ranks):
    ranks = results(two_ranks, "scenario_peft_dense")
    if ranks[0] is None:
        pytest.skip("peft is not installed")
    assert_peft_like_one_process(ranks)
    codes = {n for n in ranks[0]["sharded"]["sharded"] if ".sketched_codes." in n}  # saved as spallm_codes
    assert codes and not any(n.endswith(".codes") for n in ranks[0]["sharded"]["sharded"]), "the base is dense"
    assert all(k.endswith(".spallm_codes") for k in ranks[0]["expected"]["saved"] if "codes" in k)
    assert any(k.endswith(".spallm_codes") for k in ranks[0]["sharded"]["saved"]), "the adapter saves its codes"
    local = {name: [r["sharded"]["sharded"][name][3] for r in ranks] for name in codes}
    assert all(mine[0] == mine[1] > 0 for mine in local.values()), local  # the tiny Llama's row counts are even
    full = [v.nbytes for k, v in ranks[0]["expected"]["adapter"].items() if k.endswith(".spallm_codes")]
    assert len(full) == len(codes) and sum(map(sum, local.values())) == sum(full), "each rank holds half the codes"


def test_spallm_info_world_size_is_what_rank_0_holds(two_ranks):
    ranks = results(two_ranks, "scenario_peft")
    if ranks[0] is None:
        pytest.skip("peft is not installed")
    held = [r["sharded"]["held"] for r in ranks]
    info = ranks[0]["sharded"]["info"]
    assert info["world_size"] == WORLD
    for key in ("codes_bytes", "tables_bytes", "dense_bytes", "buffer_bytes", "optimizer_bytes"):
        assert info[key] == held[0][key], key  # rank 0: the largest
        assert held[1][key] <= held[0][key], key
    assert info["persistent_bytes"] == sum(
        held[0][k] for k in ("codes_bytes", "tables_bytes", "dense_bytes", "buffer_bytes")
    )
    # every row count of the tiny Llama is even: each rank holds half the codes
    assert held[0]["codes_bytes"] + held[1]["codes_bytes"] == 2 * held[0]["codes_bytes"]
    assert info["training_peak_bytes"] > info["persistent_bytes"] + info["optimizer_bytes"]


def test_zero3_partitions_codes_trains_like_one_process_and_saves_format_v1(two_ranks):
    from conftest import needs

    needs("deepspeed", "the ZeRO-3 test (the tests nox session installs it)")
    ranks = results(two_ranks, "scenario_zero3")
    model = tiny_model()
    x, y = data()
    expected_losses, _ = train(model, x, y)
    expected = model.state_dict()
    reference = tiny_model(seed=5)
    with torch.no_grad():
        expected_out = reference(x)
    for rank, seen in enumerate(ranks):
        assert seen["layers"], "no SketchedLinear found"
        for name, layer in seen["layers"].items():
            assert layer["partitioned"], f"rank {rank}: {name} codes are not partitioned by ZeRO-3"
            assert layer["dtype"] == (torch.uint8, torch.uint8) and not layer["requires_grad"], name
            assert layer["local_numel"] == math.ceil(layer["full_numel"] / WORLD), name  # half the codes' bytes
        assert seen["losses"] == pytest.approx(expected_losses, rel=1e-5)
        for state in (seen["state_dict"], seen["resumed"]):
            assert list(state) == list(expected)
            for key, value in expected.items():
                got = state[key]
                assert got.dtype == value.dtype and got.shape == value.shape, key  # not ZeRO-3's empty placeholder
                if value.dtype == torch.uint8:
                    assert torch.equal(got, value), key
                else:
                    torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
        assert not any(seen["cache_prepared"])
        assert seen["missing"] == []
        torch.testing.assert_close(seen["out"], expected_out, rtol=1e-5, atol=1e-6)
        assert seen["error"].startswith("2.codes: shape [5, 8] where this layer has [9, 8]"), seen["error"]


def test_peft_adapter_under_zero3_trains_and_saves_like_one_process(two_ranks):
    from conftest import needs

    needs("deepspeed", "the ZeRO-3 test (the tests nox session installs it)")
    ranks = results(two_ranks, "scenario_zero3_peft")
    if ranks[0] is None:
        pytest.skip("peft is not installed")
    expected = results(two_ranks, "scenario_peft")[0]["expected"]
    for seen in ranks:
        assert seen["losses"] == pytest.approx(expected["losses"], rel=1e-5)
        assert list(seen["adapter"]) == list(expected["adapter"])
        for key, value in expected["adapter"].items():
            got = seen["adapter"][key]
            assert got.dtype == value.dtype and got.shape == value.shape, key
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)


def test_bench_sharding_measures_what_each_rank_holds_against_the_projection(tmp_path):
    from spallm_plugins.bench.sharding import TINY, run_sharding_bench

    results = run_sharding_bench(tmp_path / "out", shape=TINY, steps=1, batch=4, seqlen=16, log=lambda *_: None)
    assert (tmp_path / "out" / "sharding.json").is_file()
    single, sharded = results["rows"]
    assert (single["world_size"], sharded["world_size"]) == (1, 2) and sharded["sharded"]
    assert sharded["rank0_codes_fraction"] == 0.5  # every row count of TINY is even
    for row in results["rows"]:
        for rank in row["ranks"]:
            for key in ("codes_bytes", "tables_bytes", "dense_bytes"):
                assert rank[key] == row["projected_rank0"][key], (row["world_size"], key)
            assert rank["optimizer_state_bytes"] == 2 * rank["tables_bytes"]  # Adam's two moments of the tables
            assert len(rank["step_seconds"]) == 1 and rank["peak_rss_bytes"] > 0
    assert sharded["step_time_ratio_to_one_process"] > 0
