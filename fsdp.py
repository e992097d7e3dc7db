"""Sharded training (--fsdp in rl.py and sft_warmup.py), off the method's path: FSDP2 keeps 1/ranks
of every weight, gradient and AdamW moment on each rank (docs/fsdp.md: the memory per GPU), one unit
per decoder layer plus the root (embedding, final norm, lm_head). Two places differ from DDP:
- embed_rows and token_logprobs read the root's weights outside Transformer.forward, where FSDP's hooks
  cannot gather them: before_microbatch gathers the root by hand (backward reshards it).
- Generation runs a different number of forward passes on each rank, so it must not all-gather layer
  by layer: before_rollouts gathers every unit once and keeps it whole until the update.
Checkpoints stay whole Hugging Face directories, gathered to rank 0 (any number of ranks resumes them,
transformers reads them); on a resume rank 0 alone reads the optimiser state and broadcasts it."""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from common import UserError

def check_args(args, world_size):
    """rl.py --fsdp: refuse what would hang, ranks running different numbers of update forward passes (each
    all-gathers). rl.minibatches puts place (j G + k) in minibatch (j G + k) mod M: the same rows on every rank
    exactly when M divides a rank's P / ranks x G, and one --micro-batch-size on every rank (memory.fit_memory
    plans from the least free memory over ranks) then gives equal counts. --resample keeps them (docs/fsdp.md)."""
    if not dist.is_initialized():
        raise UserError("--fsdp shards over ranks: launch with torchrun --nproc_per_node N, or leave --fsdp out")
    same, rollouts = "--fsdp needs the same forward passes on every rank (each is a collective)", \
        args.prompts_per_step // world_size * args.group_size
    if args.credit == "nudge" or "credit=nudge" in (args.resample or ""):
        raise UserError(f"{same}, which nudge's distillation pass (only on micro-batches with prefixed rollouts) "
                        "does not give; use another credit rule")
    if world_size > 1 and rollouts % args.minibatches:
        raise UserError(f"{same}: a rank's {rollouts} rollouts (--prompts-per-step / {world_size} ranks x --group-size) "
                        f"do not split evenly into --minibatches {args.minibatches}; use one that divides {rollouts}")

class Sharded:
    """--fsdp in rl.py and sft_warmup.py: the Transformer sharded in place, with the methods of
    common.Replicated. bf16: FSDP2's MixedPrecisionPolicy gathers bf16 parameters for compute and reduces gradients
    in fp32 into the fp32 shards the optimiser holds; no autocast, no sampler copy. Build the optimiser after this."""
    refresh_sampler = end = lambda self: None    # no sampler copy; sharded ranks hold different parts by design

    def __init__(self, model, bf16):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        # The first forward decides which unit is the root: make it the whole model, not a layer
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.inv_freq.device))
        model.reshard()          # the root stays gathered after a forward; the optimiser needs the shards
        self.module, self.device = model, model.embed_tokens.weight.device
        self.sampler, self.autocast = model, contextlib.nullcontext
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        # whole optimiser states keyed by name; None: common.load_checkpoint reads none (load_optimizer_state)
        self.optimizer_key = str if dist.get_rank() == 0 else None

    def __getattr__(self, name):
        return getattr(self.module, name)

    def before_rollouts(self):
        """Gather every unit and keep it whole until before_microbatch (generation, evaluation)."""
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    def before_microbatch(self):
        """The layers back to their shards (each gathers itself in forward), the root gathered by hand."""
        for unit in self.units:
            if unit is not self.module:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)
        self.module.unshard()

    def sync_and_clip(self, max_norm):           # FSDP reduce-scatters the gradients during backward
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def all_finite(self):
        return all(p.detach().to_local().isfinite().all() for p in self.module.parameters())

    def whole(self, opt=None):
        """(a plain Transformer, the optimiser state keyed by name or None), whole on rank 0's CPU; a collective."""
        from model import Transformer
        for unit in self.units:              # the state is read from the shards the optimiser holds
            unit.reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.module, options=options)
        opt_state = None if opt is None else get_optimizer_state_dict(self.module, opt, options=options)
        with torch.device("meta"):
            plain = Transformer(self.module.config)
        if weights:                          # rank 0
            plain.load_state_dict(weights | ({"lm_head.weight": weights["model.embed_tokens.weight"]}
                                             if plain.config.tie_word_embeddings else {}), strict=True, assign=True)
            plain.tie_weights()
            plain.source_dir = self.module.source_dir
        return plain, opt_state

    def load_optimizer_state(self, opt, state):
        """Rank 0's whole optimiser state (keyed by name, as whole() gives it; ignored elsewhere) broadcast tensor
        by tensor: each rank keeps its shards, and rank 0 alone reads the file, not every rank (65.5 GB each at 8B)."""
        set_optimizer_state_dict(self.module, opt, state if dist.get_rank() == 0 else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
