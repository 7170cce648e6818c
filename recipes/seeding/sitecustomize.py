"""Start-up shim for every Python process of an Axolotl run (on PYTHONPATH only for `tools train`
and the stage's ``launch.sh``). It does three things, each switched on by an environment variable,
and one always:

``MEDILORA_SEED``
    Seed torch, numpy and ``random`` when the interpreter starts. Axolotl 0.19 builds the LoRA
    adapter before the HF Trainer calls ``set_seed``, so the adapter's random initialisation (and
    with it every later byte) differs from run to run even with the same ``seed:``. Seeding here
    makes a run with the same inputs and seed reproducible, which is what lets an interrupted
    pipeline resume to the same outputs.
``MEDILORA_DEVICE=cpu``
    Several processes on CPU: for world size > 1 Axolotl 0.19 sets ``device_map = {"": LOCAL_RANK}``
    (``utils/config`` normalize, then ``loaders/model.py`` ``_set_device_map_config``), which
    transformers reads as an accelerator index and dies with "Cannot access accelerator device when
    none is available". The shim turns integer entries of that map into ``"cpu"`` once
    ``axolotl.loaders.model`` is imported. (Data parallelism itself needs ``ACCELERATE_USE_CPU=true``
    as well, set by the launcher environment: without it accelerate 1.13 picks
    ``DistributedType.NO`` on a machine without GPUs, never wraps the model in DDP and never shards
    the batches, so every rank trains its own copy: recipes/hardware.py.) It also lets torch restore
    tensors saved for ``cpu:N`` (the device accelerate gives each CPU process), without which the
    HF Trainer cannot resume a multi-process CPU run from its checkpoint.
``MEDILORA_TRACE_SAMPLES=DIR``
    Diagnostics: every rank appends one JSON line per micro-batch to ``DIR/rank-R.jsonl``
    (optimizer step it counts towards, and a digest of each row's token ids), which is how the tests
    check that every sample is seen once per epoch across ranks.

Always: ``datasets``' ``Dataset.save_to_disk(num_proc=1)`` starts a one-process *spawn* pool (a fresh
interpreter that imports ``datasets`` again: ~3-4 s on the 2-core machine), and Axolotl asks for
exactly that when it saves a prepared dataset under 512 rows. The shim runs ``num_proc=1`` in the
process itself (``num_proc=None``), which writes the same files (checked byte for byte).

A worker started by torchrun (or ``accelerate launch``, which runs torchrun's agent) runs in its own
session, so killing the launcher's process group (a pre-empted job, ``kill -9`` of `tools train`)
would leave the workers training on as orphans, still writing checkpoints. Each worker therefore
asks Linux to SIGKILL it when its launcher dies (``PR_SET_PDEATHSIG``), and exits at once if the
launcher is already gone. `tools train` asks the same of the Axolotl process it starts
(``MEDILORA_DIE_WITH_PARENT=1``), so a `tools train` killed alone takes its training with it.

The hooks patch a module right after it is first imported (a meta-path finder), so processes that
never import Axolotl or transformers (the launchers) pay nothing.
"""
import os
import sys

_seed = os.environ.get("MEDILORA_SEED")
if _seed is not None:
    import random

    random.seed(int(_seed))
    try:
        import numpy as _np
        _np.random.seed(int(_seed))
    except ImportError:
        pass
    try:
        import torch as _torch
        _torch.manual_seed(int(_seed))
    except ImportError:
        pass


def _die_with_launcher():
    if not sys.platform.startswith("linux") or (os.environ.get("TORCHELASTIC_RUN_ID") is None
                                                and os.environ.get("MEDILORA_DIE_WITH_PARENT") != "1"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0 and os.getppid() == 1:  # 1: PR_SET_PDEATHSIG
            os._exit(1)  # the launcher died before the line above ran
    except (OSError, AttributeError):
        pass


_die_with_launcher()


def _warn(msg):
    sys.stderr.write(f"medilora start-up shim: {msg}\n")


def _patch_device_map(mod):
    loader = getattr(mod, "ModelLoader", None)
    orig = getattr(loader, "_set_device_map_config", None)
    if orig is None:
        _warn("axolotl.loaders.model.ModelLoader._set_device_map_config not found: device map left as is")
        return

    def _set_device_map_config(self, *a, **kw):
        out = orig(self, *a, **kw)
        dm = self.model_kwargs.get("device_map")
        if isinstance(dm, dict) and any(isinstance(v, int) for v in dm.values()):
            self.model_kwargs["device_map"] = {k: ("cpu" if isinstance(v, int) else v) for k, v in dm.items()}
        elif isinstance(dm, int):
            self.model_kwargs["device_map"] = "cpu"
        return out

    loader._set_device_map_config = _set_device_map_config


def _patch_trace(mod):
    trainer = getattr(mod, "Trainer", None)
    orig = getattr(trainer, "training_step", None)
    if orig is None:
        _warn("transformers.trainer.Trainer.training_step not found: no sample trace")
        return
    import hashlib
    import json

    out_dir = os.environ["MEDILORA_TRACE_SAMPLES"]
    os.makedirs(out_dir, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))

    def training_step(self, model, inputs, *a, **kw):
        try:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            rows = []
            for i in range(ids.shape[0]):
                row = ids[i] if mask is None else ids[i][mask[i].bool()]
                rows.append(hashlib.sha1(",".join(map(str, row.tolist())).encode()).hexdigest()[:16])
            rec = {"rank": rank, "step": int(self.state.global_step) + 1, "rows": rows}
            with open(os.path.join(out_dir, f"rank-{rank}.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        except Exception as e:  # noqa: BLE001 - diagnostics must never break a run
            _warn(f"sample trace failed: {e}")
        return orig(self, model, inputs, *a, **kw)

    trainer.training_step = training_step


def _cpu_index_locations():
    """Resuming on several CPU processes: the HF Trainer loads the optimizer state with
    ``map_location=args.device``, which accelerate sets to ``cpu:LOCAL_RANK`` for MULTI_CPU, and
    torch 2.13 restores only the location ``cpu`` ("don't know how to restore data location ...
    (tagged with cpu:0)"). Teach torch that ``cpu:N`` is the CPU."""
    try:
        import torch.serialization as ser
    except ImportError:
        return

    def deserialize(obj, location):
        if isinstance(location, str) and location.startswith("cpu:"):
            return obj.cpu() if hasattr(obj, "cpu") else obj
        return None

    ser.register_package(30, lambda obj: None, deserialize)


def _patch_save_to_disk(mod):
    dataset = getattr(mod, "Dataset", None)
    orig = getattr(dataset, "save_to_disk", None)
    if orig is None:
        _warn("datasets.arrow_dataset.Dataset.save_to_disk not found: left as is")
        return

    def save_to_disk(self, *a, num_proc=None, **kw):
        return orig(self, *a, num_proc=None if num_proc == 1 else num_proc, **kw)

    dataset.save_to_disk = save_to_disk


_HOOKS = {"datasets.arrow_dataset": _patch_save_to_disk}
if os.environ.get("MEDILORA_DEVICE") == "cpu":
    _HOOKS["axolotl.loaders.model"] = _patch_device_map
    _cpu_index_locations()
if os.environ.get("MEDILORA_TRACE_SAMPLES"):
    _HOOKS["transformers.trainer"] = _patch_trace

if _HOOKS:  # always (the save_to_disk hook)
    import importlib.abc

    class _PatchAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            hook = _HOOKS.get(name)
            if hook is None:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            loader = spec.loader
            exec_module = getattr(loader, "exec_module", None)
            if exec_module is None:
                return spec

            def patched_exec(module, _exec=exec_module):
                _exec(module)
                _HOOKS.pop(name, None)
                hook(module)

            try:
                loader.exec_module = patched_exec
            except (AttributeError, TypeError):
                _warn(f"cannot patch the import of {name}")
            return spec

    sys.meta_path.insert(0, _PatchAfterImport())
