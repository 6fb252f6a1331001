"""Run by tests/test_train.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo), FSDP2 forced.

On a CPU, accelerate turns an FSDP launch config into plain multi-CPU data parallel, so this worker switches the
Accelerator's state to FSDP2 itself (as `fsdp.yaml` would on GPUs: each Block a shard unit) and drives the training
loop's own builders: `build_model` (on meta), `build_optimizer`, `prepare_model` (shard, materialise, init),
`train_step`. It writes `OUT/rank<R>.json` (what it checked) and, on rank 0, the gathered HF checkpoint `OUT/hf/`.

usage: fsdp_worker.py OUT VOCAB_SIZE
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType

from codeparrot.config import load_config
from codeparrot.model import save_hf
from codeparrot.train import build_model, build_optimizer, prepare_model, train_step

STEPS, ACCUMULATION, SEQ = 3, 2, 16


def force_fsdp2(accelerator: Accelerator) -> None:
    """What `fsdp.yaml` sets up on GPUs: FSDP2, each GPT Block a shard unit, sharded checkpoints."""
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"],
        state_dict_type="SHARDED_STATE_DICT")


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole, gathered from the ranks' shards (a collective: every rank calls it)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def main(out: Path, vocab_size: int) -> None:
    cfg = load_config(None, ["model.preset=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
                             f"data.seq_length={SEQ}", "train.compile=false", "train.mixed_precision=no"])
    accelerator = Accelerator(cpu=True)
    force_fsdp2(accelerator)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size, accelerator)
    built_on_meta = all(p.is_meta for p in model.parameters())
    model, optimizer = prepare_model(model, build_optimizer(model, cfg.train, accelerator), cfg.train, accelerator)
    gpt = accelerator.unwrap_model(model)
    named = dict(gpt.named_parameters())
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    before = full_weights(gpt)
    g = torch.Generator().manual_seed(accelerator.process_index)  # each rank its own data
    batches = iter([torch.randint(0, vocab_size, (2, SEQ), generator=g) for _ in range(STEPS * ACCUMULATION)])
    grad_norms = [float(train_step(model, optimizer, batches, accelerator, ACCUMULATION, 1.0, 1e-2).grad_norm)
                  for _ in range(STEPS)]
    after = full_weights(gpt)
    report = {
        "world_size": accelerator.num_processes,
        "built_on_meta": built_on_meta, "any_meta_left": any(p.is_meta for p in gpt.parameters()),
        "sharded": all(type(p).__name__ == "DTensor" for p in gpt.parameters()),
        "optimizer_params": len(in_optimizer), "distinct_optimizer_params": len({id(p) for p in in_optimizer}),
        "named_params": len(named),
        "optimizer_holds_the_model_params": {id(p) for p in in_optimizer} == {id(p) for p in named.values()},
        "unchanged_after_training": sorted(k for k in before if torch.equal(before[k], after[k])),
        "grad_norms": grad_norms,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report, indent=2) + "\n")
    if accelerator.is_main_process:
        save_hf(gpt, out / "hf", eos_token_id=0, state_dict=after)
    # Leave the group together: a rank that exits while gloo threads still serve the other aborts (SIGABRT).
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
