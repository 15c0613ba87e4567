"""A change-feed consumer for the torture run, as a backend would write one with the SDK.

It follows the coordinator's change feed with ``SagaClient.changes`` from after the position it
stored, and for each change first records the change (its "effect": one line appended to
``changes.jsonl``), then stores the change's position (a temporary file renamed over
``position``). Killed at any instant, it is restarted and resumes from the stored position: a
change may be recorded twice (killed between the two writes), never missed. Each line also names
the consumer's life (``life``), so the checker can tell a replay after a restart from a feed that
went backwards.

    python -m tests.torture.feed_consumer --target 127.0.0.1:PORT --dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from saga_sdk import SagaClient

CHANGES = "changes.jsonl"
POSITION = "position"
OPTIONS = (
    # The coordinator restarts every second or so: reconnect at once rather than after
    # gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
)


def stored_position(directory: Path) -> int:
    """The position of the last change processed (0: none yet)."""
    try:
        return int((directory / POSITION).read_text())
    except FileNotFoundError:
        return 0


def store_position(directory: Path, position: int) -> None:
    """Replace the stored position at once: a kill leaves the old one or the new one."""
    temporary = directory / f"{POSITION}.tmp"
    temporary.write_text(str(position))
    temporary.replace(directory / POSITION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    life = len(list(directory.glob("life-*"))) + 1
    (directory / f"life-{life}").touch()
    after = stored_position(directory)
    out = os.open(directory / CHANGES, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with SagaClient(args.target, options=OPTIONS) as client:
        for change in client.changes(after):
            line = {
                "life": life,
                "position": change.position,
                "saga_id": change.saga_id,
                "sequence": change.event.sequence,
                "type": change.event.type.name,
                "state": change.state.name,
            }
            os.write(out, (json.dumps(line, sort_keys=True) + "\n").encode())
            store_position(directory, change.position)


if __name__ == "__main__":
    main()
