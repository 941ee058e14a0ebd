"""Tensor parallel over 2 gloo processes (one torch.distributed.run launch for all fixtures) against one process.

Llama (4 KV heads), Mistral and Qwen2 (2 KV heads, Qwen2 with q/k/v bias), a Mistral with 1 KV head
(fewer KV heads than ranks: replicated) and a Llama with attention_bias and mlp_bias (row-parallel biases): logits of an image prompt within 1e-4, identical greedy tokens,
identical sampled tokens on both ranks, about half the decoder layers' weights per rank, per-rank KV caches.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tp_worker import NEW, layer_elements, prompt, run

WORLD = 2
FIXTURES = {"llama": ("llama", {}), "mistral": ("mistral", {}), "qwen2": ("qwen2", {}),
            "mistral_kv1": ("mistral", {"text_overrides": {"num_key_value_heads": 1}}),
            # o_proj / down_proj with a bias: the row-parallel bias must be added once, after the all-reduce
            "llama_bias": ("llama", {"text_overrides": {"attention_bias": True, "mlp_bias": True}})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], timeout: float = 150) -> str:
    """Run `script` under torch.distributed.run on WORLD CPU processes; kill the whole group on timeout."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(script), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torch.distributed.run did not finish in {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"torch.distributed.run failed ({proc.returncode}):\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def tp_results(tiny_checkpoint, tmp_path_factory):
    folders = {name: str(tiny_checkpoint(backbone, **kwargs)[0]) for name, (backbone, kwargs) in FIXTURES.items()}
    out = tmp_path_factory.mktemp("tp_out")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"fixtures": folders, "out": str(out), "fused": "mistral", "tp_size": "qwen2"}))
    start = time.perf_counter()
    launch(Path(__file__).with_name("tp_worker.py"), [str(spec)])
    print(f"torch.distributed.run, {WORLD} ranks, {len(folders)} checkpoints: {time.perf_counter() - start:.1f} s")
    results = {}
    for name in [*folders, "fused"]:
        results[name] = [torch.load(out / f"{name}.rank{r}.pt") for r in range(WORLD)]
    return folders, results


@pytest.fixture(scope="module")
def single(tp_results):
    """The same run in this process, unsharded."""
    from llava_next.compat.modeling import LlavaNextForConditionalGeneration

    folders, _ = tp_results
    cache = {}

    def get(name):
        if name not in cache:
            model = LlavaNextForConditionalGeneration.from_pretrained(folders[name])
            cache[name] = run(model, 0, sample=False)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(FIXTURES))
def test_tp_matches_one_process(tp_results, single, name):
    ranks = tp_results[1][name]
    ref = single(name)
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-4, rtol=0, msg=f"rank {rank}")
        assert torch.equal(got["greedy"], ref["greedy"]), (rank, got["greedy"], ref["greedy"])
        assert got["greedy"].numel() == NEW
    assert torch.equal(ranks[0]["sampled"], ranks[1]["sampled"])  # rank 0's RNG state reached rank 1


@pytest.mark.parametrize("name", list(FIXTURES))
def test_each_rank_holds_its_share_of_the_layers(tp_results, single, name):
    ranks = tp_results[1][name]
    full = single(name)["elements"]
    for got in ranks:
        share = got["elements"] / full
        limit = 0.56 if name == "mistral_kv1" else 0.51  # replicated K/V (1 head) and norms
        assert 0.49 < share < limit, (name, got["elements"], full)
        assert got["read_elements"] == got["elements"]  # read from the files: its slices, nothing more


def test_kv_heads_per_rank(tp_results):
    ranks = tp_results[1]
    assert [r["kv_heads"] for r in ranks["llama"]] == [2, 2]
    assert [r["kv_heads"] for r in ranks["mistral"]] == [1, 1]
    assert [r["kv_heads"] for r in ranks["mistral_kv1"]] == [1, 1]  # the one KV head, replicated


def test_sharding_a_loaded_fused_model(tp_results, single):
    """shard_decoder on real, already fused weights; decoding with the static runner (fused step)."""
    ref = single("mistral")
    for got in tp_results[1]["fused"]:
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-4, rtol=0)
        assert torch.equal(got["greedy"], ref["greedy"])


def test_head_counts_that_cannot_be_sharded_are_refused():
    from llava_next.parallel.tensor_parallel import kv_layout

    assert kv_layout(8, 2, 4, 3) == (1, 1)  # 2 KV heads over 4 ranks: ranks 2, 3 share head 1
    assert kv_layout(8, 8, 4, 3) == (6, 2)
    with pytest.raises(ValueError, match="KV heads over 4 ranks"):
        kv_layout(12, 3, 4, 0)
    with pytest.raises(ValueError, match="attention heads cannot be split"):
        kv_layout(6, 6, 4, 0)


def test_tp_plan_without_a_process_group_is_a_clear_error(tiny_checkpoint, monkeypatch):
    import torch.distributed as dist

    from llava_next.compat.modeling import LlavaNextForConditionalGeneration

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    folder = tiny_checkpoint("mistral")[0]
    with pytest.raises(RuntimeError, match="torch.distributed.run"):
        LlavaNextForConditionalGeneration.from_pretrained(folder, tp_plan="auto")
    with pytest.raises(ValueError, match="only 'auto'"):
        LlavaNextForConditionalGeneration.from_pretrained(folder, tp_plan={"layers.*": "colwise"})


# -- the engine: LLM(path, tensor_parallel_size=2) starts and owns its worker process -------------------------


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    from llava_next.entrypoints.demo import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("tp_demo") / "ckpt", quiet=True)


def _mixed_prompts():
    import numpy as np
    from PIL import Image

    def image(h, w, seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))

    a, b = image(300, 400, 1), image(500, 200, 2)
    return [
        "[INST] Describe nothing. [/INST]",
        {"prompt": "[INST] <image>\nWhat is this? [/INST]", "multi_modal_data": {"image": a}},
        {"prompt": "[INST] <image>\n<image>\nCompare. [/INST]", "multi_modal_data": {"image": [a, b]}},
        {"prompt": "[INST] <image>\nAgain. [/INST]", "multi_modal_data": {"image": b}},
    ]


def _params():
    from llava_next import SamplingParams

    return [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 9, 10)] + \
        [SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)]


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_engine_tp2_gives_the_tokens_of_one_process_and_stops_when_a_worker_dies(demo_folder):
    import threading

    import llava_next
    from llava_next import SamplingParams
    from llava_next.errors import EngineDeadError
    from llava_next.parallel.tensor_parallel import sharding

    # a small token budget: the image prompts are prefilled in chunks, decodes and prefills share steps
    one = llava_next.LLM(str(demo_folder), max_num_batched_tokens=512)
    expected = _tokens(one.generate(_mixed_prompts(), _params(), use_tqdm=False))
    del one
    llm = llava_next.LLM(str(demo_folder), max_num_batched_tokens=512, tensor_parallel_size=2)
    try:
        assert llm.llm_engine.kv_heads == 1  # 2 KV heads over 2 ranks: this rank's pool holds one
        got = _tokens(llm.generate(_mixed_prompts(), _params(), use_tqdm=False))
        assert got == expected
        decoder = llm.model.model.language_model
        assert decoder.layers[0].self_attn.heads == 2 and sharding(decoder).world == 2

        worker = llm._tp_leader.procs[0]
        result = {}

        def call():
            try:
                long = SamplingParams(max_tokens=5000, ignore_eos=True)
                llm.generate(["[INST] Go on. [/INST]"] * 2, long, use_tqdm=False)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                result["error"] = exc

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        time.sleep(1.5)  # mid-generation: rank 0 is inside a step's broadcasts / all-reduces
        assert thread.is_alive(), result
        os.kill(worker.pid, signal.SIGKILL)  # our own child, by pid
        thread.join(timeout=60)
        assert not thread.is_alive(), "generate() hung after a worker died"
        error = result.get("error")
        assert isinstance(error, EngineDeadError), result
        assert "rank 1" in str(error) and str(worker.pid) in str(error)
        with pytest.raises(EngineDeadError, match="rank 1"):  # and every later call, at once
            llm.generate(_mixed_prompts()[:1], _params()[:1], use_tqdm=False)
    finally:
        llm.shutdown()
    import torch.distributed as dist

    assert not dist.is_initialized()  # shutdown left no process group behind in this process


PLAIN_SCRIPT = """
import json, sys
import llava_next
from llava_next import SamplingParams

llm = llava_next.LLM(sys.argv[1], tensor_parallel_size=2)
outs = llm.generate(["[INST] Describe nothing. [/INST]", "[INST] Go on. [/INST]"],
                    SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
llm.shutdown()
"""


def test_engine_tp2_from_a_plain_script_without_a_main_guard(demo_folder, tmp_path):
    """The README's two lines at the top level of a script: the workers are started as a module entry point,
    so nothing re-imports the script (multiprocessing's spawn did, and every worker died while starting)."""
    import llava_next
    from llava_next import SamplingParams

    script = tmp_path / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, str(script), str(demo_folder)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script's own process group: it and its workers
        output, _ = proc.communicate()
        pytest.fail(f"the plain script did not finish:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    got = json.loads(output.split("TOKENS ", 1)[1].splitlines()[0])
    one = llava_next.LLM(str(demo_folder))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = _tokens(one.generate(["[INST] Describe nothing. [/INST]", "[INST] Go on. [/INST]"], params,
                                    use_tqdm=False))
    assert got == expected
