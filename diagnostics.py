"""Diagnostics, off the method's path: can the policy read its prefixes (prefix_health), and does the warm-up
change greedy answers (prefix_sensitivity)."""

import torch
import torch.nn.functional as F

from data import grade
from model import DEFAULT_PREFIX_FORM, VAEPrefix, generate

COLLAPSED_COSINE = 0.8     # prior prefixes this alike (noise: about 0) read as one token
BROKEN_SHARE = 0.2         # more broken greedy answers than this: the policy cannot read them

def is_broken(token_ids, text):     # no visible text, or a loop of a few tokens ("Zar\nZar\n..."): real answers use more
    return not text.strip() or (len(token_ids) >= 8 and len(set(token_ids)) <= max(2, len(token_ids) // 8))

def greedy_answers(model, tokenizer, prompts, max_new_tokens, source=None, L=0, g=None):   # (token lists, no eos; stopped?)
    prefixes = None if source is None else list(source.sample(len(prompts), L, g).to(model.embed_tokens.weight.device))
    out = generate(model, prompts, prefixes, max_new_tokens, temperature=0, stop_tokens=[tokenizer.eos_token_id])
    return [[t for t in ids if t != tokenizer.eos_token_id] for ids in out.token_lists()], out.stopped.tolist()

@torch.no_grad()
def prefix_health(source, model=None, prompts=None, tokenizer=None, L=1, n_prefixes=256, max_new_tokens=32, seed=0):
    """(metrics, lines to print): for embedding sources the mean pairwise cosine of n_prefixes prior prefixes
    (a VAE's also to the corpus mean h_mean); with a model and prompts, the share of greedy answers that change
    between two prior draws and the share broken; a warning, saying what to do, if prefixes collapse or break."""
    if source.name == "none":
        return {}, []
    g, health, lines = torch.Generator().manual_seed(seed), {}, []
    drawn = source.sample(n_prefixes, 1, g)
    if drawn.is_floating_point():          # text prefixes (token ids) have no geometry of their own
        unit = F.normalize(drawn[:, 0], dim=-1)                                       # (n, d)
        cos = health["prefix_pairwise_cos"] = (unit @ unit.T)[~torch.eye(n_prefixes, dtype=torch.bool)].mean().item()
        lines.append(f"prefix health ({source.name}): mean pairwise cosine of prior prefixes {cos:.3f} "
                     "(noise: about 0)")
        if isinstance(source, VAEPrefix):
            to_mean = unit @ F.normalize(source.vae.h_mean.float(), dim=0)           # (n,)
            health["prefix_cos_to_corpus_mean"] = to_mean.mean().item()
            lines[-1] += (f" | cosine to the corpus mean {to_mean.mean().item():.3f} ({to_mean.min().item():.3f} "
                          f"to {to_mean.max().item():.3f}), form {source.vae.prefix_form}")
    if model is not None and prompts:
        answers = [greedy_answers(model, tokenizer, prompts, max_new_tokens, source, L, g)[0] for _ in range(2)]
        changed = health["frac_answers_change"] = sum(a != b for a, b in zip(*answers)) / len(prompts)
        broken = health["frac_broken"] = sum(is_broken(ids, tokenizer.decode(ids, skip_special_tokens=True))
                                             for draw in answers for ids in draw) / (2 * len(prompts))
        lines.append(f"prefix health ({source.name}, L = {L}, {len(prompts)} prompts, greedy): answers that change "
                     f"between two prefixes {changed:.1%} | broken answers (empty or one repeated token) {broken:.1%}")
    fix = isinstance(source, VAEPrefix) and source.vae.prefix_form != DEFAULT_PREFIX_FORM and (   # a VAE of another form
        f"train the VAE with `train_vae.py --prefix-form {DEFAULT_PREFIX_FORM}` (or set \"prefix_form\": "
        f"\"{DEFAULT_PREFIX_FORM}\" in its vae.json: the form needs no retraining)")
    if (cos := health.get("prefix_pairwise_cos", 0.0)) > COLLAPSED_COSINE:
        lines.append(f"warning: the prior prefixes collapse to one direction (mean pairwise cosine {cos:.2f} > "
                     f"{COLLAPSED_COSINE}): the policy reads every latent as the same token, so the palette cannot "
                     "steer it; " + (fix or "retrain the VAE with a smaller --beta, or use another prefix source"))
    if (share := health.get("frac_broken", 0.0)) > BROKEN_SHARE:
        lines.append(f"warning: {share:.0%} of greedy answers under prefixes are broken (> {BROKEN_SHARE:.0%}): "
                     "the policy cannot read these prefixes; " + (fix or "try a longer warm-up (sft_warmup.py --steps) or L = 1"))
    return health, lines

@torch.no_grad()
def prefix_sensitivity(model, tokenizer, rows, source, L, max_new_tokens):
    """The warm-up's before/after check on rows with prompt_ids: greedy pass@1 without a prefix (the warm-up must
    not damage the model) and with one, and the share of problems whose answer differs between two prefixes."""
    prompts = [r["prompt_ids"] for r in rows]
    # a cut-off answer counts 0, as in rl.py and evaluate.py: its last line is wherever the cut fell
    pass1 = lambda answers, stopped: sum(grade(tokenizer.decode(a, skip_special_tokens=True), r["answer"], r["grading_kind"])
                                         * done for a, r, done in zip(answers, rows, stopped)) / len(rows)
    result = {"pass1_no_prefix": pass1(*greedy_answers(model, tokenizer, prompts, max_new_tokens))}
    if source.name != "none" and L > 0:
        g = torch.Generator().manual_seed(12345)                                # the same draws after as before
        answers = [greedy_answers(model, tokenizer, prompts, max_new_tokens, source, L, g) for _ in range(2)]
        result["pass1_with_prefix"] = pass1(*answers[0])
        result["frac_differ_between_prefixes"] = sum(a != b for a, b in zip(answers[0][0], answers[1][0])) / len(rows)
    return result
