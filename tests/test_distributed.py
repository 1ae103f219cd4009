"""The bundled optimizers across processes (two CPU processes over gloo).

FSDP2's sharded parameters (``fully_shard``: every parameter a DTensor): those marked ``runs_on_dtensor`` match
the unsharded run; the others refuse at construction with one clear error instead of failing inside the first
step. Sophia's Hessian estimate goes through FSDP2's own backward (``autograd.grad`` reaches no shard: the forward
runs on unsharded copies). DDP: statistics gathered from each rank's own batch are averaged over the replicas."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no distributed")

SCRIPT = textwrap.dedent('''
    import os, socket, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import precondtune.optim as po
    from precondtune.errors import ConfigError

    HP = {"muon": {"ns_dtype": "fp32"}}  # bf16 Newton-Schulz would differ by rounding between the two layouts

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def train(model, opt, x, y):
        loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, (x, y)).backward()
            opt.step()  # Sophia's estimate is checked on its own: sharded, its batch is both ranks' together

    def run(rank, port, names):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(1)
        x, y = torch.randn(32, 8), torch.randn(32, 4)
        for name in names:
            sharded, ref = make(), make()
            fully_shard(sharded, mesh=mesh)
            try:
                opt = po.build(name, sharded, **HP.get(name, {}))
            except ConfigError as e:
                print(f"{name} refused: {e}", flush=True) if rank == 0 else None
                continue
            train(sharded, opt, x, y)
            train(ref, po.build(name, ref, **HP.get(name, {})), x, y)
            diff = max((a.full_tensor() - b).abs().max().item() for a, b in zip(sharded.parameters(), ref.parameters()))
            print(f"{name} diff {diff:.3e}", flush=True) if rank == 0 else None
        dist.barrier()  # then leave without gloo's teardown, which aborts now and then (SIGABRT)
        sys.stdout.flush()
        os._exit(0)

    if __name__ == "__main__":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(run, args=(port, sys.argv[1:]), nprocs=2)
''')


def test_optimizers_on_fsdp2_sharded_parameters(tmp_path):
    import precondtune.optim as po
    able = [n for n in po.available() if getattr(po.get_spec(n).optimizer_cls, "runs_on_dtensor", False)]
    assert able == ["adamw", "muon", "sophia"]
    script = tmp_path / "fsdp2.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), *able, "soap", "adam-mini"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for name in able:
        assert lines[name].startswith("diff "), lines[name]
        assert float(lines[name].split()[1]) < 1e-6, (name, lines[name])
    for name in ("soap", "adam-mini"):
        assert lines[name].startswith("refused: ") and "are DTensors (FSDP2's fully_shard" in lines[name]
        assert lines[name].endswith("adamw, muon, sophia"), lines[name]


def test_an_fsdp_memory_plan_says_which_bundled_optimizers_refuse_sharded_parameters():
    from conftest import load_example

    import precondtune
    path = load_example("mlp").path
    for name, refuses in (("soap", True), ("muon", False), ("adamw", False)):
        notes = precondtune.estimate_memory(path, name, batch_size=4, sharding="fsdp", world_size=4)["notes"]
        said = [n for n in notes if "refuses FSDP2's sharded ones" in n]
        assert bool(said) == refuses, (name, notes)


SOPHIA_FSDP_SCRIPT = textwrap.dedent('''
    import os, socket, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import precondtune.optim as po
    from precondtune.errors import ConfigError
    from precondtune.optim.sophia import hessian_step, sophia_parts

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def run(rank, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,))
        sharded, ref = make(), make()
        fully_shard(sharded, mesh=mesh)
        opt = po.build("sophia", sharded)
        torch.manual_seed(10 + rank)  # each rank its own batch
        x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
        F.cross_entropy(sharded(x), y).backward()
        step_grads = [p.grad.full_tensor().clone() for p in sharded.parameters()]
        hessian_step(opt, sharded, x, None, lambda m, b: m(b), generator=torch.Generator().manual_seed(3))
        kept = all(torch.equal(a, p.grad.full_tensor()) for a, p in zip(step_grads, sharded.parameters()))
        # expected: the labels drawn the same way from the unsharded replica's logits, the gradient averaged over
        # the ranks (the batch over all ranks), times that batch's 32 rows, folded into h = (1 - beta2) * estimate
        logits = ref(x)
        labels = torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
        grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(ref.parameters()))
        part = sophia_parts(opt)[0]
        beta2 = part.group_config(part.param_groups[0]).betas[1]
        errors = []
        for p, g in zip(sharded.parameters(), grads):
            dist.all_reduce(g)
            expected = (1 - beta2) * 32 * (g / 2).square()
            if p in part.state:
                h = part.state[p]["hessian"].full_tensor()
                errors.append(((h - expected).abs().max() / expected.abs().max()).item())
        hutchinson = po.build("sophia", sharded, estimator="hutchinson")
        try:
            hessian_step(hutchinson, sharded, x, lambda m, b: m(b).logsumexp(-1).mean())
            refused = False
        except ConfigError as e:
            refused = "takes the gnb estimator" in str(e)
        if rank == 0:
            print(len(errors), max(errors), kept, refused, flush=True)
        dist.barrier()  # then leave without gloo's teardown, which aborts now and then (SIGABRT)
        sys.stdout.flush()
        os._exit(0)

    if __name__ == "__main__":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(run, args=(port,), nprocs=2)
''')


def test_sophia_estimates_through_fsdp2s_backward_and_leaves_the_steps_gradients(tmp_path):
    """On FSDP2's shards Sophia's GNB estimate is B·ĝ⊙ĝ over the batch of all ranks (ĝ reduce-scattered by FSDP2,
    B = 32 rows), equal to the unsharded computation; the step's own gradients are untouched; Hutchinson, which
    needs a double backward, is refused with one line."""
    script = tmp_path / "sophia_fsdp.py"
    script.write_text(SOPHIA_FSDP_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    count, worst, kept, refused = r.stdout.split()
    assert int(count) == 4 and float(worst) < 1e-6 and kept == "True" and refused == "True", r.stdout


DDP_SCRIPT = textwrap.dedent('''
    import os, socket, sys, warnings
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch.nn.parallel import DistributedDataParallel as DDP
    import precondtune.optim as po
    from precondtune.optim.sophia import hessian_step

    def run(rank, port, cases):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        for case in cases:
            name, given = case.split(":")
            torch.manual_seed(0)
            model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)))
            target = model if given == "wrapped" else model.module
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = po.build(name, target if name.startswith("iso") else model.module,
                               **({"precondition_frequency": 2} if name.startswith("iso") else {}))
                torch.manual_seed(10 + rank)  # each rank its own batches
                for _ in range(5):
                    b = (torch.randn(32, 8), torch.randint(0, 4, (32,)))
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model, b).backward()
                    hessian_step(opt, target, b, loss_fn, lambda m, bb: m(bb[0]),
                                 generator=torch.Generator().manual_seed(0))
                    opt.step()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            first = flat.clone()
            dist.broadcast(first, 0)
            warned = any("not DistributedDataParallel-wrapped" in str(w.message) for w in caught)
            if rank == 1:
                print(f"{case} {(flat - first).abs().max().item():.3e} {warned}", flush=True)
        dist.barrier()  # then leave without gloo's teardown, which aborts now and then (SIGABRT)
        sys.stdout.flush()
        os._exit(0)

    if __name__ == "__main__":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(run, args=(port, sys.argv[1:]), nprocs=2)
''')


def test_statistics_from_each_ranks_batch_are_averaged_over_ddp_replicas(tmp_path):
    """Sophia's Hessian estimate and Iso's covariances come from each rank's own batch: given the DDP-wrapped
    model they are averaged over the replicas and the replicas stay identical; given ``model.module`` the
    replicas drift apart (as they did before for every DDP run), and a warning says what to pass."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cases = ["sophia:wrapped", "iso:wrapped", "iso-adam:wrapped", "adamw:wrapped", "sophia:module", "iso:module"]
    r = subprocess.run([sys.executable, str(script), *cases], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {case: (float(diff), warned == "True") for case, diff, warned in map(str.split, r.stdout.splitlines())}
    for case in cases[:4]:
        assert got[case] == (0.0, False), (case, got[case])
    for case in cases[4:]:
        diff, warned = got[case]
        assert diff > 1e-6 and warned, (case, got[case])


BUCKETS_SCRIPT = textwrap.dedent('''
    import os, socket, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from precondtune.modelfile import load_model_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    mf = load_model_file(sys.argv[1])
    for view in (False, True):
        model = DDP(mf.build(), gradient_as_bucket_view=view)
        mf.loss(model, mf.sample_batch(4)).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        views = sum(g._base is not None for g in grads)
        sizes = model._get_ddp_logging_data()["bucket_sizes"]  # bytes per bucket: "n1, n2, ..." or one int
        print(view, sum(int(x) for x in str(sizes).split(",")), views, len(grads), flush=True)
    sys.stdout.flush()
    os._exit(0)
''')


def test_ddp_buckets_are_a_second_copy_of_the_gradients_unless_they_are_views(tmp_path):
    """What `memory --world-size N` (no sharding) adds for DistributedDataParallel, against DDP itself: its
    buckets hold as many bytes as the gradients, and only with gradient_as_bucket_view are the gradients views
    into them."""
    from conftest import load_example

    import precondtune
    path = str(load_example("chargpt").path)
    script = tmp_path / "buckets.py"
    script.write_text(BUCKETS_SCRIPT)
    r = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (_, copy_bytes, copy_views, n), (_, view_bytes, view_views, _) = (line.split() for line in r.stdout.splitlines())
    assert copy_views == "0" and view_views == n  # a second copy, then views

    one = precondtune.estimate_memory(path, "adamw", batch_size=4)["bytes"]
    ddp = precondtune.estimate_memory(path, "adamw", batch_size=4, world_size=4)["bytes"]
    view = precondtune.estimate_memory(path, "adamw", batch_size=4, world_size=4, bucket_view=True)["bytes"]
    zero1 = precondtune.estimate_memory(path, "adamw", batch_size=4, world_size=4, sharding="zero1")["bytes"]
    assert ddp["ddp_buckets"] == int(copy_bytes) == int(view_bytes) == one["gradients"]
    assert ddp["total_peak"] == one["total_peak"] + ddp["ddp_buckets"]
    assert view["ddp_buckets"] == zero1["ddp_buckets"] == one["ddp_buckets"] == 0
    assert view["total_peak"] == one["total_peak"]
