"""Diagnostics, off the method's path: can the policy read the prefixes it gets (prefix_health, with
broken-answer detection), does the warm-up change greedy answers (prefix_sensitivity), and is a
run going wrong (training_warnings). Each stage calls one of these once; none changes a run.
"""

import torch
import torch.nn.functional as F

from data import format_prompt, grade
from model import DEFAULT_PREFIX_FORM, VAEPrefix, generate

COLLAPSED_COSINE = 0.8     # prior prefixes this alike (noise: about 0) read as one token
BROKEN_SHARE = 0.2         # more broken greedy answers than this: the policy cannot read them
WARN_AFTER = 3             # steps in a row before a training warning


def is_broken(token_ids, text):
    """A completion that carries nothing: no visible text, or a loop of a few tokens (at least 8
    tokens, at most one distinct token in 8, and never more than 2 in a short one: "Zar\\nZar\\n...").
    Real answers, even short ones, use far more distinct tokens."""
    return not text.strip() or (len(token_ids) >= 8 and len(set(token_ids)) <= max(2, len(token_ids) // 8))


def greedy_answers(model, tokenizer, prompts, prefixes, max_new_tokens):
    """Greedy completions (token lists without eos) of prompts under prefixes, and whether each
    ended on eos (False: cut off at max_new_tokens)."""
    out = generate(model, prompts, prefixes, max_new_tokens, temperature=0, stop_tokens=[tokenizer.eos_token_id])
    return [[t for t in ids if t != tokenizer.eos_token_id] for ids in out.token_lists()], out.stopped.tolist()


@torch.no_grad()
def prefix_health(source, model=None, prompts=None, tokenizer=None, L=1, n_prefixes=256,
                  max_new_tokens=32, seed=0):
    """Does the policy get prefixes it can read? Returns (metrics, lines to print).

    Always (no model needed, embedding sources): the mean pairwise cosine of n_prefixes prior
    prefixes, and for a VAE their mean cosine to the corpus-mean direction h_mean. With a model and
    prompts (token id lists): two greedy answers per prompt under two prior draws of L tokens, the
    share of prompts whose answer changes between them, and the share of broken answers. The lines
    end with a warning, saying what to do, when prefixes collapse or break the policy's answers."""
    if source.name == "none":
        return {}, []
    g = torch.Generator().manual_seed(seed)
    health, lines = {}, []
    drawn = source.sample(n_prefixes, 1, g)
    if drawn.is_floating_point():          # text prefixes (token ids) have no geometry of their own
        unit = F.normalize(drawn[:, 0], dim=-1)                                       # (n, d)
        health["prefix_pairwise_cos"] = (unit @ unit.T)[~torch.eye(n_prefixes, dtype=torch.bool)].mean().item()
        line = (f"prefix health ({source.name}): mean pairwise cosine of prior prefixes "
                f"{health['prefix_pairwise_cos']:.3f} (noise: about 0)")
        if isinstance(source, VAEPrefix):
            to_mean = unit @ F.normalize(source.vae.h_mean.float(), dim=0)           # (n,)
            health["prefix_cos_to_corpus_mean"] = to_mean.mean().item()
            line += (f" | cosine to the corpus mean {to_mean.mean().item():.3f} ({to_mean.min().item():.3f} "
                     f"to {to_mean.max().item():.3f}), form {source.vae.prefix_form}")
        lines.append(line)
    if model is not None and prompts:
        device = model.embed_tokens.weight.device
        answers = [greedy_answers(model, tokenizer, prompts, list(source.sample(len(prompts), L, g).to(device)),
                                  max_new_tokens)[0] for _ in range(2)]
        broken = [is_broken(ids, tokenizer.decode(ids, skip_special_tokens=True)) for draw in answers for ids in draw]
        health["frac_answers_change"] = sum(a != b for a, b in zip(*answers)) / len(prompts)
        health["frac_broken"] = sum(broken) / len(broken)
        lines.append(f"prefix health ({source.name}, L = {L}, {len(prompts)} prompts, greedy): answers that "
                     f"change between two prefixes {health['frac_answers_change']:.1%} | broken answers "
                     f"(empty or one repeated token) {health['frac_broken']:.1%}")
    other_form = isinstance(source, VAEPrefix) and source.vae.prefix_form != DEFAULT_PREFIX_FORM
    fix = (f"train the VAE with `train_vae.py --prefix-form {DEFAULT_PREFIX_FORM}` (or set \"prefix_form\": "
           f"\"{DEFAULT_PREFIX_FORM}\" in its vae.json: the form needs no retraining)")
    if health.get("prefix_pairwise_cos", 0.0) > COLLAPSED_COSINE:
        lines.append(f"warning: the prior prefixes collapse to one direction (mean pairwise cosine "
                     f"{health['prefix_pairwise_cos']:.2f} > {COLLAPSED_COSINE}): the policy reads every latent "
                     "as the same token, so the palette cannot steer it; "
                     + (fix if other_form else "retrain the VAE with a smaller --beta, or use another prefix source"))
    if health.get("frac_broken", 0.0) > BROKEN_SHARE:
        lines.append(f"warning: {health['frac_broken']:.0%} of greedy answers under prefixes are broken "
                     f"(> {BROKEN_SHARE:.0%}): the policy cannot read these prefixes; "
                     + (fix if other_form else "try a longer warm-up (sft_warmup.py --steps) or L = 1"))
    return health, lines


@torch.no_grad()
def prefix_sensitivity(model, tokenizer, rows, source, L, template, max_new_tokens):
    """The warm-up's before/after check: greedy pass@1 without prefix (the warm-up must not damage
    the model), with a prefix, and the share of problems whose greedy answer differs between two
    prefixes (does the model read them?); the same two draws before and after training."""
    prompts = [tokenizer(format_prompt(r["problem"], template, tokenizer), add_special_tokens=False)["input_ids"]
               for r in rows]
    device = model.embed_tokens.weight.device
    # a cut-off answer counts 0, as in rl.py and evaluate.py: its last line is wherever the cut fell
    pass1 = lambda answers, stopped: sum(grade(tokenizer.decode(a, skip_special_tokens=True), r["answer"], r["grading_kind"])
                                         * done for a, r, done in zip(answers, rows, stopped)) / len(rows)
    result = {"pass1_no_prefix": pass1(*greedy_answers(model, tokenizer, prompts, None, max_new_tokens))}
    if source.name != "none" and L > 0:
        g = torch.Generator().manual_seed(12345)
        answers = [greedy_answers(model, tokenizer, prompts, list(source.sample(len(rows), L, g).to(device)),
                                  max_new_tokens) for _ in range(2)]
        result["pass1_with_prefix"] = pass1(*answers[0])
        result["frac_differ_between_prefixes"] = sum(a != b for a, b in zip(answers[0][0], answers[1][0])) / len(rows)
    return result


def warmup_notes(warmup, source, L):
    """Lines to print when an RL run gives the policy other prefixes than its warm-up taught it to
    read (warmup: the checkpoint's config.warmup, written by sft_warmup.py, or None)."""
    if source == "none":
        return []
    if warmup is None:
        return [f"note: the policy records no prefix warm-up (sft_warmup.py), so nothing taught it to read "
                f"--prefix-source {source} prefixes"]
    if (warmup["prefix_source"], warmup["L"]) != (source, L):
        return [f"note: the policy was warmed up with --prefix-source {warmup['prefix_source']} --L {warmup['L']}; "
                f"this run gives it {source} prefixes of L = {L}"]
    return []


def training_warnings(history):
    """Cheap checks on rl.py's records so far (one per step, oldest first): the warnings to print
    now. Each fires once, on the step where its condition has held WARN_AFTER steps in a row."""
    def streak(holds):
        window = history[-WARN_AFTER:]
        before = history[-WARN_AFTER - 1] if len(history) > WARN_AFTER else None
        return len(window) == WARN_AFTER and all(map(holds, window)) and (before is None or not holds(before))
    out = []
    if streak(lambda r: r["grad_norm"] == 0):
        out.append(f"warning: the gradient norm has been exactly 0 for {WARN_AFTER} steps: every group's "
                   "rewards are equal (see zero_variance_frac) or every rollout is masked, so nothing is "
                   "learned; try a larger --group-size, other data or a higher --temperature")
    start = [r["reward_mean"] for r in history[:WARN_AFTER]]
    if len(history) >= 2 * WARN_AFTER and sum(start) > 0 and streak(lambda r: r["reward_mean"] == 0):
        out.append(f"warning: the reward has collapsed to 0 for {WARN_AFTER} steps, from "
                   f"{sum(start) / len(start):.3f} at the start: the policy may be diverging; look at "
                   "samples.jsonl and truncated_frac, and try a lower --lr or a --kl-coef")
    return out
