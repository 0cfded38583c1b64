"""``autostart: true``: start (or, at shutdown, stop) every VM whose config asks for it, one by one.

For ``qwamos vm autostart`` and the ``qwamos-autostart.service`` unit (contrib/systemd/).  One VM failing
does not keep the others from starting: each gets its own outcome, and the caller decides what the run as a
whole returns (the CLI: the first failure's exit code, so that systemd marks the unit failed).  A VM that is
already running, starting or paused is left alone; a config that does not load is reported, never guessed at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwamos.errors import QwamosError
from qwamos.hypervisor import layout

if TYPE_CHECKING:
    from qwamos.hypervisor.manager import VMManager

# What each VM came to: started/stopped (done now), running/not-running (nothing to do), failed.
STARTED, STOPPED, ALREADY_RUNNING, NOT_RUNNING, FAILED = "started", "stopped", "running", "not-running", "failed"


@dataclass
class Outcome:
    """One autostart VM and what happened to it (``detail``: the accelerator, how it stopped, or the error)."""

    name: str
    result: str
    detail: str = ""
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "result": self.result, "detail": self.detail, "exit_code": self.exit_code}


def autostart_names(manager: VMManager) -> tuple[list[str], list[Outcome]]:
    """The VMs whose config says ``autostart: true``, and a failed Outcome for each config that cannot load."""
    names: list[str] = []
    broken: list[Outcome] = []
    for name in layout.list_vm_names(manager.root):
        try:
            cfg = manager.load(name)
        except QwamosError as e:
            broken.append(Outcome(name, FAILED, f"config: {e}", e.exit_code))
            continue
        if cfg.autostart:
            names.append(name)
    return names, broken


def start_all(
    manager: VMManager,
    *,
    on_outcome: Callable[[Outcome], None] = lambda _o: None,
    on_warning: Callable[[str], None] | None = None,
) -> list[Outcome]:
    """Start every stopped (or crashed) autostart VM; report each through ``on_outcome`` as it happens."""
    names, outcomes = autostart_names(manager)
    for o in outcomes:
        on_outcome(o)
    for name in names:
        try:
            state = manager.status(name).state
            if state in ("running", "starting", "paused"):
                outcome = Outcome(name, ALREADY_RUNNING, state)
            else:
                result = manager.start(name, on_warning=on_warning)
                outcome = Outcome(name, STARTED, result.accel.accel)
        except QwamosError as e:
            outcome = Outcome(name, FAILED, str(e), e.exit_code)
        outcomes.append(outcome)
        on_outcome(outcome)
    return outcomes


def stop_all(
    manager: VMManager, *, timeout: float, on_outcome: Callable[[Outcome], None] = lambda _o: None
) -> list[Outcome]:
    """Stop every running autostart VM (ACPI powerdown first, as ``vm stop``), for a unit's ``ExecStop``."""
    names, outcomes = autostart_names(manager)
    for o in outcomes:
        on_outcome(o)
    for name in names:
        try:
            if manager.status(name).state == "stopped":
                outcome = Outcome(name, NOT_RUNNING)
            else:
                outcome = Outcome(name, STOPPED, manager.stop(name, timeout=timeout))
        except QwamosError as e:
            outcome = Outcome(name, FAILED, str(e), e.exit_code)
        outcomes.append(outcome)
        on_outcome(outcome)
    return outcomes
