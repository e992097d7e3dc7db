"""Shared fixtures: tiny randomly initialised Hugging Face checkpoints of every supported family.

Run the whole suite with:  python -m pytest -q
"""
import os
import signal
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_finish(session):
    """When tests/test_toy_sh.py is among the tests to run, start its job (TINY=1 bash runs/toy.sh,
    one thread, about 90 s) now, so that it runs beside the tests before it; its fixture waits."""
    if any(item.path.name == "test_toy_sh.py" for item in session.items):
        import shutil
        import tempfile
        import test_toy_sh
        scratch = tempfile.mkdtemp(prefix="pytest-toy-sh-")
        root = os.path.join(scratch, "nanopalette")
        process = test_toy_sh.start_job(root)
        session.config.toy_sh_job = (root, process)
        def stop():                                         # an interrupted session leaves no job behind
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            shutil.rmtree(scratch, ignore_errors=True)
        session.config.add_cleanup(stop)


sys.path.insert(0, REPO)

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # tests never reach a hub
torch.set_num_threads(2)

# Each entry: (name, model_type, extra config). GQA ratios 1, 2 and 4; tied and untied
# embeddings; Qwen2's q/k/v biases; Llama 3 RoPE scaling; Llama with attention_bias.
FAMILIES = {
    "qwen3": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=True)),
    "qwen3_untied_gqa4": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4,
                            tie_word_embeddings=False)),
    "llama3": ("llama", dict(num_attention_heads=4, num_key_value_heads=1,
                             tie_word_embeddings=True, attention_bias=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32})),
}


def make_hf_model(family, seed=0, vocab_size=97, hidden_size=64, layers=2):
    """A tiny transformers model with random weights (non-trivial norms and biases)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, extra = FAMILIES[family]
    extra = dict(extra)
    rope = extra.pop("rope_scaling", None)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=hidden_size,
                                  intermediate_size=4 * hidden_size, num_hidden_layers=layers,
                                  max_position_embeddings=256, rms_norm_eps=1e-6,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    if rope is not None:
        config.rope_parameters = {"rope_theta": 500000.0, **rope}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():   # perturb norms and biases so that wrong wiring shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_toy_model(tokenizer_dir=None, layers=1, context=128, tied=True, std=None, seed=0):
    """(model, tokenizer): a random Qwen3-shaped model over the toy tokenizer (hidden 32, two heads
    of 16 dims sharing one KV head, MLP 64), the stand-in checkpoint of the stage, loader and
    prefix tests. tokenizer_dir: where to save the tokenizer (pass it to save_pretrained too)."""
    from model import ModelConfig, Transformer
    from toy.tokenizer import EOS_ID, PAD_ID, build_tokenizer
    tokenizer = build_tokenizer(tokenizer_dir and str(tokenizer_dir))
    config = ModelConfig(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied,
                         max_position_embeddings=context, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights() if std is None else model.init_weights(std=std)
    return model, tokenizer


def stopping_toy_model(root):
    """tiny_toy_model (2 layers, untied) saved under root/model (tokenizer under root/tokenizer), its
    first embedding dimension set so that about one token in five is eos: runs of it hold both
    stopped and cut-off completions. The model of the RL flag, rank and kill tests."""
    from toy.tokenizer import EOS_ID
    model, tokenizer = tiny_toy_model(root / "tokenizer", layers=2, tied=False)
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS_ID, 0] = 0.5
    model.save_pretrained(str(root / "model"), tokenizer_dir=str(root / "tokenizer"))
    return model, tokenizer


def tiny_float64_model(vocab_size, seed=0, tied=False):
    """A 2-layer float64 model (hidden 16) with weights large enough for peaked, varied
    distributions: for losses and gradients checked against hand computations."""
    from model import ModelConfig, Transformer
    torch.manual_seed(seed)
    config = ModelConfig(model_type="qwen3", vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, tie_word_embeddings=tied, max_position_embeddings=64)
    model = Transformer(config)
    model.init_weights(std=0.3)
    return model.double()


@pytest.fixture(scope="session", params=list(FAMILIES))
def hf_checkpoint(request, tmp_path_factory):
    """(family, directory, transformers model) for each supported family."""
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, str(path), model


# -- the stages' tiny trained world (tests/test_stages.py, tests/test_fsdp.py) ----------------------

@pytest.fixture(scope="session")
def stages_world(tmp_path_factory):
    """A tiny world: char tokenizer, 2-digit addition data, a 2-layer model pretrained for 400
    steps (greedy pass@1 about 30%, so RL has reward to start from and room above), a VAE."""
    from common import RunDir
    from model import ModelConfig, Transformer
    from toy import build_world
    from toy.task import generate as toy_rows, write_jsonl
    from toy.tokenizer import EOS_ID, PAD_ID, build_tokenizer
    root = tmp_path_factory.mktemp("world")
    tokenizer = build_tokenizer(str(root / "tokenizer"))
    rows = toy_rows("math", 3000, seed=1, digits=2)
    write_jsonl(rows, str(root / "math_train.jsonl"))
    write_jsonl(toy_rows("math", 40, seed=2, digits=2, exclude={r["problem"] for r in rows}),
                str(root / "math_test.jsonl"))
    for domain in ("math", "code", "qa"):
        write_jsonl(toy_rows(domain, 150, seed=3), str(root / f"vae_{domain}.jsonl"))
    torch.manual_seed(0)
    config = ModelConfig(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         max_position_embeddings=256, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model = Transformer(config)
    model.init_weights()
    args = build_world.parse_args(["--out", str(root), "--steps", "400", "--warmup", "20"])
    # one thread: as fast for a model this small, and undisturbed by test_toy_sh's job on the other core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    build_world.train(model, build_world.encode_examples(rows, tokenizer), args, RunDir(str(root / "pretrain"), args))
    torch.set_num_threads(threads)
    model.save_pretrained(str(root / "base"), tokenizer_dir=str(root / "tokenizer"))
    run_script("train_vae.py", "--model", root / "base", "--out", root / "vae", "--steps", "300",
               "--data", ",".join(f"{d}={root}/vae_{d}.jsonl" for d in ("math", "code", "qa")), threads=1)
    return root


def run_script(script, *args, nproc=None, check=True, threads=2):
    cmd = [sys.executable, os.path.join(REPO, script)] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         os.path.join(REPO, script)]
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc else str(threads), PYTHONPATH=REPO)
    result = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and least disturbed by other processes, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
