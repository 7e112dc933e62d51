"""``zjax generate`` and ``zjax serve``: generate prints the engine's text for a checkpoint, a safetensors
export (quantized too) and a Hugging Face directory with its tokenizer.json; bad sources are clean
errors; a served model answers over HTTP and exits 0 on SIGTERM."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

import zjax
from gpt_helpers import xla_flags
from zjax.checkpoint import Checkpointer
from zjax.cli import main
from zjax.export import export_safetensors
from zjax.inference.engine import Engine
from zjax.inference.hf import model_config_from_hf
from zjax.inference.quant import quantize_params
from zjax.inference.sampling import SamplingParams
from zjax.inference.tokenizer import ByteTokenizer, HFTokenizer
from zjax.models import gpt_loss, make_gpt

TIMEOUT = 60
PROMPT = "Once upon"
WORDS = ["[UNK]", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog"]
HF_CONFIG = dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run's output_dir (checkpoint and config.yaml), its safetensors export and its config."""
    out = tmp_path_factory.mktemp("run")
    cfg = zjax.load_config("configs/tiny.yaml", ["zero.stage=0", f"output_dir={out}"])
    state = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model), devices=jax.devices()[:1]).init()
    saver = Checkpointer(out / "checkpoints")
    saver.save(1, state, config=cfg)
    saver.close()
    (out / "config.yaml").write_text(cfg.to_yaml())
    return out, export_safetensors(out, out / "model.safetensors"), cfg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Llama-style directory written by hand: config.json, model.safetensors, a word-level tokenizer.json."""
    directory = tmp_path_factory.mktemp("hf")
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    cfg = model_config_from_hf(HF_CONFIG)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(make_gpt(cfg, seed=3), nnx.Param)))
    blocks = params["blocks"]
    tensors = {"model.embed_tokens.weight": params["embedding"], "model.norm.weight": params["final_norm"]["scale"]}
    for i in range(cfg.n_layers):
        layer = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            tensors[f"{layer}self_attn.{name}_proj.weight"] = blocks["attn"][f"w{name}"][i].T
        for name in ("gate", "up", "down"):
            tensors[f"{layer}mlp.{name}_proj.weight"] = blocks["mlp"][f"w_{name}"][i].T
        tensors[f"{layer}input_layernorm.weight"] = blocks["attn_norm"]["scale"][i]
        tensors[f"{layer}post_attention_layernorm.weight"] = blocks["mlp_norm"]["scale"][i]
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(directory / "model.safetensors"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return directory


def engine_text(engine, prompt, max_tokens, **sampling):
    """What the engine alone generates after ``prompt``, as the continuation of the prompt's text."""
    tok = engine.tokenizer
    ids = tok.encode(prompt)
    new = engine.generate([ids], SamplingParams(max_tokens=max_tokens, stop_token_ids=tok.eos_token_ids,
                                                **sampling))[0].token_ids
    return tok.decode(ids + new)[len(tok.decode(ids)):]


def generate(capsys, *args):
    assert main(["generate", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_generate_from_a_checkpoint_and_its_safetensors_export(capsys, run):
    out, exported, cfg = run
    expected = engine_text(Engine.from_checkpoint(out), PROMPT, 12, temperature=0.9, seed=4)
    sampled = ["--prompt", PROMPT, "--max-tokens", 12, "--temperature", 0.9, "--seed", 4]
    assert generate(capsys, out, *sampled) == expected + "\n"
    assert generate(capsys, out / "checkpoints", "--step", 1, *sampled) == expected + "\n"
    assert generate(capsys, exported, "--config", out / "config.yaml", *sampled) == expected + "\n"


def test_generate_quantized_equals_the_engine_on_quantized_params(capsys, run):
    out, exported, cfg = run
    params = Engine.from_checkpoint(out).params
    engine = Engine.from_params(quantize_params(jax.tree.map(np.asarray, params), "int8"), cfg.model,
                                tokenizer=ByteTokenizer())
    expected = engine_text(engine, PROMPT, 10)
    assert generate(capsys, out, "--prompt", PROMPT, "--max-tokens", 10, "--quantize", "int8") == expected + "\n"


def test_generate_from_a_hugging_face_directory_uses_its_tokenizer(capsys, hf_dir):
    engine = Engine.from_hf(hf_dir)
    assert isinstance(engine.tokenizer, HFTokenizer) and engine.tokenizer.eos_token_ids == (1,)
    expected = engine_text(engine, "the cat sat on", 6)
    assert expected.strip() and set(expected.split()) <= set(WORDS)
    assert generate(capsys, hf_dir, "--prompt", "the cat sat on", "--max-tokens", 6) == expected + "\n"


@pytest.mark.parametrize("args,says", [
    (["nowhere"], "neither a directory nor a .safetensors file"),
    (["{exported}"], "pass --config CONFIG"),
    (["{out}", "--tensor", "99"], "tensor=99 needs 99 devices"),
    (["{out}", "--max-tokens", "500"], "above max_seq_len=64"),
    (["{out}", "--quantize", "int4", "--group-size", "48"], "group_size"),
])
def test_bad_sources_and_options_are_clean_errors(capsys, run, args, says):
    out, exported, _ = run
    args = [a.format(out=out, exported=exported) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *args, "--prompt", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_serve_answers_and_exits_0_on_sigterm(run):
    out, exported, _ = run
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    server = subprocess.Popen(
        [sys.executable, "-m", "zjax", "serve", str(exported), "--config", str(out / "config.yaml"), "--port", "0",
         "--max-seqs", "2", "--model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=TIMEOUT)
        assert line.startswith("serving tiny on http://127.0.0.1:"), line
        url = line.split()[3]
        request = urllib.request.Request(f"{url}/completions", data=json.dumps(
            {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 5
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=TIMEOUT) == 0
        assert "Traceback" not in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=TIMEOUT)
