"""``bench/gpu.py --toy``: the GPU benchmark's whole code path at toy size on the CPU, so it cannot rot
between the runs on a GPU machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_the_toy_run_builds_times_serves_batches_and_checks_equivalence(tmp_path):
    spec = importlib.util.spec_from_file_location("kiln_bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--toy", "--models", "schnell", "--runs", "2", "--batch", "1,2",
                              "--workdir", str(tmp_path), "--no-write"])
    finally:
        torch.set_num_threads(threads)
    assert results["toy"] and results["device"] == "cpu" and results["machine"]["packages"]["torch"]
    model = results["models"]["schnell"]
    assert model["size"] == [64, 64] and model["steps"] == 4
    eager, native = model["eager"], model["native"]
    assert len(eager["runs"]) == 2 and eager["transformer_calls"] == 4 and eager["flops_per_image"] > 0
    assert all(run["stages"]["denoise"] > 0 and run["stages"]["decode"] > 0 for run in eager["runs"])
    engine = native["engine"]
    assert len(engine["runs"]) == 2 and engine["optimizations"]["text_cache"]["status"] == "applied"
    assert engine["latent_rel_errors"] and max(engine["latent_rel_errors"]) <= native["tolerance"]
    assert all(run["stages"]["text"] < 1.0 for run in engine["cached_prompt_runs"])  # served by the text cache
    http = native["http"]["runs"]
    assert len(http) == 2 and all(r["bytes"] > 0 and r["stages"]["server_generate"] > 0 for r in http)
    assert sorted(native["batch"]) == [1, 2] and all(row["images_per_s"] > 0 for row in native["batch"].values())
    assert not list(tmp_path.iterdir()), "the built checkpoint was not removed"


def test_the_full_size_configurations_have_the_published_parameter_counts():
    """Built on the meta device (no memory): a typo in a published configuration would show here."""
    import sys

    sys.path.append(str(BENCH.parent))
    import _architectures as arch

    with arch._creating(torch.device("meta"), torch.bfloat16):
        schnell, zimage = arch._flux(dev=False, toy=False), arch._zimage(toy=False)

    def billions(module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e9

    assert 11.85 < billions(schnell.transformer) < 11.95  # "12B"
    assert 4.7 < billions(schnell.text_encoder_2) < 4.8  # T5 v1.1 XXL encoder
    assert 0.12 < billions(schnell.text_encoder) < 0.13  # CLIP-L text tower
    assert 0.08 < billions(schnell.vae) < 0.09
    assert 6.1 < billions(zimage.transformer) < 6.2  # "6B"
    assert 4.0 < billions(zimage.text_encoder) < 4.05  # Qwen3-4B without its LM head
