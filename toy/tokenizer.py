"""Character-level tokenizer for the toy world: one token per character of task.CHARSET.

Built with the `tokenizers` library and wrapped in transformers' PreTrainedTokenizerFast,
so a toy checkpoint directory loads with AutoTokenizer like any hub model's.

    id 0 <pad>   id 1 <eos>   id 2 <unk>   ids 3.. the characters of CHARSET in order

No BOS (as in Qwen): a sequence is prompt + completion + <eos>, and encoding never adds
special tokens by itself. decode(encode(s)) == s for every string over CHARSET, spaces
and newlines included: the pre-tokenizer isolates every character (whitespace is not
dropped or merged) and the Fuse decoder joins tokens with nothing in between.

    python -m toy.tokenizer out/tok    # writes tokenizer.json + tokenizer_config.json
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toy.task import CHARSET

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def build_tokenizer(out_dir=None):
    """The toy tokenizer as a PreTrainedTokenizerFast; saved to out_dir if one is given."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARSET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] is any single character, newline included ('.' would skip newlines).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate tokens as they are; no spaces added
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # would rewrite " ," to "," and break round trips
    )
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID)
    if out_dir is not None:
        hf.save_pretrained(out_dir)
    return hf


if __name__ == "__main__":
    import sys
    out = sys.argv[1] if len(sys.argv) > 1 else "toy_tokenizer"
    t = build_tokenizer(out)
    print(f"wrote {out}: vocab {len(t)} (pad {t.pad_token_id}, eos {t.eos_token_id}, unk {t.unk_token_id})")
