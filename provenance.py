"""Where a result came from: the commits, processors and sittings of a distillation and of its evaluation, in
words, read from a run folder's config.json / run.json and an evaluation's results.json."""
from __future__ import annotations

import json
from pathlib import Path

from runs import processor_name


def _short(commit: str | None) -> str:
    """A commit as its first 7 hex digits, keeping the "+dirty" of a working tree that differed from it."""
    if not commit:
        return "an unrecorded commit"
    return commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")


def _processor(record: dict) -> str:
    return processor_name(record) or "an unrecorded processor"


def _at(record: dict) -> str:
    """Where a sitting (or a whole run) computed: "at <commit> on <processor>"."""
    return f"at {_short(record.get('commit'))} on {_processor(record)}"


def distillation_record(result: dict, folder: Path) -> tuple[dict, dict]:
    """The distillation behind an evaluated set: (its config.json, its run.json), read from the set's folder
    (--syn) or the result's own; empty dicts for a baseline or where the files are gone."""
    syn = (result.get("config") or {}).get("syn")
    for place in ([Path(syn).parent] if syn else []) + [folder]:
        if (place / "config.json").is_file():
            run = place / "run.json"
            return (json.loads((place / "config.json").read_text()),
                    json.loads(run.read_text()) if run.is_file() else {})
    return {}, {}


def distilled_where(run: dict) -> str:
    """Where and at which commit a set was distilled: each sitting of a resumed run (run.json's stretches),
    else what run.json records, which for a run from before stretches were kept is its last sitting's (said
    so unless the sitting's own seconds cover the whole distillation)."""
    if not run:
        return "(its run.json is gone)"
    stretches = run.get("stretches") or [run]
    parts = [_at(part)
             + (f" (iterations {part['iterations'][0]}-{part['iterations'][1]})" if len(stretches) > 1 else "")
             for part in stretches]
    one_sitting = run.get("session_seconds", 0) >= run.get("wall_seconds", float("inf"))
    return ", ".join(parts) + ("" if run.get("stretches") or one_sitting else " (the last sitting's record)")


def evaluated_where(result: dict) -> str:
    """Where and at which commit a set was evaluated: each sitting of a resumed evaluation (results.json's
    sittings, with the networks it trained), else the one its environment records."""
    sittings = result.get("sittings") or [result.get("environment") or {}]
    return ", ".join(_at(part)
                     + (f" (networks {', '.join(str(k + 1) for k in part['networks'])})" if len(sittings) > 1 else "")
                     for part in sittings)


def provenance(path: Path) -> str:
    """One line saying how a results.json came about: the distillation's budget, commit and CPU (from the
    set's config.json and run.json), then the evaluation's networks x epochs, precision, commit and CPU."""
    result = json.loads(path.read_text())
    evaluation = (f"evaluated {result['num_eval']} x {result['epochs']} epochs, precision "
                  f"{(result.get('config') or {}).get('precision', 'unrecorded')}, {evaluated_where(result)}")
    config, run = distillation_record(result, path.parent)
    if not config:
        return evaluation
    where = distilled_where(run)
    iterations = run.get("iterations_done", config.get("iterations", "an unrecorded number of"))
    return (f"distilled {iterations} iterations at batch-real {config.get('batch_real', 'unrecorded')}, "
            f"precision {config.get('precision', 'unrecorded')} {where}; {evaluation}")
