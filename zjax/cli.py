"""``zjax`` command line: ``zjax train CONFIG [key=value ...]``, ``zjax config explain``,
``zjax plan``, ``zjax profile`` and ``zjax report``.

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


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="a zjax YAML or a DeepSpeed JSON config")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. zero.stage=1 steps=50"
    )
