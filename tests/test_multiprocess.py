"""Two processes on CPU (gloo): caching split without deadlock, gradients averaged, only the main
process writes (the state with each process's RNG), and the LoRA equals a single-process run over
the same samples with gradient accumulation 2."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import flux_train_network
from library.run_start import seed_each_process
from library.safetensors_io import load_safetensors, read_metadata
from library.train_state import read_rng_states
from tests.training_helpers import base_argv, dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation_2(tiny_model_files, tmp_path):
    flags = dict(steps=3, cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True,
                 network_train_unet_only=True, lr_scheduler="linear", lr_warmup_steps=1, save_state_on_train_end=True)
    two_data = dataset(tmp_path / "two", batch_size=1)
    two_out = str(tmp_path / "two_out")
    argv = base_argv(tiny_model_files, two_data, two_out, **flags)
    seed_at = argv.index("--seed")
    del argv[seed_at : seed_at + 2]  # no --seed: the processes must still agree on one
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
        "--num_cpu_threads_per_process", "1", "--main_process_port", "29517",
        os.path.join(ROOT, "flux_train_network.py"), *argv,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes" in result.stderr
    assert result.stdout.count("saved the LoRA to") == 1  # reported by the process that wrote it

    metadata = read_metadata(os.path.join(two_out, "lora.safetensors"))
    one_data = dataset(tmp_path / "one", batch_size=1)
    one_out = str(tmp_path / "one_out")
    argv = base_argv(tiny_model_files, one_data, one_out, gradient_accumulation_steps=2, **flags)
    argv[argv.index("--seed") + 1] = metadata["ss_seed"]  # the seed the main process drew and shared
    assert flux_train_network.main(argv) == 0

    assert sorted(os.listdir(two_out)) == ["lora-state", "lora.safetensors"]  # only the main process wrote
    state_files = sorted(os.listdir(os.path.join(two_out, "lora-state")))
    assert [f for f in state_files if f.startswith("random_states")] == ["random_states_0.pkl", "random_states_1.pkl"]
    ranks = [read_rng_states(os.path.join(two_out, "lora-state", f"random_states_{i}.pkl")) for i in (0, 1)]
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # each process drew its own dropout masks
    two = load_safetensors(os.path.join(two_out, "lora.safetensors"))
    one = load_safetensors(os.path.join(one_out, "lora.safetensors"))
    assert two.keys() == one.keys()
    changed = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)
        changed += bool(one[key].abs().sum() > 0) and key.endswith("lora_up.weight")
    assert changed > 0  # the runs did train (lora_up starts at zero)

    assert metadata["ss_batch_size_per_device"] == "1"
    assert metadata["ss_num_batches_per_epoch"] == "3"  # each process's share of the 6 batches, as sd-scripts
    assert metadata["ss_total_batch_size"] == "2"
    assert metadata["ss_num_processes"] == "2"
    # every image got its caches, half of them written by each process
    images = [f for f in os.listdir(two_data.image_dir) if f.endswith(".png")]
    for image in images:
        stem = os.path.splitext(image)[0]
        assert os.path.isfile(os.path.join(two_data.image_dir, stem + "_flux_te.npz"))
        assert any(f.startswith(stem + "_") and f.endswith("_flux.npz") for f in os.listdir(two_data.image_dir))


def test_each_process_draws_its_own_dropout_masks_from_the_shared_seed():
    from networks.lora_modules import LoRAModule

    def outputs(process_index: int | None, processes: int = 2) -> list[torch.Tensor]:
        torch.manual_seed(7)  # the shared seed, as set_seed leaves it
        base = torch.nn.Linear(8, 8)
        lora = LoRAModule("lora_unet_x", base, lora_dim=4, alpha=4, rank_dropout=0.5)
        torch.nn.init.ones_(lora.lora_up.weight)  # (zero at first: no mask would show)
        lora.apply_to()
        if process_index is not None:
            seed_each_process(7, process_index, processes)
        with torch.no_grad():
            return [base(torch.ones(2, 8)) for _ in range(3)]

    first, second = outputs(0), outputs(1)
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))  # the ranks dropped other ranks
    for a, b in zip(first, outputs(0), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # and each its own reproducible stream
    for a, b in zip(outputs(None), outputs(0, processes=1), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # one process keeps its stream as it was


class ThreadedAllReduce:
    """torch.distributed.all_reduce (a sum, in place) between threads standing in for processes: a
    collective that does not pair up across them (another count, shape or order) fails here as it
    would hang or crash in gloo/NCCL."""

    def __init__(self, processes: int) -> None:
        self.barrier = threading.Barrier(processes, timeout=10)
        self.sent: list[torch.Tensor | None] = [None] * processes
        self.calls = [0] * processes

    def of_process(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> None:
            self.calls[rank] += 1
            self.sent[rank] = tensor.clone()
            self.barrier.wait()
            total = torch.stack(self.sent).sum(0)
            self.barrier.wait()
            tensor.copy_(total)

        return all_reduce


def test_gradients_are_averaged_when_module_dropout_skips_other_modules_on_each_process():
    from library.training_loop import average_gradients

    shapes = {"a": (3, 2), "b": (4,), "c": (2, 2), "d": (5,)}
    grads = [  # rank 0 ran a, c and d; rank 1 ran b, c and d; nobody ran "skipped"
        {"a": torch.full((3, 2), 2.0), "c": torch.full((2, 2), 1.0), "d": torch.full((5,), 4.0, dtype=torch.bfloat16)},
        {"b": torch.full((4,), 6.0), "c": torch.full((2, 2), 3.0), "d": torch.full((5,), 2.0, dtype=torch.bfloat16)},
    ]
    reduce, results, held = ThreadedAllReduce(2), [None, None], [[], []]

    def process(rank: int) -> None:
        params = {n: torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16 if n == "d" else torch.float32))
                  for n, s in shapes.items()}  # fmt: skip
        params["skipped"] = torch.nn.Parameter(torch.zeros(2))
        for name, grad in grads[rank].items():
            params[name].grad = grad
        all_reduce = reduce.of_process(rank)

        def watched(tensor: torch.Tensor) -> None:
            if tensor.dtype != torch.float32 or tensor.numel() != len(params):  # a gradient buffer, not the flags
                still_held = [n for n, p in params.items() if p.grad is not None and p.dtype == tensor.dtype]
                held[rank].append(still_held)
            all_reduce(tensor)

        average_gradients(list(params.values()), watched, 2, "cpu")
        results[rank] = {n: p.grad for n, p in params.items()}

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reduce.calls == [3, 3]  # which parameters have gradients, then one per dtype
    assert held == [[[], []], [[], []]]  # no gradient of a buffer's dtype is still held while it is reduced
    for rank in (0, 1):
        got = results[rank]
        assert got["skipped"] is None  # as on one process: the optimizer leaves it alone
        torch.testing.assert_close(got["a"], torch.full((3, 2), 1.0))
        torch.testing.assert_close(got["b"], torch.full((4,), 3.0))
        torch.testing.assert_close(got["c"], torch.full((2, 2), 2.0))
        torch.testing.assert_close(got["d"], torch.full((5,), 3.0, dtype=torch.bfloat16))
