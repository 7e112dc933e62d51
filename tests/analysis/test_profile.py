"""``zjax profile``: FLOPs, collectives against ZeRO's theory, memory, timing, MFU, trace, JSON and PNG.

One profile of the tiny GPT (ZeRO-3, remat full, compared against stages 0-2 and remat
none) serves most tests; the CLI runs once in a subprocess.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gpt_helpers import xla_flags
from zjax.errors import ConfigError
from zjax.analysis.hlo import collective_schedule, matmul_flops
from zjax.analysis.profile import profile, write_png

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace")
    return profile(TINY, ["zero.stage=3", "remat.policy=full"], steps=2, trace_dir=trace)


def rows(result, remat):
    return {row["stage"]: row for row in result["compare"] if row["remat"] == remat}


def test_collective_bytes_match_zero_theory_for_stages_1_to_3(result):
    col = result["collectives"]
    assert 0.9 <= col["ratio"] <= 1.1
    assert col["by_kind"]["reduce-scatter"]["bytes"] > 0 and col["by_kind"]["all-gather"]["bytes"] > 0
    by_stage = rows(result, "full")
    for stage in (1, 2, 3):
        assert 0.9 <= by_stage[stage]["ratio"] <= 1.1, (stage, by_stage[stage])
    # stage 3 gathers the scanned layers (85% of the tiny GPT's params) a second time
    assert 1.4 < by_stage[3]["bytes"] / by_stage[2]["bytes"] < 1.5


def test_cpu_collectives_are_reported_synchronous(result):
    by_kind = result["collectives"]["by_kind"]
    assert all(row["async"] == 0 and row["overlapped"] == 0 for row in by_kind.values())
    assert "synchronous" in result["collectives"]["note"]


def test_hardware_flops_count_recomputation(result):
    flops = result["flops"]
    none = rows(result, "none")[3]
    # without remat the compiled dots are exactly the model's matmuls
    assert none["flops"] == pytest.approx(flops["model"], rel=0.01)
    assert flops["hardware"] >= flops["model"]
    assert flops["hardware"] > 1.1 * none["flops"]
    # XLA's cost_analysis counts each scanned layer once: below the real count
    assert flops["xla_cost_analysis"] < flops["hardware"]


def test_memory_breakdown_and_state(result):
    mem = result["memory"]
    assert mem["temp"] > 0 and mem["argument"] > 0
    # ZeRO-3 in fp32: the sharded master and moments measured on device 0 match zjax.analysis.plan's prediction
    for measured, predicted in (("master", "master params"), ("opt_state", "moments")):
        assert mem["state_measured"][measured] == pytest.approx(mem["state_predicted"][predicted], rel=0.02)


def test_timing_and_mfu(result):
    timing = result["timing"]
    assert len(timing["times_s"]) == 2 and timing["median_s"] > 0 and timing["tokens_per_s"] > 0
    assert result["peak"]["per_device"] > 0
    assert 0 < result["mfu"] < 1


def test_recommendations_follow_the_compared_numbers(result):
    recs = result["recommendations"]
    # stage 2 moves 1 - 1/1.42 = 30% fewer bytes than stage 3
    assert any(r.startswith("zero.stage=2") and "30% fewer collective bytes" in r for r in recs), recs
    remat = [r for r in recs if r.startswith("remat.policy=none")]
    assert len(remat) == 1 and "more temp memory" in remat[0] and "fewer hardware FLOPs" in remat[0]


def test_trace_is_written(result):
    files = result["trace"]["files"]
    assert any(f.endswith(".xplane.pb") for f in files)
    assert all(Path(f).stat().st_size > 0 for f in files)


def test_png_is_written(result, tmp_path):
    path = write_png(result, tmp_path / "profile.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


def test_async_collectives_and_dot_flops_from_scheduled_hlo():
    """A GPU-style scheduled module: a gather overlapped by a dot, a wrapped reduce-scatter overlapped
    by a cuBLAS gemm, and a gather and an all-reduce with nothing scheduled in between."""
    text = """HloModule m, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%scatter (q: f32[16,32]) -> f32[2,32] {
  %q = f32[16,32]{1,0} parameter(0)
  ROOT %rs = f32[2,32]{1,0} reduce-scatter(%q), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

ENTRY %main (p0: f32[8,16], p1: f32[16,32]) -> f32[8,32] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,32]{1,0} parameter(1)
  %all-gather-start = (f32[2,32]{1,0}, f32[16,32]{1,0}) all-gather-start(%p1), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %all-gather-start.1 = (f32[1,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%p0), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %all-gather-done.1 = f32[8,16]{1,0} all-gather-done(%all-gather-start.1)
  %dot.1 = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %all-gather-done = f32[16,32]{1,0} all-gather-done(%all-gather-start)
  %all-reduce-start = f32[8,32]{1,0} all-reduce-start(%dot.1), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %all-reduce-done = f32[8,32]{1,0} all-reduce-done(%all-reduce-start)
  %rs-start = ((f32[16,32]{1,0}), f32[2,32]{1,0}) async-start(%p1), calls=%scatter
  %gemm = (f32[8,32]{1,0}, s8[1024]{0}) custom-call(f32[8,16]{1,0} %p0, f32[16,32]{1,0} %all-gather-done), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %out = f32[8,32]{1,0} get-tuple-element(%gemm), index=0
  %rs-done = f32[2,32]{1,0} async-done(%rs-start)
  ROOT %r = f32[8,32]{1,0} add(%all-reduce-done, %out)
}
"""
    assert sorted(collective_schedule(text)) == [
        ("all-gather", True, 0), ("all-gather", True, 1), ("all-reduce", True, 0), ("reduce-scatter", True, 1)]
    # the dot and the cuBLAS gemm: 2 x 8 x 32 x 16 each
    assert matmul_flops(text) == 2 * (2 * 8 * 32 * 16)


def test_bad_steps_is_a_config_error():
    with pytest.raises(ConfigError, match="--steps=0"):
        profile(TINY, steps=0)


def test_cli_writes_json_and_png(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "zjax", "profile", TINY, "--steps", "2", "--no-compare",
         "--json", str(tmp_path / "out.json"), "--png", str(tmp_path / "out.png")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "out.json").read_text())
    assert {"flops", "collectives", "memory", "timing", "mfu", "recommendations"} <= set(data)
    assert 0.9 <= data["collectives"]["ratio"] <= 1.1
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MFU" in out.stdout
