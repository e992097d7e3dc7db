"""Sharded training (--fsdp in rl.py and sft_warmup.py), off the method's path: FSDP2 keeps 1/ranks
of every weight, gradient and AdamW moment on each rank (docs/fsdp.md: the memory per GPU), one unit
per decoder layer plus the root (embedding, final norm, lm_head). Two places differ from DDP:
- embed_rows and token_logprobs read the root's weights outside Transformer.forward, where FSDP's
  hooks cannot gather them: before_microbatch gathers the root by hand (FSDP reduce-scatters its
  gradients and reshards it at the end of backward).
- Generation runs a different number of forward passes on each rank, so it must not all-gather
  layer by layer: before_rollouts gathers every unit once and keeps it whole until the update.
Checkpoints stay whole Hugging Face directories, gathered to rank 0: a run resumes on any number of
ranks, and transformers reads them."""

import torch

class Sharded:
    """--fsdp in rl.py and sft_warmup.py: the Transformer sharded in place, with the methods of
    common.Replicated. FSDP2 casts its parameters itself (bf16 compute, fp32 reduction), so no autocast
    and no sampler copy: rollouts read the gathered weights. Build the optimiser after this."""
    optimizer_key = str                          # the whole optimiser state is keyed by parameter name

    def __init__(self, model, bf16):
        """bf16: the parameters are gathered in bf16 for compute, and gradients reduced in fp32 into the
        fp32 shards the optimiser holds (FSDP2's MixedPrecisionPolicy)."""
        import contextlib
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
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

    def __getattr__(self, name):
        return getattr(self.module, name)

    def before_rollouts(self):
        """Gather every unit and keep it whole until before_microbatch (generation, evaluation)."""
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    def before_microbatch(self):
        """The layers back to their shards (they gather themselves in forward and free themselves
        after), the root gathered by hand (see above)."""
        for unit in self.units:
            if unit is not self.module:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)
        self.module.unshard()

    def sync_and_clip(self, max_norm):           # FSDP reduce-scatters the gradients during backward
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def refresh_sampler(self):
        pass

    def all_finite(self):
        return all(p.detach().to_local().isfinite().all() for p in self.module.parameters())

    def whole(self, opt=None):
        """(a plain Transformer with the whole weights, the whole optimiser state keyed by parameter
        name or None), gathered to rank 0's CPU; a collective, every rank calls it."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        from model import Transformer
        for unit in self.units:              # the state is read from the shards the optimiser holds
            unit.reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.module, options=options)
        opt_state = None if opt is None else get_optimizer_state_dict(self.module, opt, options=options)
        config = self.module.config
        with torch.device("meta"):
            plain = Transformer(config)
        if weights:                          # rank 0
            plain.load_state_dict(weights | ({"lm_head.weight": weights["model.embed_tokens.weight"]}
                                             if config.tie_word_embeddings else {}), strict=True, assign=True)
            plain.tie_weights()
            plain.source_dir = self.module.source_dir
        return plain, opt_state

    def load_optimizer_state(self, opt, state):
        """A whole optimiser state (keyed by parameter name, as whole() gives it) into the sharded
        optimiser: each rank keeps its part."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.module, opt, state, options=StateDictOptions(full_state_dict=True))

    def end(self):
        pass                                     # sharded ranks hold different parts by design
