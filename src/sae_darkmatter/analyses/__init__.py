"""Analyses: each reads a run folder (store, SAEs, decompositions) and returns JSON-able results plus figures."""
