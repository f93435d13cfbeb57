"""What processes share, proven with two real gloo processes on the CPU: an fp16 overflow on one process is skipped by
all (scale lowered, weights finite and identical), gradients are averaged in one collective per bucket, the global
batch's draws are sliced, the end-of-run check compares the weights themselves, and a destroyed group leaves no
thread behind to abort the exit."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewstep.training.loop.distributed import ProcessGroup, check_replicas_agree, import_dynamo_before_the_process_group
from fewstep.training.loop.errors import TrainingError
from fewstep.training.loop.update_loop import AdapterUpdateLoop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(worker, tmp_path) -> list:
    """Run ``worker(rank, world) -> result`` in two gloo processes; their results, by rank."""
    port = free_port()
    mp.spawn(_bootstrap, args=(2, port, worker, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(2)]


def _bootstrap(rank, world, port, worker, out):
    torch.set_num_threads(1)
    import_dynamo_before_the_process_group()  # what make_accelerator does
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(worker(rank, world), f"{out}/{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ fp16 overflow
def _overflow_on_rank_1_at_update_1(rank, world):
    p = torch.nn.Parameter(torch.ones(16))
    optimizer = torch.optim.SGD([p], lr=0.1)
    loop = AdapterUpdateLoop({"g": optimizer}, processes=ProcessGroup(world, "cpu", rank), fp16_loss_scaling=True)
    history = []
    for update in range(3):
        def micro_steps():
            loss = (p * (rank + 1.0)).sum()  # finite on both: the overflow is in one process's gradients only
            hook = p.register_hook(lambda g: g * float("inf")) if (update, rank) == (1, 1) else None
            loop._scaled(loss, "g").backward()
            if hook is not None:
                hook.remove()
            yield True, {}

        loop._update("g", micro_steps(), [p], optimizer)
        history.append((p.detach().clone(), loop.grad_scalers["g"].get_scale()))
    return history


def test_an_fp16_overflow_on_one_process_is_skipped_by_every_process(tmp_path):
    ranks = run_two(_overflow_on_rank_1_at_update_1, tmp_path)
    for history in ranks:
        (w0, s0), (w1, s1), (w2, s2) = history
        assert torch.isfinite(w2).all()
        assert torch.equal(w1, w0) and s1 == s0 / 2  # the overflowing update skipped, its scale halved
        assert not torch.equal(w2, w1)  # and the next one steps again
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*ranks))  # identical weights on both processes


# ------------------------------------------------------------------------------------------ collectives
def _count_collectives(rank, world):
    params = [torch.nn.Parameter(torch.full((7, 3), float(rank + i))) for i in range(300)]
    for p in params:
        p.grad = p.detach().clone()
    group = ProcessGroup(world, "cpu", rank)
    group.average_gradients(params)
    return group.collectives, group.bytes_reduced, [p.grad for p in params]


def test_gradients_are_averaged_in_one_collective_per_bucket(tmp_path):
    (count, nbytes, grads), (_, _, other) = run_two(_count_collectives, tmp_path)
    assert count == 1 and nbytes == 300 * 21 * 4  # 300 LoRA tensors, one all-reduce
    for i, (a, b) in enumerate(zip(grads, other)):
        assert torch.equal(a, b) and torch.equal(a, torch.full((7, 3), i + 0.5))  # the mean of i and i + 1


def _draws(rank, world):
    group = ProcessGroup(world, "cpu", rank)
    generator = torch.Generator().manual_seed(0)
    return group.randn((2, 3), generator), group.randint(0, 100, 2, generator)


def test_each_process_draws_its_slice_of_the_global_batch(tmp_path):
    (noise0, index0), (noise1, index1) = run_two(_draws, tmp_path)
    generator = torch.Generator().manual_seed(0)
    noise, index = torch.randn((4, 3), generator=generator), torch.randint(0, 100, (4,), generator=generator)
    assert torch.equal(torch.cat([noise0, noise1]), noise) and torch.equal(torch.cat([index0, index1]), index)


def _one_weight_differs(rank, world):
    p = torch.nn.Parameter(torch.arange(6.0))
    if rank == 1:
        with torch.no_grad():
            p[[2, 3]] = p[[3, 2]]  # the same values (and sum), two of them swapped
    try:
        check_replicas_agree({"g": torch.optim.SGD([p], lr=0.1)}, ProcessGroup(world, "cpu", rank), log=lambda _: None)
    except TrainingError as error:
        return str(error)
    return None


def test_the_agreement_check_compares_weights_not_sums(tmp_path):
    errors = run_two(_one_weight_differs, tmp_path)
    assert all(e is not None and "2 values differ" in e for e in errors), errors


def test_one_process_needs_no_collective():
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.ones(3)
    group = ProcessGroup(1)
    group.average_gradients(params)
    assert group.collectives == 0 and torch.equal(params[0].grad, torch.ones(3))


def test_accelerate_launch_cpu_with_several_processes_is_said_to_run_one():
    from fewstep.training.loop.distributed import single_cpu_launch_warning

    # what accelerate's simple launcher sets for `accelerate launch --cpu --num_processes 2`: one process
    one_of_two = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert "started ONE process" in single_cpu_launch_warning(one_of_two)
    assert single_cpu_launch_warning({**one_of_two, "WORLD_SIZE": "2", "RANK": "0"}) is None  # --multi_cpu, torchrun
    assert single_cpu_launch_warning({"ACCELERATE_USE_CPU": "True"}) is None  # --num_processes 1


def _threads_left_after_destroy(rank, world):
    p = torch.nn.Parameter(torch.ones(3))
    check_replicas_agree({"g": torch.optim.SGD([p], lr=0.1)}, ProcessGroup(world, "cpu", rank), log=lambda _: None)
    dist.destroy_process_group()
    return sorted(open(task / "comm").read().strip() for task in Path("/proc/self/task").iterdir())


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists the process's threads from /proc (Linux)")
def test_a_destroyed_process_group_leaves_no_gloo_thread_to_abort_the_exit(tmp_path):
    # Kept alive past destroy_process_group (torch._dynamo imported after the group existed), the group's threads were
    # still running at interpreter exit, where they aborted rank 1 of finished runs now and then.
    for threads in run_two(_threads_left_after_destroy, tmp_path):
        assert not [name for name in threads if "gloo" in name or "tcpstore" in name], threads
