"""The model-file contract: every bad input answers with one clear line on stderr and exit code 2."""
from __future__ import annotations

import textwrap

import pytest
from conftest import EXAMPLES
from typer.testing import CliRunner

from precondtune.cli import app

runner = CliRunner()

GOOD_TAIL = """
import torch
def sample_batch(batch_size):
    return torch.randn(batch_size, 4)
"""

CASES = {
    "syntax_error": ("def build_model(:\n    pass\n", "syntax error"),
    "import_error": ("import precondtune_no_such_package\n", "No module named"),
    "raises_on_import": ("raise RuntimeError('boom at import')\n", "boom at import"),
    "no_factory": ("x = 1\n", "neither build_model() nor a module-level `model`"),
    "not_a_module": ("def build_model():\n    return 42\n", "not a torch.nn.Module"),
    "needs_arguments": ("def build_model(width):\n    return None\n", "needs arguments (width)"),
    "factory_raises": ("def build_model():\n    raise ValueError('bad width 0')\n", "bad width 0"),
    "no_sample_batch": ("import torch\ndef build_model():\n    return torch.nn.Linear(4, 1)\n",
                        "defines no sample_batch"),
    "forward_raises": (
        "import torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
        "        raise RuntimeError('shape mismatch in my block')\n"
        "def build_model():\n    return M()\n" + GOOD_TAIL, "shape mismatch in my block"),
    "non_scalar_loss": ("import torch\ndef build_model():\n    return torch.nn.Linear(4, 2)\n" + GOOD_TAIL,
                        "not a scalar"),
    "nan_loss": (
        "import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.ones(4))\n    def forward(self, x):\n"
        "        return (x * self.w).sum() * float('nan')\n"
        "def build_model():\n    return M()\n" + GOOD_TAIL, "loss is nan"),
    "backward_raises": (
        "import torch\nclass Bad(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x):\n"
        "        return x.clone()\n    @staticmethod\n    def backward(ctx, g):\n"
        "        raise RuntimeError('no gradient for this op')\n"
        "class M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.ones(4))\n    def forward(self, x):\n"
        "        return Bad.apply(x * self.w).sum()\n"
        "def build_model():\n    return M()\n" + GOOD_TAIL, "no gradient for this op"),
    "factory_exits": ("import sys\ndef build_model():\n    sys.exit('bye from the factory')\n",
                      "build_model() raised SystemExit: bye from the factory"),
    "lazy_module": ("import torch\ndef build_model():\n    return torch.nn.LazyLinear(2)\n" + GOOD_TAIL,
                    "parameter 'weight' is not initialised yet (a lazy module)"),
    "complex_parameter": (
        "import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.randn(4, dtype=torch.cfloat))\n    def forward(self, x):\n"
        "        return (x * self.w).abs().sum()\n"
        "def build_model():\n    return M()\n" + GOOD_TAIL, "complex parameter 'w'"),
    "complex_loss": ("import torch\ndef build_model():\n    return torch.nn.Linear(4, 1)\n" + GOOD_TAIL
                     + "def loss_fn(model, batch):\n    return model(batch).mean() * (1 + 1j)\n", "the loss is complex"),
}

# every command that runs the model file's step answers the same way
MORE_COMMANDS = [["memory", "-o", "adamw"], ["flops", "-o", "muon"], ["transfer", "--lr", "1e-3", "--to", "muon"],
                 ["tune", "-o", "adamw", "--trials", "1", "--steps", "2", "--storage", "memory"]]
MORE_CASES = {
    "no_graph_loss": ("import torch\ndef build_model():\n    return torch.nn.Linear(4, 1)\n" + GOOD_TAIL
                      + "def loss_fn(model, batch):\n    with torch.no_grad():\n        return model(batch).mean()\n",
                      "does not require grad"),
    "complex_loss": (CASES["complex_loss"][0], "the loss is complex"),
    "factory_exits": (CASES["factory_exits"][0], "SystemExit"),
}


def _check_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert len(err.splitlines()) == 1, err
    assert expected in err, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_file_gets_one_line_and_exit_2(tmp_path, case):
    source, expected = CASES[case]
    path = tmp_path / f"{case}.py"
    path.write_text(textwrap.dedent(source))
    result = runner.invoke(app, ["profile", str(path), "--steps", "1"])
    _check_one_line_error(result, expected)
    assert str(path) in result.stderr.replace("\n", "") or case in result.stderr


@pytest.mark.parametrize("command", MORE_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("case", sorted(MORE_CASES))
def test_bad_model_file_gets_one_line_from_every_command(tmp_path, case, command):
    source, expected = MORE_CASES[case]
    path = tmp_path / f"{case}.py"
    path.write_text(source)
    _check_one_line_error(runner.invoke(app, [command[0], str(path), *command[1:]]), expected)


def test_eval_batches_returning_nothing_is_refused(tmp_path):
    path = tmp_path / "no_eval.py"  # the mean loss of no batch would read as a perfect 0.0 for every trial
    path.write_text("import torch\ndef build_model():\n    return torch.nn.Linear(4, 1)\n" + GOOD_TAIL
                    + "def loss_fn(model, batch):\n    return model(batch).square().mean()\n"
                    + "def eval_batches():\n    return []\n")
    for args in (["tune", str(path), "--trials", "1", "--steps", "2", "--storage", "memory"],
                 ["plan", str(path), "--trials", "1", "--steps", "2", "--out", str(tmp_path / "r")]):
        _check_one_line_error(runner.invoke(app, args), "eval_batches() returned no batch")
    assert not (tmp_path / "r").exists()


def test_missing_file(tmp_path):
    result = runner.invoke(app, ["profile", str(tmp_path / "nope.py")])
    _check_one_line_error(result, "no such file")


def test_unknown_factory_name():
    result = runner.invoke(app, ["profile", f"{EXAMPLES / 'mlp.py'}:make_it"])
    _check_one_line_error(result, "has no callable 'make_it'")


def test_named_factory_and_module_level_model(tmp_path):
    path = tmp_path / "two.py"
    path.write_text("import torch\nmodel = torch.nn.Linear(4, 1)\n"
                    "def small():\n    return torch.nn.Linear(2, 1)\n"
                    "def sample_batch(n):\n    return torch.randn(n, 4)\n"
                    "def loss_fn(m, b):\n    return m(b[..., :m.in_features]).square().mean()\n")
    r1 = runner.invoke(app, ["profile", str(path), "--json", "--steps", "1"])
    r2 = runner.invoke(app, ["profile", f"{path}:small", "--json", "--steps", "1"])
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    assert '"parameters": 5' in r1.stdout and '"parameters": 3' in r2.stdout


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(CASES["factory_raises"][0])
    result = runner.invoke(app, ["profile", str(path), "--debug"])
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception) and "bad width 0" in str(result.exception)


def test_default_loss_uses_dot_loss_and_mapping(tmp_path):
    from precondtune.modelfile import load_model_file

    path = tmp_path / "hf_like.py"
    path.write_text(
        "import torch\nclass Out:\n    def __init__(self, loss):\n        self.loss = loss\n"
        "class M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lin = torch.nn.Linear(4, 1)\n"
        "    def forward(self, input_ids, labels):\n        return Out((self.lin(input_ids) - labels).square().mean())\n"
        "def build_model():\n    return M()\n"
        "def sample_batch(n):\n    return {'input_ids': torch.randn(n, 4), 'labels': torch.randn(n, 1)}\n")
    mf = load_model_file(path)
    model = mf.build()
    loss = mf.loss(model, mf.sample_batch(3))
    assert loss.dim() == 0 and loss.requires_grad


def test_console_script_usage_errors_are_one_line_and_exit_2():
    import subprocess
    import sys

    for args in (["memory", str(EXAMPLES / "mlp.py"), "--batch-size", "0"], ["no-such-command"],
                 ["profile", str(EXAMPLES / "missing.py")],
                 ["flops", str(EXAMPLES / "mlp.py"), "--measure", "--steps", "0"],
                 ["flops", str(EXAMPLES / "mlp.py"), "--measure", "--warmup", "-1"]):
        r = subprocess.run([sys.executable, "-m", "precondtune", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:"), r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_what_a_model_file_prints_goes_to_stderr_under_json(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "chatty.py"
    path.write_text(
        "import os\nimport torch\nimport torch.nn.functional as F\nprint('loading my model...')\n"
        "def build_model():\n    print('building')\n    os.system('echo from-a-subprocess')\n"
        "    os.write(1, b'straight-to-fd-1\\n')\n    return torch.nn.Linear(8, 4)\n"
        "def sample_batch(n):\n    return torch.randn(n, 8), torch.randint(4, (n,))\n"
        "def loss_fn(model, batch):\n    print('loss!')\n    return F.cross_entropy(model(batch[0]), batch[1])\n")
    for args in (["memory", str(path), "-o", "adamw", "--json"], ["profile", str(path), "--json", "--steps", "1"]):
        r = subprocess.run([sys.executable, "-m", "precondtune", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        json.loads(r.stdout)  # the document alone
        for text in ("building", "from-a-subprocess", "straight-to-fd-1"):  # Python, a child process, descriptor 1
            assert text in r.stderr and text not in r.stdout
    r = subprocess.run([sys.executable, "-m", "precondtune", "memory", str(path), "-o", "adamw"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "building" in r.stdout  # without --json prints stay where the file put them


def test_a_thread_the_model_file_leaves_running_does_not_keep_the_command_alive(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "threaded.py"
    path.write_text(
        "import threading, time\nimport torch\nimport torch.nn.functional as F\n"
        "threading.Thread(target=time.sleep, args=(600,), name='prefetcher').start()  # not a daemon\n"
        f"LOG = open({str(tmp_path / 'log.txt')!r}, 'a')\nLOG.write('loaded\\n')  # buffered, never closed\n"
        "def build_model():\n    return torch.nn.Linear(8, 4)\n"
        "def sample_batch(n):\n    return torch.randn(n, 8), torch.randint(4, (n,))\n"
        "def loss_fn(model, batch):\n    return F.cross_entropy(model(batch[0]), batch[1])\n")
    r = subprocess.run([sys.executable, "-m", "precondtune", "memory", str(path), "-o", "adamw", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["optimizers"][0]["name"] == "adamw"
    assert "not waiting for 1 thread(s)" in r.stderr and "'prefetcher'" in r.stderr
    assert (tmp_path / "log.txt").read_text() == "loaded\n"  # flushed, as a normal exit would
    bad = subprocess.run([sys.executable, "-m", "precondtune", "memory", str(path), "-o", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:"), bad.stderr
    # a --workers process loads the model file too, and the parent waits for it
    r = subprocess.run([sys.executable, "-m", "precondtune", "tune", str(path), "-o", "adamw", "--trials", "2",
                        "--steps", "4", "--workers", "2", "--storage", f"sqlite:///{tmp_path}/s.db", "--json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["new_trials"]["complete"] == 2
    # a worker that fails (here: the model file raises only in a child) ends too, and the parent says so
    (tmp_path / "child.py").write_text(path.read_text().replace(
        "def build_model", "import multiprocessing\nif multiprocessing.parent_process() is not None:\n"
        "    raise RuntimeError('only in a worker')\ndef build_model", 1))
    r = subprocess.run([sys.executable, "-m", "precondtune", "tune", str(tmp_path / "child.py"), "-o", "adamw",
                        "--trials", "2", "--steps", "4", "--workers", "2", "--storage", f"sqlite:///{tmp_path}/c.db"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2 and "1 worker process(es) exited with code 1" in r.stderr, r.stderr


def test_model_file_errors_name_the_fix(tmp_path):
    import torch

    from precondtune.errors import ModelFileError
    from precondtune.modelfile import load_model_file

    path = tmp_path / "m.py"
    path.write_text("import torch\n"
                    "def build_model():\n    return torch.nn.Linear(4, 4)\n"
                    "def sample_batch(n):\n    return {'x': torch.randn(n, 4)}\n")
    mf = load_model_file(path)
    with pytest.raises(ModelFileError, match=r"without loss_fn the loss is model\(\*\*batch\); define loss_fn"):
        mf.loss(mf.build(), {"y": torch.randn(2, 4)})
    path = tmp_path / "m2.py"
    path.write_text("import torch\n"
                    "def build_model():\n    return torch.nn.Linear(4, 4)\n"
                    "def sample_batch(n):\n    raise FileNotFoundError('data/')\n"
                    "def eval_batches():\n    raise KeyError('split')\n")
    mf = load_model_file(path)
    with pytest.raises(ModelFileError, match="fix sample_batch"):
        mf.sample_batch(2)
    with pytest.raises(ModelFileError, match="remove it to evaluate on fixed-seed draws"):
        mf.eval_batches(2)
    frozen = torch.nn.Linear(4, 1).requires_grad_(False)
    with pytest.raises(ModelFileError, match="no parameter of the model requires grad"):
        mf.check_first_step(frozen, torch.randn(1, 4))
