"""bench/benchmark.py end to end on the tiny shape: gate, a timed workload with its roofline shares, a profile.

Timings are not asserted (BENCHMARKS.md: benchmarks are not tests); what is checked is that the run is
honest: the gate compares with transformers, every record has both libraries, the estimates are in range.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchmark import main  # noqa: E402  (bench/ is not part of the package)


def test_tiny_bench_runs_the_gate_a_workload_and_a_profile(capsys):
    assert main(["--shape", "tiny", "--workloads", "W3,W5", "--batch", "2", "--new-tokens", "4", "--runs", "1",
                 "--profile"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    stages = {rec["stage"]: rec for rec in lines}
    assert stages["gate"]["greedy_tokens_identical"] and stages["gate"]["first_token_logits_max_abs_diff"] < 1e-4
    assert stages["probe"]["copy_gb_s"] > 0 and stages["probe"]["gemm_tflop_s"] > 0
    w3 = stages["W3"]
    for field in ("ttft_ms", "decode_tok_s", "decode_gb_s", "prefill_tflop_s", "decode_share_of_copy_bw"):
        assert set(w3[field]) == {"ours", "transformers"}, field
    # tiny shape: 2 layers of 256 (+ MLP 512) and a 32064 x 256 fp32 head are ~40 MB per decode step
    assert 0.03 < w3["decode_step_gb"] < 0.05
    assert w3["prefill_tflop"] > 0
    assert stages["W5_b2"]["batch"] == 2 and set(stages["W5_b2"]["prefill_tflop_s"]) == {"ours", "transformers"}
    for label in ("W1_prefill", "W1_decode", "W5_b2_prefill", "W5_b2_decode"):
        assert stages[f"profile_{label}"]["ms_by_kind"]["gemm"] > 0 and stages[f"profile_{label}"]["top"], label


def test_sampled_bench_gates_on_seeded_tokens_and_w6_checks_prefix_reuse(capsys):
    assert main(["--shape", "tiny", "--workloads", "W3,W6", "--new-tokens", "4", "--runs", "1", "--sample"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    stages = {rec["stage"]: rec for rec in lines}
    assert stages["gate"]["sampled_tokens_identical"] and "W3_sampled" in stages
    assert stages["W6"]["reuse_prefix_tokens_identical"] and stages["W6"]["seconds"]["ours_reuse_prefix"] > 0
