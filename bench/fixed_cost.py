"""Fixed cost of `analyzer reaction`: from the command's start to the first checkpoint
computed, on issue 14's workload (bench/foreign_workload.py), whole CLI in real subprocesses,
for this checkout and, side by side in interleaved rounds, another one (e.g. main's), with a
breakdown of where the time goes.

    python bench/fixed_cost.py --baseline /tmp/main-src --rounds 3       # 2 threads
    git archive main | tar -x -C /tmp/main-src                             # the baseline's code

Per round and per (code, backend) it runs, each in a fresh process:

* the whole CLI on the first checkpoint only (``--epochs 1``): wall and CPU seconds (user,
  system) from the command's start to its end, i.e. to the first checkpoint computed and
  stored, plus the process's exit;
* the same command inside a stage timer (``--stages``, this script again) that wraps the
  engine's functions by name, each as its module is imported (so the timer imports nothing
  the command would not), and records each call's wall and CPU seconds: imports (``cli`` and
  ``analyzer.reaction``; a module the command imports later is timed in the stage that
  imports it), the set-up (files, checkpoint metadata, model build, image decoding, backend
  kind: the ONNX export), the preflight (load, ONNX session, first-batch layout check), the
  results file, the plan and the first checkpoint; the interpreter's own start (``python -c
  pass``) is added in front; and the garbage collections before the first checkpoint is
  stored, how many and their seconds (``gc.callbacks``);
* once per (code, backend), ``python -X importtime`` of the same command: import seconds per
  package.

Backends: ``torch``, ``onnx`` (PyTorch checkpoints converted in memory, the graph cache
warm: ``WORK/graph-cache``, filled by an untimed run first), ``onnx-cold`` (the same with an
empty cache folder for every process: the export runs) and ``onnx-files`` (a folder exported
first by ``analyzer export-onnx``, whose time is printed too). A baseline without the graph
cache exports in both ``onnx`` and ``onnx-cold``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.abc
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foreign_workload import (
    IMAGE_SIZE,
    analyzer_argv,
    environment,
    export_command,
    make_workload,
    reaction_command,
)

# (label, "module:qualname", parent label): the functions the stage timer wraps; a name
# missing in a checkout is skipped. Children run inside their parent.
STAGES = [
    ("set-up (set_up_pass)", "analyzer.pass_setup:set_up_pass", None),
    ("find files", "analyzer.pass_setup:_choose_files", "set-up (set_up_pass)"),
    ("checkpoint metadata", "analyzer.inputs:_checkpoint_metadata", "set-up (set_up_pass)"),
    ("checkpoint metadata", "analyzer.network:_checkpoint_metadata", "set-up (set_up_pass)"),
    ("model build (--model)", "analyzer.inputs:_build_network", "set-up (set_up_pass)"),
    ("model build (--model)", "analyzer.network:_build_network", "set-up (set_up_pass)"),
    ("image listing + decoding", "analyzer.inputs:_folder_splits", "set-up (set_up_pass)"),
    ("ONNX contract (files)", "analyzer.pass_setup:_contract_inputs", "set-up (set_up_pass)"),
    ("torch kind", "analyzer.torch_backend:TorchKind.__init__", "set-up (set_up_pass)"),
    ("onnx kind: trace + export", "analyzer.onnx_backend:OnnxKind.__init__",
     "set-up (set_up_pass)"),
    ("make_fx trace", "analyzer.onnx_export:_trace", "onnx kind: trace + export"),
    ("graph cache: fx structure digest", "analyzer.graph_keys:structure_digest",
     "onnx kind: trace + export"),
    ("graph cache: key", "analyzer.onnx_export:_graph_key", "onnx kind: trace + export"),
    ("graph cache: read + parse", "analyzer.onnx_export:_cached_graph",
     "onnx kind: trace + export"),
    ("graph cache: check of the cached graph",
     "analyzer.onnx_export:ReactionGraphExporter._reproduces_the_network",
     "onnx kind: trace + export"),
    ("torch.onnx.export", "analyzer.onnx_export:_to_onnx", "onnx kind: trace + export"),
    ("images to device", "analyzer.compute:SplitsOnDevice.__init__", None),
    ("preflight (2 images)", "analyzer.reaction:_preflight", None),
    ("load: torch (hash + read)", "analyzer.torch_backend:TorchKind.load",
     "preflight (2 images)"),
    ("load: onnx (convert/read + session)", "analyzer.onnx_backend:OnnxKind.load",
     "preflight (2 images)"),
    ("export self-check", "analyzer.onnx_export:_verify", "preflight (2 images)"),
    ("activation-size probe", "analyzer.torch_backend:_largest_activation_bytes",
     "preflight (2 images)"),
    ("layout check (both layouts)", "analyzer.torch_backend:TorchBackend._choose_layout",
     "preflight (2 images)"),
    ("results file", "analyzer.reaction:_open_sink", None),
    ("plan", "analyzer.plan:plan_pending", None),
]
_FIRST = "first checkpoint: load + compute + store"
_COMPUTE = "  of it the compute of its 384 images"
_COLLECTIONS = "garbage collections before the first checkpoint stored"
_PACKAGES = ("torch", "numpy", "h5py", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "PIL",
             "safetensors", "click", "tqdm", "matplotlib", "scipy", "sklearn", "sympy")
_OURS = ("analyzer", "store", "trainer", "cli")
_T0, _C0 = time.perf_counter(), time.process_time()  # the stage timer counts from here


def main() -> None:
    # no abbreviations: the stage timer passes `analyzer reaction --backend ...` through
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the workload (default: a temporary one)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout's source folder, timed beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="torch,onnx,onnx-cold,onnx-files")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    options, rest = parser.parse_known_args()
    if options.stages:
        _run_stages(rest)
        return
    work = options.work or Path(tempfile.mkdtemp(prefix="fixed-cost-"))
    make_workload(work)
    codes = {"this checkout": None}
    if options.baseline is not None:
        codes = {"baseline": options.baseline.resolve(), **codes}
    backends = options.backends.split(",")
    print(f"workload {work}: {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, 6 checkpoints x 384 images, "
          f"{options.threads} threads; load average at start {_load()}")
    exported = {code: _export(work, path, options.threads, code)
                for code, path in codes.items()} if "onnx-files" in backends else {}
    if "onnx" in backends:
        _warm_graph_cache(work, options.threads)
    samples: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(
        list))
    for round_number in range(options.rounds):
        for code, path in _rotated(list(codes.items()), round_number):
            for backend in backends:
                key = (code, backend)
                ckpt_dir = exported.get(code) if backend == "onnx-files" else None
                arguments = reaction_command(work, backend.removesuffix("-cold"),
                                             work / "out.h5", "1", ckpt_dir)
                env = _environment(work, path, options.threads)
                for timed in (_whole_cli, _stage_run):
                    with tempfile.TemporaryDirectory(dir=work) as cold:
                        if backend == "onnx-cold":
                            env["REACTION_CACHE_DIR"] = cold
                        for name, value in timed(arguments, env, work).items():
                            samples[key][name].append(value)
        print(f"round {round_number + 1} done, load average {_load()}", flush=True)
    imports = {(code, backend): _import_run(work, path, backend, exported.get(code),
                                            options.threads)
               for code, path in codes.items() for backend in backends}
    _report(samples, imports, list(codes), backends)
    print(f"load average at end {_load()}")
    if options.json is not None:
        options.json.write_text(json.dumps(
            {f"{code}|{backend}": {"samples": values, "imports": imports[(code, backend)]}
             for (code, backend), values in samples.items()}, indent=1))


def _rotated(items: list, shift: int) -> list:
    """Interleaved rounds: each round starts with the next code."""
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _environment(work: Path, code: Path | None, threads: int) -> dict[str, str]:
    """The workload's environment, the graph cache in ``WORK/graph-cache``."""
    return {**environment(work, code, threads), "REACTION_CACHE_DIR": str(work / "graph-cache")}


def _warm_graph_cache(work: Path, threads: int) -> None:
    """One untimed ``--backend onnx`` run of the first checkpoint, from an empty graph cache."""
    import shutil

    shutil.rmtree(work / "graph-cache", ignore_errors=True)
    (work / "out.h5").unlink(missing_ok=True)  # results of another workload's checkpoints
    subprocess.run(analyzer_argv(reaction_command(work, "onnx", work / "out.h5", "1")),
                   env=_environment(work, None, threads), cwd=work, check=True,
                   stdout=subprocess.DEVNULL)


def _export(work: Path, code: Path | None, threads: int, label: str) -> Path:
    """``analyzer export-onnx`` of the workload's checkpoints into a folder of ``label``'s."""
    out = work / f"onnx-{re.sub(r'[^a-z]+', '-', label)}"
    if not out.is_dir():
        began = time.perf_counter()
        subprocess.run(analyzer_argv(export_command(work, out)),
                       env=environment(work, code, threads),
                       cwd=work, check=True, stdout=subprocess.DEVNULL)
        print(f"{label}: export-onnx of 6 checkpoints took {time.perf_counter() - began:.1f} s")
    return out


def _whole_cli(arguments: list[str], env: dict[str, str], work: Path) -> dict[str, float]:
    """Wall, user and system seconds of one whole `analyzer` process."""
    (work / "out.h5").unlink(missing_ok=True)
    began = time.perf_counter()
    process = subprocess.Popen(analyzer_argv(arguments), env=env, cwd=work,
                               stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"analyzer {' '.join(arguments)} failed ({process.returncode})")
    return {"whole CLI wall": wall, "whole CLI user": usage.ru_utime,
            "whole CLI system": usage.ru_stime, "whole CLI minor faults": usage.ru_minflt}


def _stage_run(arguments: list[str], env: dict[str, str], work: Path) -> dict[str, float]:
    """The stage timer's numbers for one command (its own process)."""
    (work / "out.h5").unlink(missing_ok=True)
    start = _interpreter_start(env, work)
    output = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stages",
                             *arguments], env=env, cwd=work, check=True, capture_output=True,
                            text=True).stdout
    stages = json.loads(output.strip().splitlines()[-1])
    return {"interpreter start wall": start[0], "interpreter start cpu": start[1],
            **{name: value for name, value in stages.items()}}


def _interpreter_start(env: dict[str, str], work: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``python -c pass`` (measured each time: the machine varies)."""
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", "pass"], cwd=work, env=env)
    _, _, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - began, usage.ru_utime + usage.ru_stime


def _import_run(work: Path, code: Path | None, backend: str, exported: Path | None,
                threads: int) -> dict[str, float]:
    """:func:`_import_times` of one (code, backend)'s command, a cold cache its own."""
    arguments = reaction_command(work, backend.removesuffix("-cold"), work / "out.h5", "1",
                                 exported if backend == "onnx-files" else None)
    env = _environment(work, code, threads)
    with tempfile.TemporaryDirectory(dir=work) as cold:
        if backend == "onnx-cold":
            env["REACTION_CACHE_DIR"] = cold
        return _import_times(arguments, env, work)


def _import_times(arguments: list[str], env: dict[str, str], work: Path) -> dict[str, float]:
    """Seconds of import (self times summed) per top-level package, from -X importtime."""
    (work / "out.h5").unlink(missing_ok=True)
    command = analyzer_argv(arguments)
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], env=env, cwd=work,
                            capture_output=True, text=True, check=True)
    totals: dict[str, float] = defaultdict(float)
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if match is None:
            continue
        root = match[2].split(".")[0]
        group = root if root in _PACKAGES else "ours" if root in _OURS else "other"
        totals[group] += int(match[1]) / 1e6
    return dict(totals)


# ---- the stage timer (runs inside the timed process) -----------------------------------------

def _run_stages(arguments: list[str]) -> None:
    """Run ``analyzer ARGUMENTS`` in this process with the stage functions wrapped; print a
    JSON line of wall and CPU seconds per stage."""
    wall0, cpu0 = _T0, _C0  # this script's start
    collections: list[tuple[float, float]] = []  # each garbage collection's start and seconds
    gc.callbacks.append(functools.partial(_time_collection, collections, wall0))
    import analyzer.reaction  # noqa: F401  (the command's own module: every run imports it)
    import cli

    imports = (time.perf_counter() - wall0, time.process_time() - cpu0)
    records: list[tuple[str, float, float, float, float]] = []
    first_store: list[tuple[float, float]] = []
    wraps = [(target, label, None) for label, target, _ in STAGES] + [
        ("store.results:ResultsSink.store", "store", first_store),
        ("analyzer.compute:per_image_results", "compute", None)]
    pending: dict[str, list] = defaultdict(list)
    for target, label, first in wraps:
        pending[target.split(":")[0]].append(functools.partial(_wrap, target, label, records,
                                                               first))
    for module in [name for name in pending if name in sys.modules]:
        for wrap in pending.pop(module):
            wrap()
    sys.meta_path.insert(0, _WrapOnImport(pending))
    sys.argv = ["analyzer", *arguments]
    try:
        cli.analyzer(standalone_mode=False)
    finally:
        sys.stdout.flush()
    end = (time.perf_counter() - wall0, time.process_time() - cpu0)
    totals: dict[str, float] = defaultdict(float)
    totals["imports (cli and the engine's modules) wall"] = imports[0]
    totals["imports (cli and the engine's modules) cpu"] = imports[1]
    for label, _, _, wall, cpu in records:
        if label not in ("store", "compute"):
            totals[f"{label} wall"] += wall
            totals[f"{label} cpu"] += cpu
    plan_end = max((start + wall for label, start, _, wall, _ in records if label == "plan"),
                   default=imports[0])
    plan_end_cpu = max((cpu_start + cpu for label, _, cpu_start, _, cpu in records
                        if label == "plan"), default=imports[1])
    if first_store:
        totals[f"{_FIRST} wall"] = first_store[0][0] - plan_end
        totals[f"{_FIRST} cpu"] = first_store[0][1] - plan_end_cpu
        computes = [(wall, cpu) for label, start, _, wall, cpu in records
                    if label == "compute" and start >= plan_end and start < first_store[0][0]]
        totals[f"{_COMPUTE} wall"], totals[f"{_COMPUTE} cpu"] = computes[0]
        totals["to the first checkpoint stored wall"] = first_store[0][0]
        totals["to the first checkpoint stored cpu"] = first_store[0][1]
        before = [seconds for start, seconds in collections if start < first_store[0][0]]
        totals[f"{_COLLECTIONS} count"] = len(before)
        totals[f"{_COLLECTIONS} seconds"] = sum(before)
    totals["the whole command in the timer wall"] = end[0]
    totals["the whole command in the timer cpu"] = end[1]
    print(json.dumps(totals))


def _time_collection(collections: list[tuple[float, float]], wall0: float, phase: str,
                     info: dict) -> None:
    """A ``gc.callbacks`` entry: append each collection's (start, seconds) from ``wall0``."""
    now = time.perf_counter() - wall0
    if phase == "start":
        collections.append((now, float("nan")))
    else:
        start, _ = collections[-1]
        collections[-1] = (start, now - start)


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Runs each module's pending wraps right after the module is first imported."""

    def __init__(self, pending: dict[str, list]) -> None:
        self.pending = pending

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        sys.meta_path.remove(self)  # the spec the other finders give
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute, wraps = spec.loader.exec_module, self.pending.pop(name)

        def exec_module(module):
            execute(module)
            for wrap in wraps:
                wrap()

        spec.loader.exec_module = exec_module
        return spec


def _wrap(target: str, label: str, records: list, first: list | None = None) -> None:
    """Replace ``module:qualname`` (and every module-level alias of it in our packages) by a
    wrapper that appends ``(label, wall start, cpu start, wall, cpu)`` to ``records``."""
    module_name, qualname = target.split(":")
    module = sys.modules.get(module_name)
    owner = module
    *classes, name = qualname.split(".")
    for class_name in classes:
        owner = getattr(owner, class_name, None)
    function = getattr(owner, name, None) if owner is not None else None
    if function is None:
        return

    @functools.wraps(function)
    def timed(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            records.append((label, wall - _T0, cpu - _C0, time.perf_counter() - wall,
                            time.process_time() - cpu))
            if first is not None and not first:
                first.append((time.perf_counter() - _T0, time.process_time() - _C0))

    setattr(owner, name, timed)
    if owner is module:
        for other in list(sys.modules.values()):
            if getattr(other, "__name__", "").split(".")[0] in _OURS and \
                    getattr(other, name, None) is function:
                setattr(other, name, timed)


# ---- the report ------------------------------------------------------------------------------

def _report(samples: dict, imports: dict, codes: list[str], backends: list[str]) -> None:
    """Medians per (code, backend): the whole CLI, the stages, the imports; before/after."""
    columns = [(code, backend) for backend in backends for code in codes]
    header = " | ".join(f"{code}, {backend}" for code, backend in columns)
    print(f"\nmedians of {len(next(iter(samples.values()))['whole CLI wall'])} rounds, "
          f"seconds wall (CPU)\n")
    print(f"| stage | {header} |")
    print("|---|" + "---:|" * len(columns))
    print(_row("whole CLI, first checkpoint only (--epochs 1)",
               [_median_pair(samples[c], "whole CLI wall", ("whole CLI user", "whole CLI system"))
                for c in columns]))
    print(_row("  of it system CPU", [f"{_median(samples[c], 'whole CLI system'):.2f}"
                                      for c in columns]))
    print(_row("  minor page faults (thousands)",
               [f"{_median(samples[c], 'whole CLI minor faults') / 1e3:.0f}" for c in columns]))
    print(_row("stage timer: interpreter start", [_stage(samples[c], "interpreter start")
                                                  for c in columns]))
    print(_row("stage timer: imports (cli and the engine's modules)",
               [_stage(samples[c], "imports (cli and the engine's modules)") for c in columns]))
    for label, parent in dict.fromkeys((label, parent) for label, _, parent in STAGES):
        if any(f"{label} wall" in samples[c] for c in columns):
            indent = "  " if parent else ""
            print(_row(f"{indent}{label}", [_stage(samples[c], label) for c in columns]))
    print(_row(_FIRST, [_stage(samples[c], _FIRST) for c in columns]))
    print(_row(_COMPUTE, [_stage(samples[c], _COMPUTE) for c in columns]))
    print(_row("**to the first checkpoint stored** (interpreter start included)",
               [_stage(samples[c], "to the first checkpoint stored",
                       extra="interpreter start") for c in columns]))
    print(_row("fixed cost = that - the first checkpoint's compute",
               [_fixed(samples[c]) for c in columns]))
    print(_row(f"{_COLLECTIONS}: how many (seconds wall)",
               [f"{_median(samples[c], f'{_COLLECTIONS} count'):.0f} "
                f"({_median(samples[c], f'{_COLLECTIONS} seconds'):.2f})" for c in columns]))
    print("\nimport seconds per package (python -X importtime, self times summed, one run)\n")
    print(f"| package | {header} |")
    print("|---|" + "---:|" * len(columns))
    names = sorted({name for c in columns for name in imports[c]},
                   key=lambda name: -max(imports[c].get(name, 0) for c in columns))
    for name in names:
        print(_row(name, [f"{imports[c].get(name, 0):.3f}" for c in columns]))
    print(_row("total", [f"{sum(imports[c].values()):.3f}" for c in columns]))
    if len(codes) == 2:
        print()
        for backend in backends:
            before, after = (samples[(code, backend)] for code in codes)
            for name in ("whole CLI wall", "to the first checkpoint stored wall"):
                print(f"{backend}: {name}: {codes[1]} / {codes[0]} = "
                      f"{_median(after, name) / _median(before, name):.2f}")
            print(f"{backend}: fixed cost: {codes[1]} / {codes[0]} = "
                  f"{_fixed_value(after) / _fixed_value(before):.2f}")


def _median(values: dict[str, list[float]], name: str) -> float:
    return statistics.median(values[name]) if values.get(name) else float("nan")


def _median_pair(values: dict, wall: str, cpu: tuple[str, ...]) -> str:
    cpu_seconds = statistics.median([sum(parts) for parts in zip(*(values[n] for n in cpu),
                                                                 strict=True)])
    return f"{_median(values, wall):.2f} ({cpu_seconds:.2f})"


def _stage(values: dict, label: str, extra: str | None = None) -> str:
    if f"{label} wall" not in values:
        return "–"
    wall, cpu = _median(values, f"{label} wall"), _median(values, f"{label} cpu")
    if extra is not None:
        wall += _median(values, f"{extra} wall")
        cpu += _median(values, f"{extra} cpu")
    return f"{wall:.2f} ({cpu:.2f})"


def _fixed_value(values: dict) -> float:
    """Interpreter start + time to the first checkpoint stored - the compute of its images,
    per round."""
    per_round = [start + first - compute for start, first, compute in zip(
        values["interpreter start wall"], values["to the first checkpoint stored wall"],
        values[f"{_COMPUTE} wall"], strict=True)]
    return statistics.median(per_round)


def _fixed(values: dict) -> str:
    return f"**{_fixed_value(values):.2f}**"


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
