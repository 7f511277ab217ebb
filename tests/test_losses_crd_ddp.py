"""CRD on two gloo processes, each with part of every batch of 8: after several steps both
processes hold bit-identical banks and Z, equal to one process that saw the whole batches,
while each process draws its own negatives. Splits include unequal ones (5 + 3) and indices
repeated within a process, across processes and across steps."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.losses.crd import CRDLoss
from distill.types import Outputs

N = 20
# (indices of the batch of 8, how many of them process 0 gets)
STEPS: list[tuple[list[int], int]] = [
    ([0, 1, 2, 3, 4, 5, 6, 7], 4),
    ([8, 9, 10, 3, 3, 11, 12, 0], 4),  # 3 on both processes (and twice on one), 0 again
    ([13, 14, 15, 16, 1, 17, 18, 1], 5),  # unequal split; 1 on both
    ([19, 2, 5, 7, 6, 4, 2, 19], 4),
]


def _objective() -> CRDLoss:
    torch.manual_seed(0)  # the same heads on every process
    obj = CRDLoss(
        student_layer="s",
        teacher_layer="t",
        student_dim=6,
        teacher_dim=5,
        num_samples=N,
        nce_k=5,
        feat_dim=4,
        logit_loss=None,
        seed=7,
    )
    return obj.double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    f_s = torch.randn(8, 6, generator=g, dtype=torch.float64)
    f_t = torch.randn(8, 5, generator=g, dtype=torch.float64)
    return f_s, f_t, torch.tensor(STEPS[step][0])


def _contrast(step: int, index: torch.Tensor) -> torch.Tensor | None:
    """Fixed negatives for the first step, whose scores set Z (so that Z can be compared with
    one process's); afterwards each process draws its own."""
    if step > 0:
        return None
    neg = torch.randint(0, N, (8, 5), generator=torch.Generator().manual_seed(5))
    return torch.cat([index.unsqueeze(1), neg], dim=1)


def _step(
    obj: CRDLoss, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor, c: torch.Tensor | None
) -> None:
    b = f_s.shape[0]
    s = Outputs(torch.zeros(b, 2), {"crd": f_s.requires_grad_()})
    out = obj(s, Outputs(torch.zeros(b, 2), {"crd": f_t}), None, index=index, contrast_index=c)
    out["loss"].backward()  # the gradients play no part in the banks: no optimizer step


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        obj = _objective()
        for step, (_, first) in enumerate(STEPS):
            f_s, f_t, index = _batch(step)
            part = slice(0, first) if rank == 0 else slice(first, None)
            c = _contrast(step, index)
            _step(obj, f_s[part], f_t[part], index[part], None if c is None else c[part])
        state = {k: v for k, v in obj.state_dict().items() if k != "_extra_state"}
        state["negatives"] = obj.negatives(torch.arange(4))
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_one_bank_equal_to_the_full_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
        assert torch.equal(r0[key], r1[key]), f"{key} differs between the processes"
    assert not torch.equal(r0["negatives"], r1["negatives"])  # seeded with the rank

    single = _objective()
    for step in range(len(STEPS)):
        f_s, f_t, index = _batch(step)
        _step(single, f_s, f_t, index, _contrast(step, index))
    assert single.z_student > 0
    for key, value in single.state_dict().items():
        if key in r0:
            # the same arithmetic on the same rows; Z sums in another order
            torch.testing.assert_close(r0[key], value, rtol=1e-13, atol=0, msg=key)
    touched = torch.tensor(sorted({i for idx, _ in STEPS for i in idx}))
    assert not torch.equal(single.memory_student[touched], _objective().memory_student[touched])
    assert torch.equal(r0["negatives"], single.negatives(torch.arange(4)))  # rank 0 = single
