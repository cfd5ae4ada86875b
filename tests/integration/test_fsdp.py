"""strategy: fsdp on CPU: FSDP2 (sharding.shard_model) against DDP on two gloo processes.

The default recipe's tiny model trains 20 steps of two micro-batches each on the same fixed random
batches (each rank its half) under DDP and under FSDP2: the losses and the clipped gradient norms must
agree step by step. The FSDP run checkpoints at step 10 with the training loop's save_checkpoint
(each rank writes its own shards), and a fresh sharded model resumed from it on two ranks, and an
unsharded one on a single rank (the same global batches in four micro-batches), must redo steps 11-20
as the run did. A few steps of the
BLIP twin's pre-training (ITC, ITM, LM: modules called several times a step, and scalar parameters
that FSDP leaves replicated) must match DDP too. With activation checkpointing (every block wrapped,
then sharded) FSDP must train as it does without, and write the same weights.

`vlmflow plan`'s footprint of a worker under FSDP on two workers, with and without activation
checkpointing, must come within a quarter of the peak of torch's allocations each rank measures over
three AdamW steps of the sharded model (benchmarks/plan_accuracy.py's measurement).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmflow.specs import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "specs" / "recipes"
RECIPE = RECIPES / "shapes-tiny.yaml"
SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<image>": 4, "<|user|>": 6, "<|assistant|>": 7}
VOCAB = 300
WORLD, STEPS, SAVE_AT, BLIP_STEPS = 2, 20, 10, 4
PER_RANK, MICRO = 4, 2  # each rank's half of the batch, in two micro-batches


def stage_model(recipe: Path = RECIPE, checkpointing: bool = False) -> torch.nn.Module:
    from vlmflow.components.train.setup import build_stage_model
    from vlmflow.models.vlm import Vocab

    spec = load_recipe(recipe)
    stage = spec.stages[0].model_copy(update={"activation_checkpointing": checkpointing})
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    return build_stage_model(spec.model, Vocab(VOCAB, SPECIAL), stage, None)


def micro_batches(step: int, rank: int, tokens: int, size: int, world: int = WORLD) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the step's fixed random batch (a function of the step only): the
    same micro-batches in the same order on any number of ranks."""
    g = torch.Generator().manual_seed(1000 + step)
    n = WORLD * PER_RANK
    prompt = torch.randint(8, VOCAB, (n, 5), generator=g)
    answer = torch.randint(8, VOCAB, (n, 3), generator=g)
    head = torch.tensor([1, 6, *[4] * tokens])
    ids = torch.cat([head.expand(n, -1), prompt, torch.full((n, 1), 7), answer, torch.full((n, 1), 2)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    mask = torch.ones_like(ids)
    mask[1::3, -2:] = 0  # some rows padded
    labels[1::3, -2:] = -100
    batch = {
        "pixels": torch.randn(n, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "text_ids": torch.randint(8, VOCAB, (n, 6), generator=g),
        "text_mask": torch.ones(n, 6, dtype=torch.long),
    }
    share = n // world
    mine = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
    return [{k: v[i : i + MICRO] for k, v in mine.items()} for i in range(0, share, MICRO)]


def train(wrapped, model, steps: range, rank: int, recipe: Path = RECIPE, checkpoint=None, resume_from=None):
    """The training loop's step (loop.train_worker without data loading and logging) over `steps`:
    the rank-averaged losses, the global gradient norms (before clipping) and the first step's norm
    of the gathered gradient."""
    from vlmflow.components.train import loop
    from vlmflow.components.train.sharding import clip_gradients, gradient_sync

    stage = load_recipe(recipe).stages[0]
    kinds = [o.kind for o in stage.objectives]
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = stage.optimizer
    optimizer = torch.optim.AdamW(loop.param_groups(params, opt.weight_decay), lr=opt.lr, betas=opt.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: loop.lr_factor(s, STEPS, stage))
    if resume_from is not None:
        assert loop.resume(resume_from, wrapped, optimizer, scheduler) == steps.start
    size = load_recipe(recipe).model.vision.image_size
    world = dist.get_world_size()
    losses, norms, reference = [], [], None
    for step in steps:
        torch.manual_seed(loop.step_seed(0, step, rank))  # ITM draws its negatives
        parts = micro_batches(step, rank, model.num_image_tokens, size, world)
        total_loss = 0.0
        for i, batch in enumerate(parts):
            with gradient_sync(wrapped, last=i == len(parts) - 1):
                loss = sum(wrapped(batch, kinds).values()) / len(parts)
                loss.backward()
            total_loss += float(loss.detach())
        if reference is None:  # the norm of the whole (gathered) gradient, as an unsharded model has it
            grads = [p.grad for p in params if p.grad is not None]
            grads = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
            reference = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        norms.append(clip_gradients(params, opt.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = torch.tensor(total_loss, dtype=torch.float64)
        dist.all_reduce(value)
        losses.append(float(value) / world)
        if checkpoint is not None and step + 1 == SAVE_AT:
            loop.save_checkpoint(checkpoint, step + 1, wrapped, optimizer, scheduler, rank)
    return losses, norms, reference


def worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.tensor import DTensor, Shard
    from torch.nn.parallel import DistributedDataParallel

    from vlmflow.components.train.loop import final_weights
    from vlmflow.components.train.sharding import shard_model, transformer_blocks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result: dict = {}
        model = stage_model()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        result["ddp"] = train(ddp, model, range(STEPS), rank)
        ddp_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        model = stage_model()
        blocks = [type(b).__name__ for b in transformer_blocks(model)]
        shard_model(model, "cpu", "fp32")
        block = model.language.model.layers[0]
        weights = list(block.parameters())
        result["blocks"] = blocks
        # this model has no scalar parameters: every one is sharded
        result["sharded"] = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters())
        result["mesh"] = weights[0].device_mesh.size()
        result["local_share"] = sum(p.to_local().numel() for p in weights) / sum(p.numel() for p in weights)
        checkpoints = Path(out) / "checkpoints"
        result["fsdp"] = train(model, model, range(STEPS), rank, checkpoint=checkpoints)
        state = final_weights(model, True, rank, stage_model)
        if rank == 0:
            assert state.keys() == ddp_state.keys()
            result["final_diff"] = max(float((state[k] - ddp_state[k]).abs().max()) for k in state)

        model = stage_model(checkpointing=True)
        result["checkpointed_blocks"] = [type(b).__name__ for b in transformer_blocks(model)]
        shard_model(model, "cpu", "fp32")
        result["checkpointed"] = train(model, model, range(STEPS), rank)
        state = final_weights(model, True, rank, lambda: stage_model(checkpointing=True))
        if rank == 0:
            assert state.keys() == ddp_state.keys()
            result["checkpointed_final_diff"] = max(float((state[k] - ddp_state[k]).abs().max()) for k in state)

        model = shard_model(stage_model(), "cpu", "fp32")
        result["resumed"] = train(model, model, range(SAVE_AT, STEPS), rank, resume_from=checkpoints)
        result["at_checkpoint"] = weights_at_checkpoint(checkpoints, rank)

        blip = RECIPES / "blip-tiny.yaml"
        model = stage_model(blip)
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        result["blip_ddp"] = train(ddp, model, range(BLIP_STEPS), rank, blip)
        model = shard_model(stage_model(blip), "cpu", "fp32")
        result["blip_replicated"] = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
        result["blip_fsdp"] = train(model, model, range(BLIP_STEPS), rank, blip)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def weights_at_checkpoint(checkpoints: Path, rank: int) -> dict[str, torch.Tensor]:
    """The whole weights of the checkpoint at SAVE_AT as the sharded model resumes them, gathered on
    rank 0 (a collective)."""
    from vlmflow.components.train import loop

    model = shard_model_of(stage_model())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(loop.param_groups(params, load_recipe(RECIPE).stages[0].optimizer.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert loop.resume(checkpoints, model, optimizer, scheduler) == SAVE_AT
    return loop.final_weights(model, True, rank, stage_model)


def shard_model_of(model: torch.nn.Module) -> torch.nn.Module:
    from vlmflow.components.train.sharding import shard_model

    return shard_model(model, "cpu", "fp32")


def single_worker(rank: int, port: int, out: str) -> None:
    """Steps SAVE_AT..STEPS resumed from the two ranks' sharded checkpoint on one rank, as the loop runs
    one worker: unsharded, no DDP."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    try:
        model = stage_model()
        result = train(model, model, range(SAVE_AT, STEPS), rank, resume_from=Path(out) / "checkpoints")
        torch.save({"resumed": result}, Path(out) / "single.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def runs(fsdp_out: Path) -> list[dict]:
    mp.spawn(worker, args=(free_port(), str(fsdp_out)), nprocs=WORLD, join=True)
    return [torch.load(fsdp_out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(runs: list[dict], fsdp_out: Path) -> dict:
    mp.spawn(single_worker, args=(free_port(), str(fsdp_out)), nprocs=1, join=True)
    return torch.load(fsdp_out / "single.pt")


def test_transformer_blocks_of_the_tiny_models():
    from vlmflow.components.train.setup import build_stage_model
    from vlmflow.components.train.sharding import transformer_blocks
    from vlmflow.models.vlm import Vocab

    found = {}
    for name in ("shapes", "blip2", "blip", "clip", "fuyu"):
        recipe = load_recipe(RECIPES / f"{name}-tiny.yaml")
        model = build_stage_model(recipe.model, Vocab(VOCAB, SPECIAL), recipe.stages[0], None)
        found[name] = [type(b).__name__ for b in transformer_blocks(model)]
    assert found["shapes"] == ["CLIPEncoderLayer"] * 3 + ["LlamaDecoderLayer"] * 2
    # module order: vision, language, connector (built in that order), text, heads
    assert found["blip2"] == ["CLIPEncoderLayer"] * 2 + ["LlamaDecoderLayer"] * 2 + ["QFormerLayer"] * 3
    assert found["fuyu"] == ["LlamaDecoderLayer"] * 2  # no vision encoder; the connector is one linear layer
    # the text encoder's layers, then the ITM head's fusion layers
    assert found["clip"] == ["CLIPEncoderLayer"] * 2 + ["TransformerEncoderLayer"] * 2 + ["TransformerDecoderLayer"]
    blip = ("CLIPEncoderLayer", "LlamaDecoderLayer", "TransformerEncoderLayer", "TransformerDecoderLayer")
    assert found["blip"] == [name for name in blip for _ in range(2)]


def test_shard_model_splits_every_block_across_the_ranks(runs):
    for rank, result in enumerate(runs):
        assert result["blocks"] == ["CLIPEncoderLayer"] * 3 + ["LlamaDecoderLayer"] * 2
        assert result["sharded"], f"rank {rank}: a parameter is not a DTensor sharded on dim 0"
        assert result["mesh"] == WORLD
        assert 0.45 < result["local_share"] < 0.55  # each rank holds about half of a decoder layer


def test_fsdp_trains_as_ddp(runs):
    ddp_losses, ddp_norms, ddp_reference = runs[0]["ddp"]
    fsdp_losses, fsdp_norms, fsdp_reference = runs[0]["fsdp"]
    assert len(ddp_losses) == len(fsdp_losses) == STEPS
    assert ddp_losses[-1] < ddp_losses[0]  # it learns
    loss_diff = max(abs(a - b) for a, b in zip(ddp_losses, fsdp_losses, strict=True))
    norm_diff = max(abs(a - b) for a, b in zip(ddp_norms, fsdp_norms, strict=True))
    print(f"FSDP vs DDP over {STEPS} steps: max loss difference {loss_diff:.3g}, max grad-norm difference "
          f"{norm_diff:.3g}, final weights {runs[0]['final_diff']:.3g}")  # fmt: skip
    assert loss_diff < 1e-4 and norm_diff < 1e-4
    # clip_gradients on the shards returns the norm of the whole gradient, on every rank
    assert abs(fsdp_norms[0] - fsdp_reference) < 1e-5 and abs(ddp_norms[0] - ddp_reference) < 1e-5
    assert runs[1]["fsdp"][1] == fsdp_norms and runs[1]["fsdp"][0] == fsdp_losses
    # the gathered weights the stage writes are the DDP model's
    assert runs[0]["final_diff"] < 1e-3


def test_fsdp_with_activation_checkpointing_trains_as_without(runs):
    """Each block wrapped in the checkpoint, then sharded (FSDP's hooks outside the recomputation)."""
    for result in runs:
        assert result["checkpointed_blocks"] == ["CheckpointWrapper"] * 5
    losses, norms, reference = runs[0]["fsdp"]
    ck_losses, ck_norms, ck_reference = runs[0]["checkpointed"]
    assert max(abs(a - b) for a, b in zip(losses, ck_losses, strict=True)) < 1e-6
    assert max(abs(a - b) for a, b in zip(norms, ck_norms, strict=True)) < 1e-6
    assert abs(reference - ck_reference) < 1e-6
    assert runs[0]["checkpointed_final_diff"] < 1e-3  # the gathered weights, wrapper prefixes gone, as DDP's


def test_each_rank_writes_its_own_shards_and_nothing_pickled(runs, fsdp_out):
    from safetensors import safe_open

    folder = fsdp_out / "checkpoints" / f"step-{SAVE_AT:08d}"
    shards = [f"shard-{r + 1:05d}-model-00001-of-00001.safetensors" for r in range(WORLD)]
    assert sorted(p.name for p in folder.iterdir()) == [*shards, "state.json"]  # no pickled .metadata
    weight = "model.language.model.layers.0.mlp.up_proj.weight"  # one decoder weight: half on each rank
    rows = runs[0]["at_checkpoint"][weight.removeprefix("model.")].shape[0]
    offsets = []
    for name in shards:
        with safe_open(str(folder / name), "pt") as f:
            offsets.append(json.loads(f.metadata()["DCP_SHARDING_INFO"])[weight]["saved_offsets"])
            assert f.get_slice(weight).get_shape()[0] == rows // WORLD
    assert offsets == [[0, 0], [rows // WORLD, 0]]


def test_fsdp_resumes_its_sharded_checkpoint_on_two_ranks_and_on_one(runs, single):
    losses, norms, _ = runs[0]["fsdp"]
    for workers, resumed in ((2, runs[0]["resumed"]), (2, runs[1]["resumed"]), (1, single["resumed"])):
        resumed_losses, resumed_norms, _ = resumed
        loss_diff = max(abs(a - b) for a, b in zip(losses[SAVE_AT:], resumed_losses, strict=True))
        norm_diff = max(abs(a - b) for a, b in zip(norms[SAVE_AT:], resumed_norms, strict=True))
        print(f"resumed on {workers} worker(s): max loss difference {loss_diff:.3g}, grad norm {norm_diff:.3g}")
        assert loss_diff < 1e-5 and norm_diff < 1e-5


def test_a_sharded_checkpoint_loads_in_one_process_without_a_process_group(runs, fsdp_out):
    """What export and evaluation do with a checkpoint: the weights the sharded model resumed."""
    from vlmflow.components.train.checkpoint import load_model_weights

    model = stage_model()
    torch.manual_seed(1)
    for param in model.parameters():  # not the initial weights: every tensor must come from the checkpoint
        param.data.normal_()
    load_model_weights(model, fsdp_out / "checkpoints" / f"step-{SAVE_AT:08d}")
    gathered = runs[0]["at_checkpoint"]
    assert model.state_dict().keys() == gathered.keys()
    assert all(torch.equal(value, gathered[key]) for key, value in model.state_dict().items())
    assert not all(torch.equal(value, stage_model().state_dict()[key]) for key, value in gathered.items())


def test_fsdp_with_scalar_parameters_and_several_objectives_trains_as_ddp(runs):
    # the contrastive head's temperature and bias: 0-dim, which fully_shard refuses; kept whole
    assert runs[0]["blip_replicated"] == ["heads.contrastive.log_scale", "heads.contrastive.bias"]
    (ddp_losses, ddp_norms, _), (losses, norms, reference) = runs[0]["blip_ddp"], runs[0]["blip_fsdp"]
    assert max(abs(a - b) for a, b in zip(ddp_losses, losses, strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(ddp_norms, norms, strict=True)) < 1e-4
    assert abs(norms[0] - reference) < 1e-5
    assert runs[1]["blip_fsdp"][1] == norms


# The default recipe's align stage (everything trains) under FSDP: at its own micro-batch of 16, where the
# activations are most of the peak, and at a micro-batch of 1, where the sharded weights, AdamW state and
# gathered parameters are about 40% of it.
MEMORY_LAYOUTS = [(micro, checkpointing) for micro in (None, 1) for checkpointing in (False, True)]


def memory_worker(rank: int, port: int, out: str) -> None:
    """Each layout's peak of this rank's allocations over three steps, the sharded model built inside."""
    from benchmarks.plan_accuracy import Layout, measure

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        peaks = {}
        for micro, checkpointing in MEMORY_LAYOUTS:
            layout = Layout("shapes-tiny", 0, "fsdp", WORLD, checkpointing, micro)
            peaks[micro, checkpointing] = measure(layout)["tensor_peak"]
        torch.save(peaks, Path(out) / f"memory{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_peaks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp-memory")
    mp.spawn(memory_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"memory{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize(("micro", "checkpointing"), MEMORY_LAYOUTS)
def test_plan_of_fsdp_is_within_a_quarter_of_each_ranks_measured_peak(fsdp_peaks, micro, checkpointing):
    from benchmarks.plan_accuracy import Layout, setup
    from vlmflow.models.estimate import footprint, trace_stage

    recipe, stage, vocab, image = setup(Layout("shapes-tiny", 0, "fsdp", WORLD, checkpointing, micro))
    trace = trace_stage(recipe.model, vocab, stage, image, stage.micro_batch_size)
    planned = footprint(trace, "fp32", "fsdp", workers=WORLD, checkpointing=checkpointing)
    measured = [peaks[micro, checkpointing] for peaks in fsdp_peaks]
    mib = [f"{m / 2**20:.2f}" for m in measured]
    print(f"micro-batch {stage.micro_batch_size}, checkpointing {checkpointing}: plan {planned.total / 2**20:.2f} MiB"
          f" ({planned.as_dict()}), measured {mib} MiB")  # fmt: skip
    sharded = planned.weights + planned.optimizer + planned.communication
    assert sharded > (0.3 if micro == 1 else 0.03) * planned.total  # what FSDP divides and gathers weighs in
    for rank, peak in enumerate(measured):
        assert 0.75 <= planned.total / peak <= 1.25, (rank, planned, peak)
