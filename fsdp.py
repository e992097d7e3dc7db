"""Sharded training (--fsdp in rl.py and sft_warmup.py), off the method's path: FSDP2 keeps 1/ranks
of every weight, gradient and optimiser moment on each rank instead of a whole copy (docs/fsdp.md
gives the memory per GPU). One unit per decoder layer plus the root (embedding, final norm,
lm_head).

Two places differ from plain data parallelism:
- The training path reads the root's weights outside Transformer.forward (embed_rows embeds the
  tokens, token_logprobs applies lm_head), where FSDP's forward hooks cannot gather them:
  gather_root gathers the root by hand before each micro-batch; its gradients are reduce-scattered
  in FSDP's end-of-backward callback, and it is resharded there.
- Generation runs a different number of forward passes on each rank, so it must not all-gather
  layer by layer: gather_all gathers every unit once and keeps it whole until the update.
Checkpoints stay whole Hugging Face directories: weights and optimiser state are gathered to rank
0 (whole), so a run resumes on any number of ranks and transformers reads the files.
"""

import torch


def units(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard(model, bf16=False):
    """Shard a Transformer in place over all ranks. Build the optimiser after this. bf16: the
    parameters are gathered in bf16 for compute, and gradients reduced in fp32 into the fp32 shards
    the optimiser holds (FSDP2's MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # The first forward decides which unit is the root: make it the whole model, not a layer
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.inv_freq.device))
    model.reshard()          # the root stays gathered after a forward; the optimiser needs the shards
    return model


def gather_all(model):
    """Gather every unit and keep it whole until gather_root (generation, evaluation)."""
    for unit in units(model):
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()


def gather_root(model):
    """Before each training micro-batch: the layers back to their shards (they gather themselves in
    forward and free themselves after), the root gathered by hand (see above)."""
    for unit in units(model):
        if unit is not model:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
    model.unshard()


def local(t):
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t):
    """A DTensor that FSDP returns (a gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def whole(model, opt=None):
    """(a plain Transformer with the whole weights, the whole optimiser state keyed by parameter
    name or None), gathered to rank 0's CPU; a collective, every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from model import Transformer
    for unit in units(model):            # the state is read from the shards the optimiser holds
        unit.reshard()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    opt_state = None if opt is None else get_optimizer_state_dict(model, opt, options=options)
    with torch.device("meta"):
        plain = Transformer(model.config)
    if weights:                          # rank 0
        plain.load_state_dict(weights | ({"lm_head.weight": weights["model.embed_tokens.weight"]}
                                         if model.config.tie_word_embeddings else {}), strict=True, assign=True)
        plain.tie_weights()
        plain.source_dir = model.source_dir
    return plain, opt_state


def load_optimizer_state(model, opt, state):
    """A whole optimiser state (keyed by parameter name, as whole() gives it) into the sharded
    optimiser: each rank keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
