"""SIGKILL `darkmatter run` at every stage, rerun it, and get exactly the uninterrupted results.

Each run is a real subprocess on the tiny random Llama with every stage and analysis on. Kill
moments come three ways:

- injected: the child replaces ``os.replace`` (every stage output is renamed into place) with
  a wrapper that SIGKILLs its own process just before or just after the n-th rename onto a
  path matching a pattern, so a kill lands at an exact point of any stage: a temp file fully
  written but not renamed, or an output renamed but the next step not taken;
- watched: the test SIGKILLs the child (``proc.kill()``) as soon as a stage output appears;
- random: the test SIGKILLs the child after a seeded random delay.

After the last rerun, every output (store shards and manifest, SAE weights and configs,
decompositions, analyses, figures, metrics, report) must equal the reference run's, timings
aside; no temp file or checkpoint may be left; and whatever was finished at a kill (committed
shards, trained SAEs, decompositions, analyses) must not have been redone (same mtime).

All runs use one thread (OMP/MKL/OpenBLAS) and run in the same folder path (the reference is
moved away before the next run), so absolute paths in the results agree too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sae_darkmatter.analyses.registry import NAMES, get
from sae_darkmatter.config import RunConfig

CONFIG = """
[harvest]
hooks = ["resid_post.2"]
batch_size = 8
contexts_per_shard = 8
with_loss = true
[harvest.model]
name = "{model}"
device = "cpu"
[harvest.corpus]
n_contexts = 64
context_length = 32

[train]
widths = [64, 96, 128]
ks = [8]
train_tokens = 3072
batch_size = 256
checkpoint_every = 3
device = "cpu"

[decompose]
device = "cpu"

[pursuit]
max_tokens = 400

[cross_layer]
device = "cpu"

[downstream]
n_contexts = 4
max_contexts = 8
batch_size = 4
n_boot = 100

[error_saes.train]
widths = [64]
ks = [4, 8]
train_tokens = 2048
batch_size = 256
checkpoint_every = 2
device = "cpu"
"""

# The child: optionally SIGKILL itself around the n-th os.replace onto a matching path, then
# run the CLI. DM_TEST_KILL_AT is "<regex>|<n>|before" or "...|after".
CHILD = r"""
import os, re, signal, sys
spec = os.environ.get("DM_TEST_KILL_AT")
if spec:
    pattern, nth, when = spec.rsplit("|", 2)
    nth, seen, real_replace = int(nth), [0], os.replace

    def replace(src, dst, *args, **kwargs):
        hit = re.search(pattern, os.fspath(dst)) is not None
        seen[0] += hit
        if hit and seen[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *args, **kwargs)
        if hit and seen[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
from sae_darkmatter.cli import app
sys.argv[0] = "darkmatter"
app()
"""

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "120"}
ENV.pop("DM_TEST_KILL_AT", None)
TIMING_KEYS = {"tokens_per_second", "reused", "timings_s", "created"}  # and every "seconds*"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")
RUN_TIMEOUT = 300
N_SAES = 3  # the [train] grid
N_CONTEXTS = 64  # [harvest.corpus]
N_ANALYSES = sum(get(n).enabled(RunConfig()) for n in NAMES)  # all those on by default


@dataclass
class Runner:
    """Runs `darkmatter run` into ``base/run`` and keeps a log of every process it started."""

    base: Path
    config: Path
    log: Path
    kills: list[str] = field(default_factory=list)
    _started: float = 0.0

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    def start(self, kill_at: str | None = None, *, relative: bool = False) -> subprocess.Popen:
        """Start a run; ``relative``: in ``base`` with ``-o run`` instead of the absolute path."""
        env = dict(ENV, **({"DM_TEST_KILL_AT": kill_at} if kill_at else {}))
        self._note(f"===== run (kill at {kill_at}) =====")
        self._started = time.perf_counter()
        with self.log.open("a") as out:
            cmd = [sys.executable, "-c", CHILD, "run", "--config", str(self.config), "-o",
                   self.run_dir.name if relative else str(self.run_dir)]
            return subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.base
            )

    def _note(self, text: str) -> None:
        with self.log.open("a") as fh:
            fh.write(f"\n{text}\n")

    def _ended(self, code: int) -> None:
        self._note(f"===== exit {code} after {time.perf_counter() - self._started:.1f} s =====")

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def wait(self, proc: subprocess.Popen) -> int:
        """The exit code; a run that hangs is killed and fails the test."""
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"run still going after {RUN_TIMEOUT} s:\n{self.tail()}") from None
        self._ended(code)
        return code

    def finish(self, proc: subprocess.Popen) -> None:
        assert self.wait(proc) == 0, self.tail()

    def kill_at(self, spec: str) -> None:
        """Run until the injected kill point ``spec``; it must be reached."""
        proc = self.start(spec)
        code = self.wait(proc)
        assert code == -signal.SIGKILL, (
            f"kill point {spec} not reached (exit {code}):\n{self.tail()}"
        )
        self.kills.append(f"{spec}, during {stage_at(self.run_dir)}")
        self._note(f"===== killed {self.kills[-1]} =====")

    def kill_when(self, label: str, ready: Callable[[Path], bool]) -> bool:
        """Run and SIGKILL as soon as ``ready(run_dir)``; False if the run finished first."""
        proc, deadline = self.start(), time.monotonic() + RUN_TIMEOUT
        while proc.poll() is None and not ready(self.run_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._kill(proc, label)

    def kill_after(self, seconds: float) -> bool:
        """Run and SIGKILL after ``seconds``; False if the run finished first."""
        proc = self.start()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=seconds)
        return self._kill(proc, f"after {seconds:.2f} s")

    def _kill(self, proc: subprocess.Popen, label: str) -> bool:
        proc.kill()
        code = self.wait(proc)
        assert code in (0, -signal.SIGKILL), self.tail()
        if code == 0:
            return False
        self.kills.append(f"{label}, during {stage_at(self.run_dir)}")
        self._note(f"===== killed {self.kills[-1]} =====")
        return True


@contextlib.contextmanager
def runner_in(base: Path, config: Path, name: str) -> Iterator[Runner]:
    """A Runner on ``base/run``, which must be free; afterwards the folder moves to
    ``base/name``."""
    r = Runner(base, config, base / f"{name}.log")
    assert not r.run_dir.exists()
    try:
        yield r
    finally:
        if r.run_dir.exists():
            r.run_dir.rename(base / name)


# ----------------------------------------------------------------------------- comparisons


def _scrub(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _scrub(v) for k, v in data.items()
                if k not in TIMING_KEYS and not k.startswith("seconds")}
    if isinstance(data, list):
        return [_scrub(v) for v in data]
    return data


def snapshot(run: Path) -> dict[str, Any]:
    """Every file of a run folder: JSON without timings, the report without its date, else a
    hash."""
    out: dict[str, Any] = {}
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = str(path.relative_to(run))
        if path.suffix == ".lock":
            out[rel] = "lock"
        elif path.suffix == ".json":
            out[rel] = _scrub(json.loads(path.read_text()))
        elif path.suffix == ".html":
            out[rel] = TIMESTAMP.sub("<date>", path.read_text())
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_same_results(run: Path, reference: dict[str, Any]) -> None:
    got = snapshot(run)
    assert sorted(got) == sorted(reference), (
        f"extra files {sorted(set(got) - set(reference))}, "
        f"missing {sorted(set(reference) - set(got))}"
    )
    differ = [k for k in reference if got[k] != reference[k]]
    assert not differ, f"differ from the uninterrupted run: {differ}"


def finished_outputs(run: Path) -> dict[str, int]:
    """Outputs that were complete at a kill, with their mtimes: a rerun must not redo them.

    Committed store shards, trained SAE folders (with training.json), the decompositions once
    all are saved (the SAEs share one least-squares system, redone whole when a kill interrupts
    it) and the analyses recorded in analyses.json (through their figures).
    """
    paths: list[Path] = []
    manifest = run / "store" / "manifest.json"
    if manifest.exists():
        paths += [run / "store" / s["file"] for s in json.loads(manifest.read_text())["shards"]]
    for info in run.glob("**/training.json"):
        paths += [info, info.parent / "sae_weights.safetensors", info.parent / "cfg.json"]
    decs = sorted((run / "decompose").glob("*.json"))
    if len(decs) == N_SAES:
        paths += [p for dec in decs for p in (dec, dec.with_suffix(".safetensors"))]
    analyses = run / "analyses.json"
    if analyses.exists():
        for result in json.loads(analyses.read_text()).values():
            paths += [run / f for f in result.get("figures", {}).values()]
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in paths}


def assert_not_redone(run: Path, before: list[dict[str, int]]) -> None:
    now = finished_outputs(run)
    for i, stamps in enumerate(before):
        redone = sorted(k for k, t in stamps.items() if now.get(k) != t)
        assert not redone, f"kill {i + 1}: the rerun redid finished outputs {redone}"


def stage_at(run: Path) -> str:
    """The stage a killed run was in: the one after the last finished stage."""
    analyses = run / "analyses.json"
    if analyses.exists() and len(json.loads(analyses.read_text())) == N_ANALYSES:
        return "report"
    if len(list((run / "decompose").glob("*.json"))) == N_SAES:
        return "analyses"
    if len(list((run / "saes").glob("**/training.json"))) == N_SAES + 3:  # + cross-layer sources
        return "decompose"
    manifest = run / "store" / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["committed_contexts"] == N_CONTEXTS:
        return "train"
    return "harvest (or start-up)"


def leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.name.endswith(".tmp") or p.name == "checkpoint.pt")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, dict[str, Any], float]:
    """The uninterrupted run: (base folder, config, snapshot, wall seconds)."""
    base = tmp_path_factory.mktemp("kill")
    config = base / "run.toml"
    config.write_text(CONFIG.format(model=tiny_model_dir))
    with runner_in(base, config, "reference") as r:
        t = time.perf_counter()
        r.finish(r.start())
        seconds = time.perf_counter() - t
        assert not leftovers(r.run_dir)
        analyses = json.loads((r.run_dir / "analyses.json").read_text())
        assert not any("skipped" in a for a in analyses.values()), analyses
        assert len(analyses) == N_ANALYSES
        # a complete run, rerun (here with a relative -o), redoes nothing
        done = finished_outputs(r.run_dir)
        r.finish(r.start(relative=True))
        assert_not_redone(r.run_dir, [done])
        assert r.log.read_text().count("inputs unchanged, reusing its result") == N_ANALYSES
        ref = snapshot(r.run_dir)
    return base, config, ref, seconds


def kill_chain(reference, name: str, steps: list[Callable[[Runner], bool | None]]) -> Runner:
    """Run ``steps`` (each kills one run) in one folder, then a final rerun; check the results."""
    base, config, ref, _ = reference
    with runner_in(base, config, name) as r:
        finished = []
        for step in steps:
            if step(r) is not False:
                finished.append(finished_outputs(r.run_dir))
        r.finish(r.start())
        assert leftovers(r.run_dir) == []
        assert_not_redone(r.run_dir, finished)
        assert_same_results(r.run_dir, ref)
    return r


def at(pattern: str, n: int = 1, when: str = "before") -> Callable[[Runner], None]:
    return lambda r: r.kill_at(f"{pattern}|{n}|{when}")


# Injected kill points in run order; the n-th match counts within each (re)run.
HARVEST = [at(r"/store/shard_000002\.safetensors$"),            # shard written, not renamed
           at(r"/store/manifest\.json$", 3, "after")]          # two more shards committed
TRAIN = [at(r"/saes/topk-w96-k8/checkpoint\.pt$", 2),          # mid-training checkpoint save
         at(r"/saes/topk-w64-k8/checkpoint\.pt$", 1, "after"),   # resumed, checkpointed again
         at(r"/saes/topk-w64-k8/sae_weights\.safetensors$", 1, "after"),  # no training.json
         at(r"/saes/topk-w128-k8/training\.json$", 1, "after"),  # checkpoint not yet removed
         at(r"/saes/attn_out\.2/topk-w128-k8/checkpoint\.pt$", 2)]  # cross-layer source SAE
DECOMPOSE = [at(r"/decompose/topk-w96-k8\.safetensors$"),
             at(r"/decompose/topk-w96-k8\.json$", 1, "after")]  # two of three saved
ANALYSES = [at(r"/figures/encoder_error\.png$", 1, "after"),    # result not yet recorded
            at(r"/analyses\.json$", 2, "after"),                # two analyses recorded
            at(r"/error_saes/.*/linear/topk-w64-k8/checkpoint\.pt$", 2),
            at(r"/error_saes/.*/nonlinear/topk-w64-k4/training\.json$", 1, "after"),
            at(r"/downstream/per_token\.safetensors$", 1, "after"),
            at(r"/figures/downstream_ce\.png$")]
REPORT = [at(r"/figures/fvu_vs_width\.png$"),
          at(r"/metrics\.json$", 1, "after"),                   # report's, before timings added
          at(r"/report\.html$"),
          at(r"/metrics\.json$", 2)]                            # the final metrics.json


def test_killed_at_each_stage_resumes_to_identical_results(reference):
    """Fast: killed while a harvest shard is saved, then again while an SAE checkpoint is saved."""
    r = kill_chain(reference, "chain_fast", [HARVEST[0], TRAIN[0]])
    assert len(r.kills) == 2
    log = r.log.read_text()
    assert "resuming at context 16" in log  # two shards were kept
    assert "resuming SAE training from step 3" in log


@pytest.mark.slow
@pytest.mark.soak
def test_killed_at_every_injected_point_resumes_to_identical_results(reference):
    steps = HARVEST + TRAIN + DECOMPOSE + ANALYSES + REPORT
    r = kill_chain(reference, "chain_all", steps)
    assert len(r.kills) == len(steps)


def _has(pattern: str) -> Callable[[Path], bool]:
    return lambda run: next(run.glob(pattern), None) is not None


@pytest.mark.slow
@pytest.mark.soak
def test_killed_when_stage_outputs_appear_resumes_to_identical_results(reference):
    """SIGKILL from outside as soon as each stage's first output shows up."""
    watched = [("harvest", _has("store/shard_000001.safetensors")),
               ("SAE training", _has("saes/*/checkpoint.pt")),
               ("decompose", _has("decompose/*.json")),
               ("error SAEs", _has("error_saes/*/*/*")),
               ("downstream", _has("downstream/per_token.safetensors")),
               ("report", _has("figures/fvu_vs_width.png"))]
    kill_chain(
        reference,
        "chain_watched",
        [lambda r, label=label, ready=ready: r.kill_when(label, ready) for label, ready in watched],
    )


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.parametrize("seed", [0])
def test_killed_at_random_moments_resumes_to_identical_results(reference, seed):
    """Two SIGKILLs in a row at seeded random delays, fractions of an uninterrupted run's time
    (the rerun skips finished work, so its delay is drawn from a shorter span)."""
    seconds = reference[3]
    rng = random.Random(seed)
    delays = [rng.uniform(0.05, 0.6) * seconds, rng.uniform(0.05, 0.3) * seconds]
    r = kill_chain(
        reference, f"chain_random{seed}", [lambda r, d=d: r.kill_after(d) for d in delays]
    )
    assert r.kills, "no random kill landed before the run finished"
