"""`precondtune plan` end to end on tiny settings: outputs, a loadable config, nothing-fits, meta models, resume."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
import yaml
from conftest import EXAMPLES, load_example
from typer.testing import CliRunner

import precondtune
from precondtune.cli import app
from precondtune.plan import Candidate, decide

runner = CliRunner()
TINY = ["--trials", "2", "--steps", "8", "--seeds", "2", "--batch-size", "8", "--device", "cpu"]


def test_end_to_end_writes_a_config_that_builds_and_trains(tmp_path):
    out = tmp_path / "report"
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw,muon", *TINY, "--out", str(out),
                            "--storage", f"sqlite:///{tmp_path / 's.db'}", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["winner"] in ("adamw", "muon")
    for name in ("recommended.yaml", "report.md", "results.csv", "memory.png", "overhead.png", "loss_curves.png",
                 "search_history.png"):
        assert (out / name).stat().st_size > 0, name
    cfg = yaml.safe_load((out / "recommended.yaml").read_text())
    assert cfg["schema_version"] == 1 and cfg["optimizer"] == doc["winner"]
    assert cfg["evidence"]["adamw_eval_loss"] is not None
    mf = load_example("mlp")
    model = mf.build()
    opt = precondtune.build_optimizer(model, out / "recommended.yaml")
    before = [p.detach().clone() for p in model.parameters()]
    mf.loss(model, mf.sample_batch(8)).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    report = (out / "report.md").read_text()
    assert "## Recommendation" in report and "## Memory" in report and "precondtune plan" in report
    from precondtune.units import human_bytes

    state = next(o for o in doc["optimizers"] if o["name"] == "muon")["bytes"]["optimizer_state"]
    assert f"| muon | {human_bytes(state)} |" in report  # readable units: a small model's GiB read 0.000
    rows = [o for o in doc["optimizers"] if o["status"] == "ranked"]
    assert {o["name"] for o in rows} == {"adamw", "muon"}
    assert all(len(o["seed_losses"]) == 2 for o in rows)


def test_nothing_fits_is_a_clear_report_and_exit_1(tmp_path):
    out = tmp_path / "r"
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw,soap", *TINY, "--gpu", "l4",
                            "--reserve-gb", "23.99999", "--out", str(out), "--storage", "memory"])
    assert r.exit_code == 1, r.output
    assert "nothing fits" in r.stdout
    assert "nothing fits" in (out / "report.md").read_text()
    assert not (out / "recommended.yaml").exists()


def test_meta_model_gets_memory_and_overhead_and_a_note(tmp_path):
    out = tmp_path / "r"
    r = runner.invoke(app, ["plan", str(EXAMPLES / "llama7b_meta.py"), "-o", "adamw,muon", "--batch-size", "1",
                            "--param-dtype", "bf16", "--gpu", "h200", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["winner"] is None and "meta device" in doc["reason"] and "smaller config" in doc["reason"]
    assert all(o["status"] == "not searched" and o["overhead"] is not None for o in doc["optimizers"])
    assert (out / "memory.png").exists()
    report = (out / "report.md").read_text()  # it says what ran, and no more
    assert "Searches and ranking: not run" in report and "trials per optimizer" not in report
    assert "Search evidence" not in report and "0.0000" not in report


def test_bad_options_one_line_exit_2(tmp_path):
    for args, expected in ((["-o", "nope"], "unknown optimizer"), (["--rank-by", "vibes"], "--rank-by"),
                           (["--adam-betas", "0.9"], "--adam-lr"), (["--set", "nosuchknob=1"], "nosuchknob"),
                           (["-o", "muon", "--set", "soap:lr=1"], "not among the planned")):
        r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), *args, "--out", str(tmp_path / "x")])
        assert r.exit_code == 2, (args, r.output)
        assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _cand(name: str, losses: list[float]) -> Candidate:
    return Candidate(name, {"fits": True}, rank_losses=losses)


def test_decision_keeps_adamw_within_seed_noise():
    assert decide([_cand("adamw", [2.00, 2.10]), _cand("muon", [1.99, 2.05])])[0] == "adamw"
    assert decide([_cand("adamw", [2.00, 2.02]), _cand("muon", [1.80, 1.82])])[0] == "muon"
    assert decide([_cand("adamw", [2.00, 2.02]), _cand("soap", [float("inf"), 1.0])])[0] == "adamw"
    winner, why = decide([_cand("adamw", [2.0]), _cand("muon", [1.9])])
    assert winner == "adamw" and "one seed" in why
    winner, why = decide([_cand("adamw", [float("nan"), 2.0]), _cand("muon", [1.9, 1.95])])
    assert winner == "muon" and "did not finish" in why


def test_interrupted_plan_resumes_from_its_storage(tmp_path):
    db = tmp_path / "plan.db"
    url = f"sqlite:///{db}"
    cmd = [sys.executable, "-m", "precondtune", "plan", str(EXAMPLES / "mlp.py"), "-o", "adamw,adafactor",
           "--trials", "3", "--steps", "8", "--seeds", "1", "--batch-size", "8", "--device", "cpu",
           "--storage", url, "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study = None
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            study = next(n for n in optuna.get_all_study_names(url) if n.startswith("plan-mlp-adamw-s8-b8-seed0-"))
            s = optuna.load_study(study_name=study, storage=url)
            done = sum(t.state.is_finished() for t in s.get_trials(deepcopy=False))
        except Exception:
            done = 0
        if done >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    kept = {t.number: t.value for t in optuna.load_study(study_name=study, storage=url).get_trials()
            if t.state.is_finished()}
    assert len(kept) >= 2
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-500:]
    after = optuna.load_study(study_name=study, storage=url).get_trials()
    finished = {t.number: t.value for t in after if t.state.is_finished()}
    assert {k: v for k, v in finished.items() if k in kept} == kept  # nothing lost
    interrupted = [t for t in after if str(t.user_attrs.get("fail_reason", "")).startswith("interrupted")]
    assert len(finished) - len(interrupted) == 3  # topped up to --trials, not re-run; an interrupted trial redone
    assert "resuming" in r.stderr


@pytest.mark.parametrize("rank_by", ["steps"])
def test_rank_by_steps_set_and_json_format(tmp_path, rank_by):
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw,adam-mini", *TINY, "--rank-by", rank_by,
                            "--set", "adam-mini:weight_decay=0.0", "--set", "beta1=0.9", "--format", "json",
                            "--out", str(tmp_path / "r"), "--storage", "memory", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {o["rank_steps"] for o in doc["optimizers"]} == {8}
    hp = {o["name"]: o["hyperparameters"] for o in doc["optimizers"]}
    assert hp["adam-mini"]["weight_decay"] == 0.0
    assert all(h["betas"][0] == pytest.approx(0.9) for h in hp.values())
    assert json.loads((tmp_path / "r" / "recommended.json").read_text())["schema_version"] == 1
    report = (tmp_path / "r" / "report.md").read_text()
    assert 'build_optimizer(model, "recommended.json")' in report and "recommended.yaml" not in report


def test_tuned_adamw_values_reach_the_fallback_groups():
    from precondtune.optim import build, get_spec
    from precondtune.search import AdamWReference, fallback_routing

    ref = AdamWReference(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    rules = fallback_routing(get_spec("muon"), ref)
    assert rules and rules[0]["optimizer"] == "adamw" and rules[0]["hyperparameters"]["lr"] == 3e-3
    assert fallback_routing(get_spec("adamw"), ref) is None and fallback_routing(get_spec("muon"), None) is None
    opt = build("muon", load_example("chargpt").build(), routing=rules)
    adam_groups = [g for g in opt.param_groups if g["role"] in ("embedding", "head", "vector")]
    assert adam_groups and all(g["lr"] == 3e-3 and tuple(g["betas"]) == (0.9, 0.95) for g in adam_groups)


NOMAT = ("import torch\nfrom torch import nn\nclass M(nn.Module):\n    def __init__(self):\n"
         "        super().__init__()\n        self.emb = nn.Embedding(10, 4)\n"
         "    def forward(self, x):\n        return self.emb(x).pow(2).mean()\n"
         "def build_model():\n    return M()\n"
         "def sample_batch(n):\n    return torch.randint(10, (n, 3))\n")
NOLOGITS = ("import torch\nimport torch.nn.functional as F\n"
            "def build_model():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))\n"
            "def sample_batch(n):\n    return torch.randn(n, 4), torch.randint(3, (n,))\n"
            "def loss_fn(model, batch):\n    return F.cross_entropy(model(batch[0]), batch[1])\n")


@pytest.mark.parametrize("source, name, status, needle", [
    (NOMAT, "muon", "not applicable", ""),  # nothing for Muon to update
    (NOLOGITS, "sophia", "not searched", "--set estimator=hutchinson"),  # its default estimator needs logits_fn
])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # NOMAT counts no FLOPs: no NaN bar reaches a plot
def test_an_optimizer_this_model_cannot_take_is_noted_and_the_plan_goes_on(tmp_path, source, name, status, needle):
    path = tmp_path / "model.py"
    path.write_text(source)
    r = runner.invoke(app, ["plan", str(path), "-o", f"adamw,{name}", *TINY, "--storage", "memory",
                            "--out", str(tmp_path / "r"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    row = next(o for o in doc["optimizers"] if o["name"] == name)
    assert row["status"] == status and row["median_eval_loss"] is None and needle in (row["note"] or "")
    assert doc["winner"] == "adamw"
    if doc["optimizers"][0]["overhead"] is None:  # nothing to plot: no overhead.png, and report.md does not link it
        assert not (tmp_path / "r" / "overhead.png").exists()
        assert "overhead.png" not in (tmp_path / "r" / "report.md").read_text()
        assert yaml.safe_load((tmp_path / "r" / "recommended.yaml").read_text())["estimates"]["flop_overhead"] is None


def test_under_fsdp_only_optimizers_that_run_sharded_are_searched(tmp_path):
    """A plan for an FSDP run must recommend a config that builds on FSDP2's sharded parameters."""
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw,muon,soap", *TINY, "--storage", "memory",
                            "--sharding", "fsdp", "--world-size", "2", "--out", str(tmp_path / "r"), "--json"])
    assert r.exit_code == 0, r.output
    rows = {o["name"]: o for o in json.loads(r.stdout)["optimizers"]}
    assert rows["soap"]["status"] == "not runnable sharded" and rows["soap"]["median_eval_loss"] is None
    assert "refuses FSDP2's sharded ones" in rows["soap"]["note"]
    assert rows["muon"]["status"] == rows["adamw"]["status"] == "ranked"


def test_a_ddp_plan_counts_the_gradient_buckets_unless_they_are_views(tmp_path):
    quick = ["-o", "adamw", "--trials", "1", "--steps", "2", "--seeds", "1", "--batch-size", "4", "--device", "cpu",
             "--storage", "memory", "--world-size", "2", "--json"]
    got = {}
    for flag in ([], ["--bucket-view"]):
        r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), *quick, *flag, "--out", str(tmp_path / str(flag))])
        assert r.exit_code == 0, r.output
        got[bool(flag)] = json.loads(r.stdout)["optimizers"][0]["bytes"]
    assert got[False]["ddp_buckets"] == got[False]["gradients"] > 0 and got[True]["ddp_buckets"] == 0
    assert got[False]["total_peak"] - got[True]["total_peak"] == got[False]["gradients"]


def _cand(name, losses):
    c = Candidate(name, {"fits": True})
    c.rank_losses = losses
    return c


def test_decide_takes_the_best_candidate_that_beats_adamw_beyond_noise():
    # muon has the lowest median but a wide spread; soap beats AdamW by 0.2 with a spread of 0.01
    winner, why = decide([_cand("adamw", [2.00, 2.01]), _cand("muon", [1.5, 2.1]), _cand("soap", [1.80, 1.81])])
    assert winner == "soap" and "muon ranked higher" in why
    winner, _ = decide([_cand("adamw", [2.00, 2.01]), _cand("muon", [1.5, 2.1]), _cand("soap", [1.99, 2.05])])
    assert winner == "adamw"


def test_identical_seed_runs_do_not_count_as_measured_noise():
    # a model file that calls torch.manual_seed itself makes every seed run the same: a spread of 0 is not evidence
    winner, why = decide([_cand("adamw", [2.0, 2.0]), _cand("muon", [1.9, 1.9])])
    assert winner == "adamw" and "every seed gave the same loss" in why
    assert decide([_cand("adamw", [2.0, 2.01]), _cand("muon", [1.9, 1.9])])[0] == "muon"


def test_plans_with_different_set_items_or_model_files_get_their_own_studies(tmp_path):
    from precondtune.modelfile import load_model_file
    from precondtune.plan import PlanSettings, _study_name

    s = PlanSettings()
    mf = load_example("mlp")
    a = _study_name(s, mf, "muon", ("ns_steps=4",))
    assert a == _study_name(s, mf, "muon", ("ns_steps=4",)) and a != _study_name(s, mf, "muon", ("ns_steps=6",))
    other = tmp_path / "mlp.py"
    other.write_text((EXAMPLES / "mlp.py").read_text())
    before = _study_name(s, load_model_file(other), "muon", ("ns_steps=4",))
    assert before != a  # same stem, another file
    other.write_text((EXAMPLES / "mlp.py").read_text().replace("GELU", "Tanh"))  # the file edited in place
    assert _study_name(s, load_model_file(other), "muon", ("ns_steps=4",)) != before


def test_the_tuned_config_is_what_memory_and_estimates_describe():
    from precondtune import optim as po
    from precondtune.plan import PlanSettings, plan, po_config

    mf = load_example("mlp")
    r = plan(mf, PlanSettings(optimizers="adafactor", trials=1, steps=8, seeds=1, batch_size=8, device="cpu",
                              storage="memory", fixed=("adafactor:momentum=true",)))
    c = r.by_name["adafactor"]
    assert c.hyperparameters["beta1"] is not None  # momentum on: a first-moment buffer per parameter
    exact = po.state_bytes("adafactor", mf.build(), **po_config(c))
    assert c.memory["bytes"]["optimizer_state"] == exact
    assert exact > po.state_bytes("adafactor", mf.build())  # the defaults (no momentum) would have said less
    assert next(e for e in r.memory["optimizers"] if e["name"] == "adafactor") is c.memory


@pytest.mark.parametrize("args, needle", [
    (["--format", "toml"], "--format"),
    (["--set", "muon:ns_steps=99"], "ns_steps"),
    (["--enqueue", "adamw:lr=0.01,bogus=1"], "valid:"),
    (["--storage", "ftp://nowhere"], "not a storage URL"),
    (["--storage", "sqlite:///"], "no file name"),
    (["--set", "muon:lr=0.02", "--enqueue", "muon:lr=0.05"], "contradicts --set lr=0.02"),
    (["--out", "/dev/null/report"], "is a file, not a directory"),
    (["--gpu", "rtx9999"], "unknown GPU profile"),
    (["--param-dtype", "int8"], "unknown dtype"),
    (["--world-size", "0"], "--world-size 0 is out of range"),
    (["--study-name", " "], "--study-name is empty"),
    (["--storage", "sqlite:////proc/precondtune.db"], "/proc"),  # cannot create a file there (or no /proc)
])
def test_bad_options_fail_before_any_stage_runs(tmp_path, monkeypatch, args, needle):
    import precondtune.plan as plan_module

    def must_not_run(*_a, **_k):
        raise AssertionError("a stage ran before the options were checked")

    monkeypatch.setattr(plan_module, "profile_model", must_not_run)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw,muon", *TINY, *args])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert not any(tmp_path.iterdir())  # nothing written


def test_out_that_is_a_file_is_rejected_first(tmp_path):
    f = tmp_path / "report"
    f.write_text("x")
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw", *TINY, "--out", str(f)])
    assert r.exit_code == 2 and "is a file" in r.output


def test_a_reused_out_directory_keeps_no_stale_config(tmp_path):
    out = tmp_path / "r"
    ok = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw", *TINY, "--out", str(out),
                             "--storage", "memory"])
    assert ok.exit_code == 0 and (out / "recommended.yaml").exists()
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw", *TINY, "--gpu", "l4",
                            "--reserve-gb", "23.99999", "--out", str(out), "--storage", "memory"])
    assert r.exit_code == 1 and "nothing fits" in (out / "report.md").read_text()
    assert not (out / "recommended.yaml").exists() and not (out / "loss_curves.png").exists()


RAW_PARAM = '''
import torch
import torch.nn.functional as F
from torch import nn

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(8, 16))  # a learned positional table as a raw parameter
        self.emb = nn.Embedding(30, 16)
        self.hidden = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 30)

    def forward(self, x):
        return self.fc(torch.tanh(self.hidden(self.emb(x) + self.pos)))

def build_model():
    return M()

def sample_batch(batch_size):
    return torch.randint(0, 30, (batch_size, 8)), torch.randint(0, 30, (batch_size, 8))

def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())
'''


def test_plan_runs_on_a_model_with_a_raw_matrix_parameter(tmp_path):
    path = tmp_path / "rawparam.py"
    path.write_text(RAW_PARAM)
    r = runner.invoke(app, ["plan", str(path), "-o", "adamw,iso,muon", "--trials", "1", "--steps", "6", "--seeds", "1",
                            "--batch-size", "4", "--device", "cpu", "--storage", "memory", "--out",
                            str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {o["name"]: o["status"] for o in doc["optimizers"]}["iso"] == "ranked"


def test_timing_passes_that_disagree_are_pointed_out(tmp_path, monkeypatch):
    """Other work on the machine during the timing stage: the equal-wall-clock steps rest on uncertain timings,
    and the console, report.md and --json say so; with agreeing passes nothing is said."""
    from precondtune import plan as plan_module

    real, calls = plan_module.measure_step_times, []

    def busy_second_pass(*a, **k):
        m = real(*a, **k)
        calls.append(a[1])
        slow = len(calls) > 2 and a[1] == "adamw"  # the second pass of AdamW ran 3x slower
        return dataclasses.replace(m, amortized_step_seconds=m.amortized_step_seconds * 3) if slow else m

    monkeypatch.setattr(plan_module, "measure_step_times", busy_second_pass)
    args = ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw,adam-mini", *TINY, "--storage", "memory"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "r"), "--json"])
    assert r.exit_code == 0, r.output
    warning = json.loads(r.stdout)["timing_warning"]
    assert warning.startswith("step times are uncertain: adamw timed") and "--rank-by steps" in warning
    assert f"**Warning:** {warning}." in (tmp_path / "r" / "report.md").read_text()
    assert "warning: step times are uncertain" in r.stderr
    first: dict[str, object] = {}

    def steady(*a, **k):  # both passes of a config time the same
        return first.setdefault(a[1], real(*a, **k))

    monkeypatch.setattr(plan_module, "measure_step_times", steady)
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "q"), "--json"])
    assert quiet.exit_code == 0 and json.loads(quiet.stdout)["timing_warning"] is None, quiet.output
    assert "uncertain" not in (tmp_path / "q" / "report.md").read_text()


@pytest.mark.parametrize("slower, steps, status", [(3.0, 2, "ranked"), (100.0, None, "too slow")])
def test_equal_wall_clock_never_hands_an_optimizer_more_steps_than_adamw_s_time(tmp_path, monkeypatch, slower, steps,
                                                                                 status):
    """adam-mini timed `slower` x AdamW's step: it is ranked on the steps that fit into AdamW's 8 steps' time (or,
    when not one does, not ranked), never on more."""
    from precondtune import plan as plan_module

    real, adamw = plan_module.measure_step_times, {}

    def timed(*a, **k):  # AdamW is timed first (it leads -o): its first time holds, adam-mini's follows it
        m = real(*a, **k)
        seconds = adamw.setdefault("s", m.amortized_step_seconds)
        return dataclasses.replace(m, amortized_step_seconds=seconds * (1.0 if a[1] == "adamw" else slower))

    monkeypatch.setattr(plan_module, "measure_step_times", timed)
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), "-o", "adamw,adam-mini", *TINY, "--storage", "memory",
                            "--out", str(tmp_path / "r"), "--json"])
    assert r.exit_code == 0, r.output
    rows = {o["name"]: o for o in json.loads(r.stdout)["optimizers"]}
    assert rows["adamw"]["rank_steps"] == 8
    assert rows["adam-mini"]["status"] == status and rows["adam-mini"]["rank_steps"] == steps, rows["adam-mini"]
    if steps is None:
        assert rows["adam-mini"]["median_eval_loss"] is None and "not one step" in rows["adam-mini"]["note"]
    else:
        assert f"ranked on {steps}" in rows["adam-mini"]["note"]


def test_a_planned_dtype_the_searches_do_not_train_in_is_said_and_one_seed_has_no_spread(tmp_path):
    quick = ["-o", "adamw", "--trials", "1", "--steps", "2", "--seeds", "1", "--batch-size", "4", "--device", "cpu",
             "--storage", "memory"]
    r = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), *quick, "--param-dtype", "bf16",
                            "--out", str(tmp_path / "r")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "note: memory is planned with --param-dtype bf16; the searches" in r.stdout
    assert "(fp32 parameters" in (tmp_path / "r" / "report.md").read_text()
    row = next(line for line in r.stdout.splitlines() if "adamw" in line and "ranked" in line)
    assert "0.0000" not in row  # the seed spread of one seed is unmeasured, not zero
    same = runner.invoke(app, ["plan", str(EXAMPLES / "mlp.py"), *quick, "--param-dtype", "fp32", "--json",
                               "--out", str(tmp_path / "s")])
    assert same.exit_code == 0 and json.loads(same.stdout)["dtype_note"] is None, same.output


def test_a_model_file_rejected_at_the_first_stage_leaves_no_storage_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.py").write_text("def build_model():\n    raise ValueError('bad width 0')\n")
    r = runner.invoke(app, ["plan", "bad.py", *TINY])
    assert r.exit_code == 2 and "bad width 0" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.py"]  # no precondtune-studies.db
