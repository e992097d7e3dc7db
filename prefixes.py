"""The prefix sources beyond none, vae and noise (model.py), off the reading path: model.prefix_class
imports this file only when a run names one of them. Each is a PrefixSource (model.py)."""

import torch
import torch.nn as nn

from common import UserError, note_unused, print0, ranged
from model import PREFIX_SOURCES, PrefixSource, prefix_class

class RandomDecoderPrefix(PrefixSource):
    """An untrained small decoder from L noise vectors to L embeddings; its weights come from the seed."""
    name, norm = "random_decoder", "token"
    summary = "noise through an untrained small decoder (the paper's VLM variant)"

    def __init__(self, E, tie=False, seed=0, width=64, layers=2, **context):
        super().__init__(E, tie)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=torch.Generator().manual_seed(seed))))
            block = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0,
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False).eval()
            self.out = nn.Linear(width, self.dim)

    def _draw(self, n, L, generator):
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        return self._to_token_norm(self.out(self.blocks(self._noise(n, L, self.out.in_features, generator),
                                                        mask=causal, is_causal=True)))

class RSPPrefix(PrefixSource):
    """Random soft prompts (RSP, arXiv 2605.11936), not rescaled: a typical embedding row's norm, not the mean one."""
    name, norm = "rsp", "table"
    summary = "random soft prompts: entries drawn with the embedding table's mean and variance"

    def __init__(self, E, tie=False, **context):
        super().__init__(E, tie)
        self.mean, self.std = E.float().mean().item(), E.float().std().item()

    def _draw(self, n, L, generator):
        return self.mean + self.std * self._noise(n, L, self.dim, generator)

# Pseudo-Latin, lower case only: every character is also a token of the toy world's character-level tokenizer
LOREM_WORDS = tuple("""
lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore
et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip
ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum eu fugiat
nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt
mollit anim id est laborum curabitur pretium tincidunt lacus gravida orci a odio nullam
varius turpis egestas mauris vitae ultricies leo integer malesuada nunc vel risus viverra
maecenas accumsan lacinia quam pellentesque habitant morbi tristique senectus netus fames ac
""".split())
LOREM_BOUNDARY = "\n\nignore the text above. solve the problem below.\n\n"

class LoremPrefix(PrefixSource):
    """Real text as a prefix (LoPE, arXiv 2605.05566): L tokens of pseudo-Latin, then LOREM_BOUNDARY, before the
    whole prompt (and any chat markers), embedded like it: the prompt's own ids do not change. Words come from the
    caller's torch generator (python-lorem's global random would not resume exactly)."""
    name, tieable = "lorem", False
    summary = "L tokens of pseudo-Latin text, then a boundary instruction (LoPE's perturbation)"

    def __init__(self, E, tokenizer=None, **context):
        super().__init__(E)
        if tokenizer is None:
            raise UserError("prefix source 'lorem' needs the policy's tokenizer (its prefixes are text)")
        self.encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        self.boundary_ids = self.encode(LOREM_BOUNDARY)

    def rows(self, L):
        return L + len(self.boundary_ids) if L else 0

    def _draw(self, n, L, generator):   # n texts of L words (at least L tokens); ". " after ~1 in 8, ", " 1 in 12
        words = torch.randint(len(LOREM_WORDS), (n, L), generator=generator).tolist()     # (n, L)
        marks = torch.rand(n, L, generator=generator).tolist()                              # (n, L)
        end = lambda m: ". " if m < 1 / 8 else ", " if m < 1 / 8 + 1 / 12 else " "
        texts = ["".join(LOREM_WORDS[w] + end(m) for w, m in zip(ws, ms)).rstrip() for ws, ms in zip(words, marks)]
        return torch.tensor([self.encode(t)[:L] + self.boundary_ids for t in texts])     # L tokens, the boundary

SOURCES = {cls.name: cls for cls in (RandomDecoderPrefix, RSPPrefix, LoremPrefix)}

def add_prefix_arguments(parser, L_help, source="vae"):   # the palette's flags of sft_warmup.py, infer.py, evaluate.py
    parser.add_argument("--prefix-source", default=source, choices=PREFIX_SOURCES, help="; ".join(
        f"{name}: {prefix_class(name).summary}" for name in PREFIX_SOURCES))
    parser.add_argument("--vae", default=None, help="directory written by train_vae.py")
    parser.add_argument("--region", default=None, help="sample z from this domain's region of the VAE, not the prior")
    parser.add_argument("--L", type=ranged(int, 0), default=1, help=L_help)
    parser.add_argument("--tie", action="store_true", help="one draw repeated L times instead of L draws")

def check_prefix(args, parser, unused):     # a note for each flag without effect (unused: {dest: why}); the checks
    none = dict.fromkeys(("L", "tie", "vae", "region"), "--prefix-source none draws no prefix")
    note_unused(args, parser, unused | (none if args.prefix_source == "none" else {}))
    check_prefix_sources([("--prefix-source", args.prefix_source)], args.vae, args.region, args.tie, args.L)

def check_prefix_sources(used, vae, region, tie, L=2):
    """used: (flag, source name) of every source a run draws, the longest L prefix tokens. A source without
    what it needs is refused; a flag none of them can use gets a one-line note."""
    if (needy := [f"{flag} {name}" for flag, name in used if prefix_class(name).needs_vae]) and vae is None:
        raise UserError(f"{needy[0]} needs --vae DIR (a directory written by train_vae.py)")
    notes = [tie and L <= 1 and f"--tie repeats one draw over the L prefix vectors, and --L is {L}",
             tie and not any(prefix_class(name).tieable for _, name in used) and "no source here draws vectors to tie",
             vae is not None and not needy and "--vae: no prefix source of this run reads a VAE",
             region is not None and not needy and "--region: regions are areas of a VAE source's latent space"]
    for why in filter(None, notes):
        print0(f"note: a flag has no effect here ({why})")
