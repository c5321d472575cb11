"""The run folder's layout: the one place that names each stage's output.

::

    run_config.json          the resolved RunConfig the run used
    store/                   activation store (safetensors shards + manifest)
    saes/<name>/             SAELens-format SAE folders; saes/<hook>/<name>/ for other hooks
    decompose/<sae>.json     held-out metrics of each SAE (+ <sae>.safetensors probes)
    transcoders/<name>/      the transcoders the run trained (SAELens folders)
    decompose/transcoders/   the transcoders' decompositions, as decompose/ has the SAEs'
    analyses.json            every analysis's result, keyed by name
    error_saes/, downstream/ SAEs trained on the error parts; per-token splice values
    autointerp/              latent explanations and scores
    metrics.json, report.html, figures/*.png

Stages reach these through ``RunDir`` (``run_dir.py``); modules below it (the store's integrity
check) use the names here.
"""

from __future__ import annotations

RUN_CONFIG = "run_config.json"
RUN_LOCK = ".run.lock"
STORE = "store"
SAES = "saes"
ERROR_SAES = "error_saes"
DECOMPOSE = "decompose"
TRANSCODERS = "transcoders"
TRANSCODER_RESULTS = f"{DECOMPOSE}/{TRANSCODERS}"
DOWNSTREAM = "downstream"
AUTOINTERP = "autointerp"
ANALYSES = "analyses.json"
METRICS = "metrics.json"
REPORT = "report.html"
FIGURES = "figures"
SAE_FOLDERS = (SAES, ERROR_SAES, TRANSCODERS)  # where a run keeps the SAEs it trained
