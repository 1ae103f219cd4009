"""The model-file contract (SPEC.md): import a user's ``model.py`` by path and find its callables.

A model file provides ``build_model()`` (or a module-level ``model``), and for anything that runs steps
``sample_batch(batch_size)``; optionally ``loss_fn(model, batch)``, ``eval_batches()`` and
``logits_fn(model, batch)``. ``path/to/model.py:factory`` names another factory. Importing the file runs
its code, exactly as ``python model.py`` would.

Every problem becomes a :class:`ModelFileError` with one line naming the file, the problem and the fix.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import ModelFileError

EVAL_SEED = 1234
"""Seed of the default held-out batches drawn from ``sample_batch`` when a file has no ``eval_batches``."""
DEFAULT_EVAL_BATCHES = 4


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())[:400]


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``"model.py:make"`` -> ``(Path("model.py"), "make")``; a bare path -> ``(path, None)``."""
    if ":" in spec and not Path(spec).exists():
        path, _, factory = spec.rpartition(":")
        return Path(path), factory or None
    return Path(spec), None


def import_file(path: Path) -> ModuleType:
    """Import a Python file by path under a unique module name, turning every failure into one line."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such file; pass the path to a Python model file such as examples/mlp.py")
    if path.is_dir() or path.suffix != ".py":
        raise ModelFileError(f"{path}: not a Python file; pass a .py model file (see README: the model-file contract)")
    name = "precondtune_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py path always yields a spec
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[name]
        raise ModelFileError(f"{path}:{e.lineno}: syntax error: {e.msg}; fix the file and run again") from e
    except ImportError as e:
        del sys.modules[name]
        raise ModelFileError(
            f"{path}: importing it failed with {_one_line(e)}; install the missing package or fix the import"
        ) from e
    except BaseException as e:  # the file's own code raised while importing
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ModelFileError(f"{path}: importing it raised {_one_line(e)}; fix the file's top-level code") from e
    return module


def map_batch(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` applied to every tensor of a (nested) batch: lists, tuples, named tuples and mappings (dicts, and
    ``UserDict``s such as Hugging Face's ``BatchEncoding``) keep their type."""
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_batch(v, fn) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_batch(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_batch(v, fn) for v in batch)
    return batch


def move_to(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    return map_batch(batch, lambda t: t.to(device))


def iter_tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) batch, in order."""
    if torch.is_tensor(batch):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from iter_tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from iter_tensors(v)


def tokens_in(batch: Any) -> int:
    """Tokens per batch: elements of the batch's first integer tensor (token ids), else its leading dimension."""
    tensors = list(iter_tensors(batch))
    for t in tensors:
        if not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool:
            return t.numel()
    return tensors[0].shape[0] if tensors and tensors[0].dim() else 1


def _model_call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], str]:
    """How :func:`default_loss` calls the model on ``batch``: (args, kwargs, the call as written)."""
    if isinstance(batch, Mapping):
        return (), dict(batch), "model(**batch)"
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return tuple(batch), {}, "model(*batch)"
    return (batch,), {}, "model(batch)"


def check_loss(out: Any, path: Any) -> torch.Tensor:
    """``out`` if it is a one-element tensor (a scalar loss); else the model file's mistake, as one line."""
    if not torch.is_tensor(out):
        raise ModelFileError(f"{path}: the loss is of type {type(out).__name__}, not a tensor; loss_fn must return a "
                             "scalar tensor")
    if out.numel() != 1:
        raise ModelFileError(f"{path}: the loss has shape {tuple(out.shape)}, not a scalar; reduce it (e.g. .mean()) "
                             "in loss_fn")
    if out.is_complex():
        raise ModelFileError(f"{path}: the loss is complex ({out.dtype}); return a real scalar (e.g. its .abs() or "
                             ".real) from loss_fn")
    return out


def check_parameters(model: nn.Module, owner: str) -> None:
    """The model's trainable parameters are ones precondtune's optimizers can take: initialised (no lazy
    modules left) and real. ``owner`` names the model in messages ("m.py:build_model() returned a model")."""
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ModelFileError(f"{owner} whose parameter {name!r} is not initialised yet (a lazy module); run one "
                                 "forward pass on a sample input before returning the model")
        if p.requires_grad and p.is_complex():
            raise ModelFileError(f"{owner} with the complex parameter {name!r} ({p.dtype}); "
                                 "precondtune's optimizers update real tensors: keep real and imaginary parts as "
                                 "two real parameters (torch.view_as_complex in forward)")


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """SPEC default: call the model on the batch; a scalar output is the loss, else its ``.loss`` / ``["loss"]``."""
    args, kwargs, _ = _model_call(batch)
    out = model(*args, **kwargs)
    if torch.is_tensor(out):
        return out
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if hasattr(out, "loss"):
        return out.loss
    raise ModelFileError(
        f"the model's output is a {type(out).__name__}, not a scalar loss; define loss_fn(model, batch) in the model file"
    )


@dataclass
class ModelFile:
    """A loaded model file: its path, module and the contract's callables."""

    path: Path
    module: ModuleType
    factory_name: str | None
    factory: Callable[[], Any] | None
    sample_batch_fn: Callable[[int], Any] | None
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None
    eval_batches_fn: Callable[[], Any] | None
    logits_fn: Callable[[nn.Module, Any], torch.Tensor] | None
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """A short name for reports (the file's stem)."""
        return self.path.stem

    def build(self) -> nn.Module:
        """Call the factory (or return the module-level ``model``) and check it is an ``nn.Module``."""
        if self.factory is None:
            assert self._model is not None
            check_parameters(self._model, f"{self.path}: `model` is a model")
            return self._model
        where = f"{self.path}:{self.factory_name}"
        try:
            sig = inspect.signature(self.factory)
            needed = [p.name for p in sig.parameters.values()
                      if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            needed = []
        if needed:
            raise ModelFileError(
                f"{where} needs arguments ({', '.join(needed)}); give them defaults or add a no-argument "
                f"factory and pass {self.path}:that_factory"
            )
        try:
            model = self.factory()
        except ModelFileError:
            raise
        except (Exception, SystemExit) as e:
            raise ModelFileError(f"{where}() raised {_one_line(e)}; fix the factory") from e
        if not isinstance(model, nn.Module):
            raise ModelFileError(
                f"{where}() returned {type(model).__name__}, not a torch.nn.Module; return the model to train"
            )
        check_parameters(model, f"{where}() returned a model")
        return model

    @property
    def can_sample(self) -> bool:
        return self.sample_batch_fn is not None

    def sample_batch(self, batch_size: int) -> Any:
        """One training batch from the file's ``sample_batch``; a clear error when it is missing or raises."""
        if self.sample_batch_fn is None:
            raise ModelFileError(
                f"{self.path}: defines no sample_batch(batch_size); add one that returns a training batch"
            )
        try:
            return self.sample_batch_fn(batch_size)
        except (Exception, SystemExit) as e:
            raise ModelFileError(f"{self.path}: sample_batch({batch_size}) raised {_one_line(e)}; fix sample_batch "
                                 "(it gets the batch size and returns one training batch)") from e

    def eval_batches(self, batch_size: int, n: int = DEFAULT_EVAL_BATCHES) -> list[Any]:
        """The file's ``eval_batches()``, else ``n`` batches drawn from ``sample_batch`` under a fixed seed."""
        if self.eval_batches_fn is not None:
            try:
                batches = list(self.eval_batches_fn())
            except (Exception, SystemExit) as e:
                raise ModelFileError(f"{self.path}: eval_batches() raised {_one_line(e)}; fix it, or remove it to "
                                     "evaluate on fixed-seed draws of sample_batch") from e
            if not batches:  # the mean loss of no batch would read as a perfect 0.0
                raise ModelFileError(f"{self.path}: eval_batches() returned no batch; return at least one, or "
                                     "remove it to evaluate on fixed-seed draws of sample_batch")
            return batches
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVAL_SEED)
            return [self.sample_batch(batch_size) for _ in range(n)]

    def raw_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss as the file defines it, without validation (used inside tracing and timing)."""
        return (self.loss_fn or default_loss)(model, batch)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of ``batch``; the model's own error, a non-scalar or a non-tensor loss become one line."""
        try:
            out = self.raw_loss(model, batch)
        except ModelFileError:
            raise
        except torch.OutOfMemoryError:
            raise
        except (Exception, SystemExit) as e:
            if self.loss_fn:
                fn, fix = "loss_fn", "fix the model or loss_fn for this batch"
            else:
                fn, fix = "the model's forward", (f"without loss_fn the loss is {_model_call(batch)[2]}; define "
                                                  "loss_fn(model, batch) or fix the model")
            raise ModelFileError(f"{self.path}: {fn} raised {_one_line(e)}; {fix}") from e
        return check_loss(out, self.path).reshape(())

    def check_first_step(self, model: nn.Module, batch: Any) -> float:
        """Run forward+backward once, turning failures (including a NaN/inf loss) into one clear line."""
        loss = self.loss(model, batch)
        if loss.device.type != "meta":
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ModelFileError(
                    f"{self.path}: the first step's loss is {value}; check the model's initialisation and inputs"
                )
        else:
            value = float("nan")
        self.backward(model, loss)
        return value

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        """``loss.backward()``; a loss that cannot be backpropagated (no graph, frozen model) is one clear line."""
        try:
            loss.backward()
        except Exception as e:
            hint = ("no parameter of the model requires grad" if not any(p.requires_grad for p in model.parameters())
                    else "check that the loss comes from the model's parameters")
            raise ModelFileError(f"{self.path}: backward raised {_one_line(e)}; {hint}") from e


def load_model_file(spec: str | Path) -> ModelFile:
    """Import ``path[:factory]`` and collect the contract's callables (SPEC.md, "The model file contract")."""
    path, factory_name = split_spec(str(spec))
    module = import_file(path)
    factory: Callable[[], Any] | None = None
    model_obj: nn.Module | None = None
    if factory_name is not None:
        factory = getattr(module, factory_name, None)
        if factory is None or not callable(factory):
            raise ModelFileError(f"{path}: has no callable {factory_name!r}; check the name after the ':'")
    elif callable(getattr(module, "build_model", None)):
        factory, factory_name = module.build_model, "build_model"
    elif isinstance(getattr(module, "model", None), nn.Module):
        model_obj = module.model
    else:
        raise ModelFileError(
            f"{path}: defines neither build_model() nor a module-level `model`; add build_model() returning "
            f"an nn.Module, or pass {path}:your_factory"
        )

    def opt(name: str) -> Callable | None:
        fn = getattr(module, name, None)
        return fn if callable(fn) else None

    return ModelFile(
        path=path, module=module, factory_name=factory_name, factory=factory,
        sample_batch_fn=opt("sample_batch"), loss_fn=opt("loss_fn"), eval_batches_fn=opt("eval_batches"),
        logits_fn=opt("logits_fn"), _model=model_obj,
    )


def is_meta(model: nn.Module) -> bool:
    """True when the model's parameters live on the meta device (planning-only)."""
    return any(p.device.type == "meta" for p in model.parameters())
