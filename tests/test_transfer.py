"""Transfer from a tuned AdamW: each optimizer's rule per role, Muon's lr conventions converted exactly (equal
updates), every emitted config round-trips through build_optimizer and trains, and the CLI's bad input."""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import yaml
from conftest import load_example
from typer.testing import CliRunner

import precondtune
import precondtune.optim as po
from precondtune import config as pc
from precondtune.cli import app
from precondtune.errors import ConfigError
from precondtune.inventory import inventory
from precondtune.transfer import CONVENTIONS, transfer

runner = CliRunner()
ADAM = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
ADAM_HP = {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


@pytest.fixture(scope="module")
def chargpt():
    mf = load_example("chargpt")
    return mf, inventory(mf.build())


@pytest.fixture(scope="module")
def results(chargpt):
    return {t.optimizer: t for t in transfer(chargpt[1], "all", **ADAM)}


def test_every_optimizer_gets_its_own_rule_and_adamw_for_the_roles_it_skips(results):
    assert set(results) == set(po.available())
    for name, t in results.items():
        spec = po.get_spec(name)
        own = spec.from_adamw(**ADAM)
        assert t.config.hyperparameters == pc.plain(po.config_dict(own.config)), name
        assert t.rule.startswith(own.rule) and t.source == own.source and t.source
        skipped = [r for r in ("matrix", "conv", "batched", "embedding", "head", "vector") if r not in spec.roles]
        if skipped:
            assert t.config.param_groups == [{"match": "|".join(skipped), "optimizer": "adamw",
                                              "hyperparameters": ADAM_HP}], name
            routed = {g["role"]: g for g in t.groups}
            for role in ("embedding", "head", "vector"):
                assert routed[role]["optimizer"] == "adamw" and routed[role]["lr"] == ADAM["lr"]
        else:
            assert t.config.param_groups == []


@pytest.mark.parametrize("name", ["soap", "adam-mini", "iso-adam"])
def test_adam_family_reuses_adamw_values(results, name):
    if name not in results:
        pytest.skip(f"{name} not registered")
    hp = results[name].config.hyperparameters
    assert hp["lr"] == ADAM["lr"] and hp["betas"] == [0.9, 0.95] and hp["weight_decay"] == 0.1


def test_adafactor_shampoo_sophia_rules(results):
    ada = results["adafactor"].config.hyperparameters
    assert ada["relative_step"] is False and ada["lr"] == 3e-3 and (ada["beta1"], ada["beta2"]) == (0.9, 0.95)
    if "shampoo" in results:
        sh = results["shampoo"].config.hyperparameters
        assert sh["grafting"] == "adam" and sh["grafting_beta2"] == 0.95 and sh["grafting_eps"] == 1e-8
    if "sophia" in results:
        so = results["sophia"].config.hyperparameters
        assert so["lr"] > 0 and "rho" in so and "rho" in results["sophia"].rule


def test_muon_moonlight_rule_gives_update_rms_0_2_lr_on_every_shape(results, chargpt):
    """Moonlight (2502.16982 §2.2): with s = 0.2·√max(rows, cols) the update RMS is 0.2·lr for any shape."""
    hp = results["muon"].config.hyperparameters
    assert hp["scale"] == "match_rms_adamw" and hp["lr"] == 3e-3 and hp["weight_decay"] == 0.1
    torch.manual_seed(0)
    model = chargpt[0].build()
    opt = precondtune.build_optimizer(model, {**results["muon"].config.as_dict(),
                                              "hyperparameters": {**hp, "weight_decay": 0.0}})
    matrices = {i.name: i.param for i in inventory(model) if i.role == "matrix"}
    assert {tuple(p.shape) for p in matrices.values()} == {(192, 64), (64, 64), (256, 64), (64, 256)}
    before = {n: p.detach().clone() for n, p in matrices.items()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for n, p in matrices.items():
        rms = float((p.detach() - before[n]).pow(2).mean().sqrt())
        assert rms == pytest.approx(0.2 * 3e-3, rel=0.2), (n, rms)


def _train_steps(model, opt, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _shapes_model() -> torch.nn.Module:
    """Known shapes: a conv kernel (flattened 4×18), tall 24×8, square 24×24, wide 12×24, a head and biases."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(8, 24),
                               torch.nn.Linear(24, 24), torch.nn.Linear(24, 12), torch.nn.Linear(12, 4))


@pytest.mark.parametrize("src", list(CONVENTIONS))
@pytest.mark.parametrize("dst", list(CONVENTIONS))
def test_convention_conversion_gives_equal_updates(src, dst):
    model = _shapes_model()
    (t,) = transfer(inventory(model), "muon", lr=0.02, weight_decay=0.1, source="muon", convention=src,
                    target_convention=dst)
    assert t.config.hyperparameters["scale"] == CONVENTIONS[dst]
    assert {s.shape for s in t.shapes} == {(4, 18), (24, 8), (24, 24), (12, 24)}
    twin, third = copy.deepcopy(model), copy.deepcopy(model)
    ref = po.build("muon", model, lr=0.02, weight_decay=0.1, scale=CONVENTIONS[src], ns_dtype="fp32")
    doc = t.config.as_dict()
    doc["hyperparameters"]["ns_dtype"] = "fp32"
    expected = _train_steps(model, ref)
    for a, b in zip(expected, _train_steps(twin, precondtune.build_optimizer(twin, doc))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    if src != dst:  # one lr for every shape (the main one) is a different optimizer: the rules matter
        single = _train_steps(third, precondtune.build_optimizer(third, {**doc, "param_groups": []}))
        assert any(not torch.allclose(a, b, rtol=1e-4) for a, b in zip(expected, single))


def test_keller_to_moonlight_per_shape_values(chargpt):
    (t,) = transfer(chargpt[1], "muon", lr=0.02, source="muon", convention="keller", target_convention="moonlight")
    by_shape = {s.shape: s for s in t.shapes}
    for (rows, cols), s in by_shape.items():
        expected = 0.02 * math.sqrt(max(1, rows / cols)) / (0.2 * math.sqrt(max(rows, cols)))
        assert s.lr == pytest.approx(expected, rel=1e-11)
    assert by_shape[(64, 256)].lr == pytest.approx(0.00625) and by_shape[(64, 64)].lr == pytest.approx(0.0125)
    assert t.config.hyperparameters["lr"] == pytest.approx(0.0125)  # most parameters share it
    (rule,) = t.config.param_groups
    assert rule["optimizer"] == "muon" and "out" in rule["name"] and rule["hyperparameters"]["lr"] == 0.00625


def test_adamw_to_muon_in_keller_convention_keeps_moonlight_steps():
    a = _shapes_model()
    b = copy.deepcopy(a)
    (moon,) = transfer(inventory(a), "muon", **ADAM)
    (kel,) = transfer(inventory(a), "muon", **ADAM, target_convention="keller")
    assert kel.config.hyperparameters["scale"] == "original"
    da, db = moon.config.as_dict(), kel.config.as_dict()
    da["hyperparameters"]["ns_dtype"] = db["hyperparameters"]["ns_dtype"] = "fp32"
    for x, y in zip(_train_steps(a, precondtune.build_optimizer(a, da)),
                    _train_steps(b, precondtune.build_optimizer(b, db))):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


def test_every_emitted_config_round_trips_and_trains(tmp_path):
    mf = load_example("mlp")
    for t in transfer(inventory(mf.build()), "all", **ADAM):
        path = pc.write(t.config, tmp_path / f"{t.optimizer}.yaml")
        assert pc.load(path) == t.config
        torch.manual_seed(0)
        model = mf.build()
        opt = precondtune.build_optimizer(model, path)
        direct = po.build(t.optimizer, mf.build(), routing=pc.routing(t.config),
                          **{k: pc.as_tuples(v) for k, v in t.config.hyperparameters.items()})
        assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in direct.param_groups]
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):  # SOAP (as upstream) spends its first step building the preconditioner
            opt.zero_grad()
            mf.loss(model, mf.sample_batch(8)).backward()
            opt.step()
        after = list(model.parameters())
        assert all(torch.isfinite(p).all() for p in after), t.optimizer
        assert any(not torch.equal(b, p) for b, p in zip(before, after)), t.optimizer


def test_emitted_configs_build_on_a_transformer(tmp_path, chargpt, results):
    """Embedding, tied head, vectors and attention matrices: every config builds and routes every tensor."""
    mf, infos = chargpt
    for t in results.values():
        model = mf.build()
        opt = precondtune.build_optimizer(model, pc.write(t.config, tmp_path / f"{t.optimizer}.json"))
        assert sum(len(g["params"]) for g in opt.param_groups) == len(infos), t.optimizer
        assert sum(g["tensors"] for g in t.groups) == len(infos)


def test_library_rejects_bad_input(chargpt):
    infos = chargpt[1]
    with pytest.raises(ConfigError, match="--lr"):
        transfer(infos, "muon", lr=-1.0)
    with pytest.raises(ConfigError, match="--betas"):
        transfer(infos, "muon", lr=1e-3, betas=(0.9, 1.2))
    with pytest.raises(ConfigError, match="unknown optimizer"):
        transfer(infos, "adamz", lr=1e-3)
    with pytest.raises(ConfigError, match="--from"):
        transfer(infos, "muon", lr=1e-3, source="sgd")
    with pytest.raises(ConfigError, match="--convention"):
        transfer(infos, "muon", lr=1e-3, source="muon", convention="keller")
    with pytest.raises(ConfigError, match="--convention"):
        transfer(infos, "soap", lr=1e-3, target_convention="keller")
    with pytest.raises(ConfigError, match="--convention"):
        transfer(infos, "muon", lr=1e-3, source="muon", convention="keller", target_convention="kj")
    with pytest.raises(ConfigError, match="--to muon"):
        transfer(infos, "soap", lr=1e-3, source="muon", convention="keller", target_convention="moonlight")


MLP = str(load_example("mlp").path)


def test_cli_to_all_writes_one_file_per_optimizer(tmp_path):
    out = tmp_path / "configs"
    r = runner.invoke(app, ["transfer", MLP, "--lr", "3e-3", "--betas", "0.9,0.95", "--weight-decay", "0.1",
                            "--to", "all", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    names = [o["name"] for o in doc["optimizers"]]
    assert names == po.available()
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.yaml" for n in names)
    assert doc["from"] == {"optimizer": "adamw", **ADAM_HP}
    muon_doc = next(o for o in doc["optimizers"] if o["name"] == "muon")
    assert muon_doc["rule"] and muon_doc["source"] and muon_doc["config"]["schema_version"] == 1


def test_cli_single_json_format(tmp_path):
    out = tmp_path / "muon.cfg"
    r = runner.invoke(app, ["transfer", MLP, "--lr", "0.02", "--from", "muon", "--convention", "keller",
                            "--convention", "moonlight", "--to", "muon", "--out", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(out.read_text())
    assert cfg["optimizer"] == "muon" and cfg["hyperparameters"]["scale"] == "match_rms_adamw"
    assert "Muon lr per matrix shape" in r.stdout


@pytest.mark.parametrize("args", [
    [], ["--lr", "abc"], ["--lr", "-1"], ["--lr", "1e-3", "--betas", "0.9"], ["--lr", "1e-3", "--to", "adamz"],
    ["--lr", "1e-3", "--from", "sgd"], ["--lr", "1e-3", "--to", "soap", "--convention", "keller"],
    ["--lr", "1e-3", "--to", "all", "--out", "{tmp}/configs.yaml"],
    ["--lr", "1e-3", "--weight-decay", "-0.1"],
    ["--lr", "1e-3", "--eps", "0", "--to", "shampoo"], ["--lr", "1e-3", "--betas", "0.9,0", "--to", "all"],
    ["--lr", "1e-3", "--to", "muon", "--out", "{tmp}/blocker/x.yaml"],
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, args):
    if any("blocker" in a for a in args):  # a parent of --out that is a file
        (tmp_path / "blocker").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "c.yaml")]
    r = runner.invoke(app, ["transfer", MLP, *args])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr
    assert [p for p in tmp_path.iterdir() if p.name != "blocker"] == []


def test_cli_writes_recommended_yaml_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["transfer", MLP, "--lr", "3e-3", "--to", "soap"])
    assert r.exit_code == 0, r.output
    assert "wrote recommended.yaml" in r.stdout
    assert yaml.safe_load((tmp_path / "recommended.yaml").read_text())["optimizer"] == "soap"
    r = runner.invoke(app, ["transfer", MLP, "--lr", "3e-3", "--to", "muon,adam-mini"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "recommended").iterdir()) == ["adam-mini.yaml", "muon.yaml"]


def test_per_shape_rules_also_match_under_ddp_and_compile_wrappers():
    model = _shapes_model()
    (t,) = transfer(inventory(model), "muon", lr=0.02, source="muon", convention="keller",
                    target_convention="moonlight")
    rule = t.config.param_groups[0]
    name = t.shapes[[s.lr for s in t.shapes].index(rule["hyperparameters"]["lr"])].names[0]
    for wrapped in (name, f"module.{name}", f"_orig_mod.{name}", f"module._orig_mod.{name}"):
        assert re.search(rule["name"], wrapped), wrapped
    assert not re.search(rule["name"], f"other.{name}")  # not any parameter whose path merely ends alike


def test_transfer_estimates_are_the_traced_peak_and_counted_overhead_of_the_config(tmp_path):
    """SPEC's estimates (total_peak_bytes, flop_overhead) for each transferred config, routing included, equal
    what `memory` and `flops` say of it at the same batch."""
    from precondtune import flops
    from precondtune.modelfile import load_model_file

    names = ["muon", "soap", "sophia", "iso"]  # Sophia's Hessian passes and Iso's hooks scale with F
    r = runner.invoke(app, ["transfer", str(load_example("chargpt").path), "--lr", "1e-3", "--to", ",".join(names),
                            "--batch-size", "4", "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    mf = load_model_file(load_example("chargpt").path)
    costs = {o["name"]: o for o in flops.flops_report(mf, names, batch_size=4).as_json()["optimizers"]}
    for o in json.loads(r.stdout)["optimizers"]:
        cfg = o["config"]
        est = cfg["estimates"]
        hp = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["hyperparameters"].items()}
        memory = precondtune.estimate_memory(mf.path, cfg["optimizer"], batch_size=4, hyperparameters=hp,
                                             routing=cfg["param_groups"])
        assert est["total_peak_bytes"] == memory["bytes"]["total_peak"] and est["batch_size"] == 4
        assert est["flop_overhead"] == pytest.approx(costs[cfg["optimizer"]]["overhead"], rel=1e-9)
        assert est["optimizer_step_flops"] == pytest.approx(costs[cfg["optimizer"]]["amortized_step_flops"], rel=1e-9)
        assert yaml.safe_load((tmp_path / f"{cfg['optimizer']}.yaml").read_text())["estimates"] == est


def test_transfer_without_a_batch_keeps_the_estimates_it_can_make(tmp_path):
    path = tmp_path / "nobatch.py"
    path.write_text("from torch import nn\n\n"
                    "def build_model():\n    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))\n")
    r = runner.invoke(app, ["transfer", str(path), "--lr", "1e-3", "--to", "muon", "--out", str(tmp_path / "m.yaml")])
    assert r.exit_code == 0, r.output
    est = yaml.safe_load((tmp_path / "m.yaml").read_text())["estimates"]
    assert set(est) == {"optimizer_state_bytes", "optimizer_step_flops"}


FLINEAR = '''
import torch, torch.nn.functional as F
from torch import nn

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = F.gelu(F.linear(F.gelu(self.a(x)), self.b.weight, self.b.bias))  # b's own forward is never called
        return self.head(h)

def build_model():
    return M()

def sample_batch(n):
    return torch.randn(n, 16), torch.randint(0, 4, (n,))

def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])
'''


def test_a_config_whose_step_cannot_be_traced_keeps_its_other_estimates_and_the_rest_are_written(tmp_path):
    (tmp_path / "flinear.py").write_text(FLINEAR)
    r = runner.invoke(app, ["transfer", str(tmp_path / "flinear.py"), "--lr", "1e-3", "--to", "adamw,iso,muon",
                            "--out", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    est = {o["name"]: o["config"]["estimates"] for o in doc["optimizers"]}
    assert "total_peak_bytes" not in est["iso"] and est["iso"]["optimizer_state_bytes"] > 0
    assert "total_peak_bytes" in est["adamw"] and "total_peak_bytes" in est["muon"]
    assert len(doc["notes"]) == 1 and doc["notes"][0].startswith("iso:")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adamw.yaml", "iso.yaml", "muon.yaml"]
