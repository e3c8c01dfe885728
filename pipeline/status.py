"""``clad status``: every stage and run of a workspace, compared with config.toml."""

from __future__ import annotations

from pipeline.workspace import StageState, Workspace, extract_state


def workspace_status(ws: Workspace) -> list[StageState]:
    cfg = ws.config()
    states = [extract_state(ws, cfg)]
    try:
        from pipeline.runs import run_states
    except ImportError:  # training not available yet
        return states
    for name in ws.runs():
        states += run_states(ws, cfg, name, states[0])
    return states
