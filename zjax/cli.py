"""``zjax`` command line: ``zjax train CONFIG [key=value ...]``, ``zjax config explain``,
``zjax plan``, ``zjax profile``, ``zjax report``, and ``zjax generate`` / ``zjax serve`` (a
trained run, a safetensors export or a Hugging Face directory).

On CPU, zjax simulates 8 devices unless XLA_FLAGS sets a count, so ZeRO sharding runs
on a laptop. XLA reads the flag when JAX creates its CPU backend on first use, so
``main`` sets it before anything touches a device.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from zjax.distributed import DEVICE_COUNT_FLAG, SIMULATED_CPU_DEVICES
from zjax.errors import CheckpointError, ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "base.yaml"  # package data: every default

EPILOG = (
    f"On CPU, zjax simulates {SIMULATED_CPU_DEVICES} devices unless XLA_FLAGS sets a count "
    f"(e.g. XLA_FLAGS={DEVICE_COUNT_FLAG}=1)."
)


def main(argv: list[str] | None = None) -> int:
    """Runs the ``zjax`` command; returns 0, or exits with status 2 on a config error."""
    simulate_cpu_devices()
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow an option (``train CFG --local-processes 2 steps=5``)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        args.command(args)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return 0


def simulate_cpu_devices(environ=os.environ) -> None:
    """Asks XLA for 8 host devices unless XLA_FLAGS names a count or JAX_PLATFORMS excludes CPU."""
    flags = environ.get("XLA_FLAGS", "")
    platforms = environ.get("JAX_PLATFORMS", "")
    if DEVICE_COUNT_FLAG in flags or platforms not in ("", "cpu"):
        return
    environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={SIMULATED_CPU_DEVICES}".strip()


def train(args: argparse.Namespace) -> None:
    # Until train_run takes SIGTERM/SIGINT over (it saves the newest step), a signal ends the
    # command at once: nothing has trained yet, so nothing is lost.
    previous = {sig: signal.signal(sig, _stop_before_training) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        from zjax.config.schema import load_config
        from zjax.distributed import initialize, launch_local

        cfg = load_config(args.config, args.overrides)
        if args.local_processes is not None:
            sys.exit(launch_local(["train", args.config, *args.overrides], args.local_processes))
        # Before anything touches a device: a multi-host job joins its peers here.
        initialize()
        from zjax.train.loop import train_run

        train_run(cfg)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_before_training(signum, frame):
    # An exception raised here could land inside an extension's import and be reported as an
    # ImportError; nothing is open for writing yet, so the process ends here.
    sys.stderr.write(f"stopped by {signal.Signals(signum).name} before training started; nothing new to save\n")
    sys.stderr.flush()
    os._exit(0)


def explain(args: argparse.Namespace) -> None:
    from zjax.config.schema import load_config

    # The ignored keys are printed below; the loader's warning would repeat them.
    logging.getLogger("zjax").setLevel(logging.ERROR)
    cfg = load_config(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    # Comments, so the output stays a config that load_config reads back.
    if cfg.deepspeed_mapping:
        print("# DeepSpeed keys and what they became:")
        for key, became in cfg.deepspeed_mapping:
            print(f"#   {key}: {became}")
    if cfg.ignored:
        print("# DeepSpeed keys zjax ignores:")
        for key, reason in cfg.ignored:
            print(f"#   {key}: ignored ({reason})")


def export(args: argparse.Namespace) -> None:
    from zjax.export import export_safetensors

    path = export_safetensors(args.directory, args.to, step=args.step)
    print(f"wrote {path}")


def rlhf(args: argparse.Namespace) -> None:
    from zjax.config.schema import load_config
    from zjax.distributed import initialize

    cfg = load_config(args.config, args.overrides)
    initialize()
    from zjax.rlhf.run import rlhf_run

    summary = rlhf_run(args.mode, cfg)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()
             if k in ("steps", "loss", "eval_loss", "eval_accuracy", "score", "kl", "response_length")}
    print(f"rlhf {args.mode}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))


def compress_clean(args: argparse.Namespace) -> None:
    from zjax.compression.clean import clean_checkpoint

    result = clean_checkpoint(args.checkpoint, args.to, step=args.step, config=args.config)
    model = result["model"]
    print(f"wrote {Path(args.to) / 'model.safetensors'} and config.yaml: {result['before']:,} -> {result['after']:,} "
          f"parameters (d_ff {model['d_ff']}, n_heads {model['n_heads']}, n_kv_heads {model['n_kv_heads']})")


def plan(args: argparse.Namespace) -> None:
    import json

    from zjax.analysis.plan import fit, format_fit, format_plan, plan as make_plan

    if args.fit is not None:
        if args.params is not None or args.devices is not None:
            raise ConfigError(
                f"--fit={args.fit} compiles the config's model on the visible devices; drop --params/--devices "
                "(set XLA_FLAGS=--xla_force_host_platform_device_count=N to simulate N CPU devices)"
            )
        result = fit(args.config, args.overrides, budget=args.fit)
        print(json.dumps(result.to_json(), indent=2) if args.json else format_fit(result))
        return
    result = make_plan(args.config, args.overrides, params=args.params, devices=args.devices)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_plan(result))


def report(args: argparse.Namespace) -> None:
    import json

    from zjax.analysis.report import format_report, report as make_report

    result = make_report()
    print(json.dumps(result, indent=2) if args.json else format_report(result))


def profile(args: argparse.Namespace) -> None:
    import json

    from zjax.analysis.profile import format_profile, profile as make_profile, write_png

    result = make_profile(args.config, args.overrides, steps=args.steps, trace_dir=args.trace,
                          compare=not args.no_compare)
    print(format_profile(result))
    out = result["config"]["output_dir"]
    json_path = args.json or (Path(out) / "profile.json" if out else None)
    png_path = args.png or (Path(out) / "profile.png" if out else None)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
        print(f"wrote {json_path}")
    if png_path:
        print(f"wrote {write_png(result, png_path)}")


def generate(args: argparse.Namespace) -> None:
    from zjax.inference.sampling import SamplingParams

    engine = _engine(args)
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode(args.prompt)
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  max_tokens=args.max_tokens, seed=args.seed,
                                  stop_token_ids=tokenizer.eos_token_ids)
        engine.add_request(prompt, sampling)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    detokenizer = tokenizer.detokenizer(prompt)
    while engine.has_unfinished():
        for out in engine.step():
            print(detokenizer.add(out.token_ids), end="", flush=True)
    print(detokenizer.flush())


def serve(args: argparse.Namespace) -> None:
    # Until the server takes SIGTERM/SIGINT over, a signal ends the command at once: nothing is served yet.
    previous = {sig: signal.signal(sig, _stop_before_serving) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        from zjax.inference.server import serve as run_server

        engine = _engine(args)
        try:
            run_server(engine, args.host, args.port, model_name=args.model_name or _model_name(Path(args.source)),
                       max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout)
        except OSError as err:
            raise ConfigError(f"--host {args.host} --port {args.port}: {err}") from None
        except ValueError as err:  # the server's argument errors (--max-queue)
            raise ConfigError(str(err)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _model_name(source: Path) -> str:
    """The model id to list: the run's, the file's or the Hugging Face directory's name."""
    source = source.resolve()
    if source.name == "checkpoints":
        source = source.parent
    return source.stem if source.is_file() else source.name


def _stop_before_serving(signum, frame):
    sys.stderr.write(f"stopped by {signal.Signals(signum).name} before serving started\n")
    sys.stderr.flush()
    os._exit(0)


def _engine(args: argparse.Namespace):
    """The engine for SOURCE: a run's output_dir or checkpoints directory, a .safetensors
    export (its shape from --config), or a Hugging Face directory; quantized with --quantize."""
    from zjax.checkpoint import load_params
    from zjax.compression.distill import student_params
    from zjax.config.schema import load_config
    from zjax.export import load_safetensors
    from zjax.inference.engine import Engine, _run_config
    from zjax.inference.hf import load_hf
    from zjax.inference.tokenizer import TOKENIZER_FILE, load_tokenizer

    source = Path(args.source)
    rules = None
    if source.is_file() and source.suffix == ".safetensors":
        if args.config is None:
            raise ConfigError(f"SOURCE {source} is a safetensors export, which does not record the model's shape; "
                              "pass --config CONFIG (the run's config, e.g. OUTPUT_DIR/config.yaml)")
        cfg = load_config(args.config)
        model_cfg, rules, params = cfg.model, cfg.logical_axis_rules, load_safetensors(source)
        places = [source.parent]
    elif (source / "config.json").is_file():  # transformers' save_pretrained; a zjax run writes config.yaml
        model_cfg, params = load_hf(source, args.dtype, max_seq_len=args.max_seq_len)
        places = [source]
    elif source.is_dir():
        checkpoints = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        cfg = _run_config(checkpoints, args.config, args.step)
        # a distillation run's checkpoint holds the student and its teacher: serve the student
        params = student_params(load_params(checkpoints, args.step))
        model_cfg, rules = cfg.model, cfg.logical_axis_rules
        places = [source, checkpoints]
    else:
        raise ConfigError(f"SOURCE {source} is neither a directory nor a .safetensors file; give a run's "
                          "output_dir, its checkpoints directory, a .safetensors export (with --config) or a "
                          "Hugging Face directory (config.json, *.safetensors)")
    tokenizer_dir = next((place for place in places if (place / TOKENIZER_FILE).is_file()), None)
    try:
        if args.quantize != "none":
            from zjax.inference.quant import quantize_params
            from zjax.models.gpt import fuse_lora

            params = quantize_params(fuse_lora(params, model_cfg), args.quantize, group_size=args.group_size)
        return Engine.from_params(params, model_cfg, tensor=args.tensor, dtype=args.dtype,
                                  max_seq_len=args.max_seq_len, max_seqs=args.max_seqs, token_budget=args.token_budget,
                                  logical_axis_rules=rules,
                                  tokenizer=load_tokenizer(tokenizer_dir, model_cfg.vocab_size))
    except ValueError as err:  # the engine's and quantizer's argument errors
        raise ConfigError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zjax", description="DeepSpeed for JAX: ZeRO training from one config.", epilog=EPILOG
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser(
        "train", help="train the reference GPT on a config", epilog=EPILOG,
        description="Train the reference GPT on the Python stdlib's bytes; "
        "steps=N and output_dir=DIR are config keys like any other.",
    )
    _add_config_args(run)
    run.add_argument("--local-processes", type=int, default=None, metavar="P",
                     help="run as P local processes joined on 127.0.0.1, the simulated devices split "
                     "between them (tests multi-host behaviour on one machine)")
    run.set_defaults(command=train)

    out = commands.add_parser(
        "export", help="write a checkpoint's params to a safetensors file",
        description="Stream the fp32 master params of a checkpoint into a .safetensors file, "
        "one tensor at a time.",
    )
    out.add_argument("directory", metavar="DIR", help="a run's output_dir or its checkpoints directory")
    out.add_argument("--to", required=True, metavar="FILE", help="the .safetensors file to write")
    out.add_argument("--step", type=int, default=None, help="the step to export (default: newest intact)")
    out.set_defaults(command=export)

    post = commands.add_parser(
        "rlhf", help="post-training: sft, reward model, ppo, dpo, grpo", epilog=EPILOG,
        description="DeepSpeed-Chat's steps and DPO/GRPO on JSONL data (rlhf.data): sft ({prompt, response}), "
        "reward and dpo ({prompt, chosen, rejected}), ppo and grpo ({prompt}; scored by rlhf.reward_model or "
        "rlhf.reward_fn). Each run's output_dir is the next one's rlhf.actor / rlhf.reward_model.",
    )
    post.add_argument("mode", choices=("sft", "reward", "ppo", "dpo", "grpo"), metavar="MODE",
                      help="sft | reward | ppo | dpo | grpo")
    _add_config_args(post)
    post.set_defaults(command=rlhf)

    comp = commands.add_parser("compress", help="compression: make a pruned model physically smaller")
    comp_commands = comp.add_subparsers(dest="compress_command", required=True, metavar="COMMAND")
    clean = comp_commands.add_parser(
        "clean", help="drop pruned feed-forward features and heads (redundancy_clean)",
        description="Read a run trained with row/head pruning (compression.row_pruning, head_pruning), drop the "
        "features and heads whose weights are zero, and write DIR/model.safetensors and DIR/config.yaml (smaller "
        "d_ff, n_heads, n_kv_heads); `zjax generate DIR/model.safetensors --config DIR/config.yaml` serves it.",
    )
    clean.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's output_dir or its checkpoints directory")
    clean.add_argument("--to", required=True, metavar="DIR", help="the directory to write")
    clean.add_argument("--step", type=int, default=None, help="the step to clean (default: newest intact)")
    clean.add_argument("--config", default=None, metavar="CONFIG",
                       help="the run's config (default: config.yaml beside the checkpoints, or the checkpoint's)")
    clean.set_defaults(command=compress_clean)

    mem = commands.add_parser(
        "plan", help="per-device memory of every ZeRO stage, predicted and compiled", epilog=EPILOG,
        description="Per-device memory of ZeRO stages 0-3 in the ZeRO paper's accounting and zjax's; "
        "without --params the reference GPT's step is compiled for each stage and its memory_analysis "
        "shown against the prediction.",
    )
    mem.add_argument("config", metavar="CONFIG", nargs="?", default=str(DEFAULT_CONFIG),
                     help="a zjax YAML or a DeepSpeed JSON config (default: every default, zjax/base.yaml)")
    mem.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. zero.stage=1 remat.policy=full"
    )
    mem.add_argument("--params", type=float, default=None, metavar="N",
                     help="plan for N parameters instead of the config's model (analytic, nothing compiled)")
    mem.add_argument("--devices", type=int, default=None, metavar="N",
                     help="data-parallel devices (default: the visible devices)")
    mem.add_argument("--fit", default=None, metavar="BYTES",
                     help="find the cheapest setting (lowest stage, lightest remat, largest micro-batch) whose "
                     "compiled step fits BYTES per device, e.g. 2e9, 2GB or 512MiB; compiles, runs nothing")
    mem.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mem.set_defaults(command=plan)

    info = commands.add_parser(
        "report", help="versions, backend, devices, kernel support (like ds_report)", epilog=EPILOG,
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(command=report)

    prof = commands.add_parser(
        "profile", help="FLOPs, collectives, memory, step time and MFU of a config's step", epilog=EPILOG,
        description="Compile and run the reference GPT's step: model and hardware FLOPs, collectives "
        "against ZeRO's theory, memory breakdown, median step time, tokens/s and MFU; then compile the "
        "other ZeRO stages and another remat policy and recommend what the numbers support.",
    )
    _add_config_args(prof)
    prof.add_argument("--steps", type=int, default=5, metavar="N", help="timed steps after one warm-up (default 5)")
    prof.add_argument("--trace", default=None, metavar="DIR",
                      help="write a jax.profiler trace of a few more steps to DIR (TensorBoard, Perfetto)")
    prof.add_argument("--json", default=None, metavar="PATH",
                      help="write the profile as JSON (default: OUTPUT_DIR/profile.json when output_dir is set)")
    prof.add_argument("--png", default=None, metavar="PATH",
                      help="write bar charts (default: OUTPUT_DIR/profile.png when output_dir is set)")
    prof.add_argument("--no-compare", action="store_true",
                      help="skip compiling the other ZeRO stages and remat policy (and the recommendations)")
    prof.set_defaults(command=profile)

    gen = commands.add_parser(
        "generate", help="generate text from a trained model or a Hugging Face checkpoint", epilog=EPILOG,
        description="Generate a completion of --prompt with zjax's serving engine and print it as it comes.",
    )
    _add_source_args(gen)
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the text to complete")
    gen.add_argument("--max-tokens", type=int, default=64, metavar="N", help="new tokens at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (default 0: off)")
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="the sampling seed (default: random)")
    gen.set_defaults(command=generate)

    srv = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", epilog=EPILOG,
        description="Serve /v1/completions and /v1/chat/completions (streaming with server-sent events), "
        "/v1/models and /health until SIGTERM or Ctrl-C, then finish the requests in flight and exit 0.",
    )
    _add_source_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, metavar="P", help="the port (default 8000; 0 = any free one)")
    srv.add_argument("--max-queue", type=int, default=64, metavar="N",
                     help="requests in flight beyond which a request gets HTTP 503 (default 64)")
    srv.add_argument("--model-name", default=None, metavar="NAME",
                     help="the model id the API lists (default: SOURCE's name)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                     help="seconds the requests in flight get to finish on SIGTERM before they are aborted")
    srv.set_defaults(command=serve)

    config = commands.add_parser("config", help="inspect a config")
    config_commands = config.add_subparsers(required=True, metavar="COMMAND")
    show = config_commands.add_parser(
        "explain", help="print the effective config and what each DeepSpeed key became",
        description="Print the effective, validated config as YAML, then each DeepSpeed key with the "
        "zjax key and value it became (DeepSpeed defaults included), and the DeepSpeed keys zjax ignores and why.",
    )
    _add_config_args(show)
    show.set_defaults(command=explain)
    return parser


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="a run's output_dir or checkpoints directory, a .safetensors export (with --config), "
                        "or a Hugging Face directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--config", default=None, metavar="CONFIG",
                        help="the run's config: required for a .safetensors export; for a checkpoint the default is "
                        "the config.yaml beside it")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: newest intact)")
    parser.add_argument("--tensor", type=int, default=1, metavar="T", help="tensor-parallel devices (default 1)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights and activations (default float32)")
    parser.add_argument("--quantize", default="none", choices=("none", "int8", "w8a8", "int4"),
                        help="quantize the matmul weights: int8 weight-only, int8 weights and activations, or "
                        "int4 groups (default none)")
    parser.add_argument("--group-size", type=int, default=128, metavar="G",
                        help="int4's rows per scale; must divide d_model and d_ff (default 128)")
    parser.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                        help="the longest prompt + completion (default: the model's; the KV cache holds --max-seqs "
                        "of them, so give less for a long-context Hugging Face model)")
    parser.add_argument("--max-seqs", type=int, default=8, metavar="N", help="sequences generated at once (default 8)")
    parser.add_argument("--token-budget", type=int, default=64, metavar="N",
                        help="tokens per pass: decode tokens plus prompt chunks (default 64; at least --max-seqs)")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="a zjax YAML or a DeepSpeed JSON config")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. zero.stage=1 steps=50"
    )
