"""Alias moves that never race, and their history, kept in the MLflow registry itself.

MLflow has no transactions and keeps no history of aliases. Two things it does guarantee are
enough for both:

- The lock: creating a registered model that already exists fails (a unique key in the
  tracking server's database). Whoever creates ``<model>.lock`` holds the registry for that
  model; everyone else waits. Manual promote / rollback and the gate all move aliases only
  while holding it, so two workspaces sharing one tracking server serialize through the server
  itself. A lock older than ``LEASE_S`` (its holder died) is taken over.
- The history: every alias move appends a tag ``alias_history.NNNNNN`` to the registered model
  (a JSON record: when, who, which alias, from which version to which, why, and the gate's
  figures). Numbers are given out under the lock, so the order is the order of the moves. The
  registered model's page shows them; ``vae-pipeline history`` prints them as a table.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_core.errors import VaeError

LOCK_SUFFIX = ".lock"
LEASE_S = 300.0  # no holder keeps the lock this long: the critical sections take seconds
HISTORY_PREFIX = "alias_history."


class RegistryBusy(VaeError, RuntimeError):
    """The registry lock stayed with another holder for longer than we would wait."""


def lock_name(model_name: str) -> str:
    return model_name + LOCK_SUFFIX


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _take_over(client: MlflowClient, name: str, expired_since: int) -> None:
    """Delete an expired lock, unless another waiter already replaced it with a fresh one:
    re-read it just before deleting and delete only the lock we judged expired. MLflow has no
    compare-and-delete, so two waiters could still race within those two calls; with a lease
    of LEASE_S that needs a holder to die and two waiters to wake within milliseconds."""
    try:
        current = client.get_registered_model(name)
        if current.creation_timestamp == expired_since:
            client.delete_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # already taken over and released
            raise


@contextmanager
def registry_lock(
    client: MlflowClient, model_name: str, holder: str, wait_s: float = 600.0
) -> Iterator[None]:
    """Hold the alias lock of ``model_name`` for the block (see the module docstring)."""
    name = lock_name(model_name)
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"lock.holder": holder, "lock.since": _now()},
                description=f"Registry lock of {model_name!r}: aliases are being moved by "
                f"{holder}. It disappears when the move is done.",
            )
            break
        except MlflowException as exc:
            # RESOURCE_DOES_NOT_EXIST: the SQL store reports a taken name by reading the row
            # back, and the holder released it in between: free now, so try again at once.
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(name)
        except MlflowException:
            continue  # released between our two calls: try again at once
        age_s = time.time() - held.creation_timestamp / 1000
        who = held.tags.get("lock.holder", "?")
        if age_s > LEASE_S:  # its holder died holding it
            _take_over(client, name, held.creation_timestamp)
            continue
        if time.monotonic() > deadline:
            raise RegistryBusy(
                f"registered model {model_name!r}: the alias lock {name!r} is held by {who} "
                f"(for {age_s:.0f} s); waited {wait_s:.0f} s"
            )
        if not said:
            print(f"waiting for the registry lock {name!r} held by {who}", file=sys.stderr)
            said = True
        time.sleep(0.2)
    try:
        yield
    finally:
        client.delete_registered_model(name)


def read_history(client: MlflowClient, model_name: str) -> list[dict[str, Any]]:
    """Every recorded alias move of ``model_name``, oldest first."""
    tags = client.get_registered_model(model_name).tags
    entries = [
        json.loads(value) | {"seq": int(key.removeprefix(HISTORY_PREFIX))}
        for key, value in tags.items()
        if key.startswith(HISTORY_PREFIX)
    ]
    return sorted(entries, key=lambda e: e["seq"])


def move_aliases(
    client: MlflowClient,
    model_name: str,
    moves: Mapping[str, str | None],
    *,
    actor: str,
    action: str,
    reason: str,
    figures: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Point each alias in ``moves`` at its version (None: remove it) and record each real
    move in the history. The caller holds ``registry_lock``. Returns the recorded entries."""
    current = {a: str(v) for a, v in client.get_registered_model(model_name).aliases.items()}
    seq = len(read_history(client, model_name))
    recorded = []
    for alias, version in moves.items():
        before = current.get(alias)
        if before == version:
            continue
        if version is None:
            client.delete_registered_model_alias(model_name, alias)
        else:
            client.set_registered_model_alias(model_name, alias, version)
        seq += 1
        entry = {
            "at": _now(),
            "actor": actor,
            "action": action,
            "alias": alias,
            "from": before,
            "to": version,
            "reason": reason[:2000],
            "figures": {k: v for k, v in (figures or {}).items() if v is not None},
        }
        client.set_registered_model_tag(
            model_name, f"{HISTORY_PREFIX}{seq:06d}", json.dumps(entry, sort_keys=True)
        )
        recorded.append(entry | {"seq": seq})
    if recorded:
        _describe(client, model_name)
    return recorded


DESCRIBED_MOVES = 15  # the registered model's description shows the latest moves as a table


def _describe(client: MlflowClient, model_name: str) -> None:
    """The latest moves as a Markdown table in the registered model's description, which the
    MLflow UI renders on the model's page (the tags keep the full record)."""
    history = read_history(client, model_name)
    shown = history[-DESCRIBED_MOVES:]
    text = (
        f"**Alias history** (the latest {len(shown)} of {len(history)} moves; every move is "
        f"kept in the `{HISTORY_PREFIX}*` tags, `vae-pipeline history` prints them all)\n\n"
        + history_table(shown)
    )
    client.update_registered_model(model_name, description=text[:5000])


def history_table(entries: list[dict[str, Any]]) -> str:
    """The history as a Markdown table, one row per alias move."""
    lines = [
        "| # | at (UTC) | actor | action | alias | from | to | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        reason = str(e.get("reason", "")).replace("|", "/").replace("\n", " ")
        cells = [e["seq"], e["at"], e["actor"], e["action"], e["alias"], e["from"], e["to"]]
        row = " | ".join("-" if c is None else str(c) for c in cells)
        lines.append(f"| {row} | {reason[:120]} |")
    return "\n".join(lines) + "\n"
