"""A generic adapter: features read from any module of any torch model.

A layer is the input (or, with ``:output``, the output) of a module named by its
dotted path in the model (``mlp.layers.3``, ``readouts.1``), read with a forward
hook. The captured tensor must have one row per atom of the batch; extra trailing
dimensions are flattened.

Two ways to give the model:

* ``base=<registry name>``: a registered model (e.g. ``chgnet-0.3.0``) supplies the
  loading, the neighbour graphs and the forward pass; the hooks choose other
  modules than its ``bb``/``ll`` (a base that stops its forward pass after its own
  last layer, as SevenNet does, runs only the modules up to there);
* ``path=<file>`` and ``runner=<package.module:function>``: a TorchScript file or a
  pickled ``torch.nn.Module`` (``torch.save(model)``), and an importable function
  ``runner(model, frames, device)`` that runs the forward pass on a list of
  ``ase.Atoms`` (the runner must be importable on the workers).

Layer dimensions are found on the first batch.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfre.errors import DfreError
from dfre.models.base import (
    FeatureExtractor,
    Layer,
    ModelSpec,
    check_checkpoint,
    load_extractor,
    register,
    require_file,
    torch_device,
)


def find_module(model: Any, path: str) -> Any:
    """The submodule of ``model`` at dotted ``path``; a DfreError naming close options."""
    names = dict(model.named_modules())
    if path in names:
        return names[path]
    prefix = path.rsplit(".", 1)[0] if "." in path else ""
    options = [n for n in names if n and n.startswith(prefix)][:8]
    raise DfreError(
        f"the model has no module '{path}'; modules there include: {', '.join(options)}"
    )


class GenericExtractor(FeatureExtractor):
    """Features captured by hooks on named modules of a torch model."""

    def __init__(
        self,
        name: str,
        model: Any,
        hooks: dict[str, str],
        *,
        base: FeatureExtractor | None = None,
        runner: Any = None,
        device: str = "cpu",
        weights: str | None = None,
        cutoff: float = 0.0,
    ):
        if not hooks:
            raise DfreError("the generic model needs at least one --hook LAYER=MODULE")
        self.name = name
        self.model = model
        self.base = base
        self.runner = runner
        self.device = device
        self.weights_path = weights
        self.cutoff = base.cutoff if base is not None else float(cutoff)
        if base is not None:
            self.supported_elements = base.supported_elements
            self.packages = base.packages
        self.hooks = {}
        for layer, target in hooks.items():
            module_path, _, where = target.partition(":")
            if where not in ("", "input", "output"):
                raise DfreError(f"hook {layer}={target}: say MODULE, MODULE:input or MODULE:output")
            self.hooks[layer] = (find_module(model, module_path), where or "input")
        self.layers = {
            layer: Layer(layer, None, f"{hooks[layer]} of {base.name if base else name}")
            for layer in hooks
        }

    def graph(self, atoms: Any) -> Any:
        return self.base.graph(atoms) if self.base is not None else super().graph(atoms)

    def collate(self, graphs: Sequence[Any]) -> Any:
        return self.base.collate(graphs) if self.base is not None else list(graphs)

    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        import torch

        captured: dict[str, torch.Tensor] = {}
        handles = []
        for layer in layers:
            module, where = self.hooks[layer]
            if where == "input":
                hook = _capture_input(captured, layer)
                handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = _capture_output(captured, layer)
                handles.append(module.register_forward_hook(hook))
        try:
            if self.base is not None:
                self.base.forward(batch, list(self.base.layers))
            else:
                with torch.no_grad():
                    self.runner(self.model, batch, self.device)
        finally:
            for handle in handles:
                handle.remove()
        n_atoms = _batch_atoms(batch)
        out = {}
        for layer in layers:
            if layer not in captured:
                raise DfreError(f"hook {layer} of {self.name}: the module was not called")
            values = captured[layer].detach().float().cpu().reshape(len(captured[layer]), -1)
            if n_atoms is not None and values.shape[0] != n_atoms:
                raise DfreError(
                    f"hook {layer} of {self.name} captured {values.shape[0]} rows for "
                    f"{n_atoms} atoms: hook a per-atom module"
                )
            out[layer] = values.numpy()
            if self.layers[layer].dim is None:
                self.layers[layer] = Layer(
                    layer, out[layer].shape[1], self.layers[layer].definition
                )
        return out


def _batch_atoms(batch: Any) -> int | None:
    if isinstance(batch, list) and batch and hasattr(batch[0], "numbers"):
        return sum(len(a) for a in batch)
    if isinstance(batch, list) and batch and hasattr(batch[0], "atomic_number"):
        return sum(len(g.atomic_number) for g in batch)  # CHGNet graphs
    num_nodes = getattr(batch, "num_nodes", None)
    return int(num_nodes) if num_nodes is not None else None


def _capture_input(store: dict, layer: str):
    def hook(module, inputs):
        value = inputs[0]
        store[layer] = value["x"] if isinstance(value, dict) else value
        store[layer] = store[layer].detach().clone()

    return hook


def _capture_output(store: dict, layer: str):
    def hook(module, inputs, output):
        value = output["x"] if isinstance(output, dict) else output
        store[layer] = value.detach().clone()

    return hook


def load_torch_module(path: str, device: str, trust_checkpoint: bool = False) -> Any:
    """A TorchScript file or a pickled ``nn.Module`` (the latter only if trusted, see
    :func:`dfre.models.base.check_checkpoint`); a DfreError if it is neither."""
    import torch

    path = require_file(path, "generic model")
    try:
        return torch.jit.load(path, map_location=device)
    except Exception:
        pass
    check_checkpoint(path, "generic model", trust_checkpoint)
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:
        raise DfreError(
            f"cannot read {path} as a TorchScript or torch.save file ({type(error).__name__}): "
            "the file is corrupt or not a torch model"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise DfreError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module")
    return model


def import_runner(spec: str) -> Any:
    """The function named ``package.module:function``."""
    module_name, _, function = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError, ValueError):
        raise DfreError(
            f"cannot import runner '{spec}': give an importable package.module:function"
        ) from None


def load_generic(
    device: str = "cpu",
    *,
    hooks: dict[str, str] | None = None,
    base: str | None = None,
    path: str | None = None,
    runner: str | None = None,
    cutoff: float = 5.0,
    name: str = "generic",
    trust_checkpoint: bool = False,
) -> GenericExtractor:
    """The generic extractor (see the module docstring)."""
    hooks = dict(hooks or {})
    if base is not None:
        inner = load_extractor(base, device)
        model = getattr(inner, "model", None)
        if model is None:
            raise DfreError(f"model {base} does not expose a torch model to hook")
        return GenericExtractor(
            name, model, hooks, base=inner, device=device, weights=inner.weights_path
        )
    if path is None or runner is None:
        raise DfreError(
            "the generic model needs base=REGISTRY_NAME, or --weights PATH and "
            "--option runner=package.module:function"
        )
    model = load_torch_module(path, str(torch_device(device)), trust_checkpoint)
    model.eval()
    return GenericExtractor(
        name,
        model,
        hooks,
        runner=import_runner(runner),
        device=device,
        weights=os.path.abspath(path),
        cutoff=float(cutoff),
    )


register(
    ModelSpec(
        name="generic",
        family="generic",
        description="any torch model: hooks on named modules (--hook LAYER=MODULE)",
        layers={},
        loader=load_generic,
        package="torch",
        install_hint="pip install torch",
        needs_file=True,
    )
)
