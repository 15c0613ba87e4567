"""A change-feed consumer for the torture run, as a backend would write one with the SDK.

It follows the coordinator's change feed with ``SagaClient.changes`` from after the position it
stored, and for each change first records the change (its "effect": one line appended to
``changes.jsonl``), then stores the change's position (a temporary file renamed over
``position``). Killed at any instant, it is restarted and resumes from the stored position: a
change may be recorded twice (killed between the two writes), never missed. Each line also names
the consumer's life (``life``), so the checker can tell a replay after a restart from a feed that
went backwards.

With several ``--target`` (replicas on one store), it follows one of them and moves to the next
when that one is down (killed, restarting or paused: it no longer answers its health check),
resuming there from the stored position; each life starts on another replica.

    python -m tests.torture.feed_consumer --target 127.0.0.1:PORT [--target ...] --dir DIR
        [--tls-dir DIR]

With ``--tls-dir``, it dials the coordinators over mTLS with the run's client certificate.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saga_sdk import SagaClient, SagaSdkError
from tests.torture.tls import TortureTls, channel

CHANGES = "changes.jsonl"
POSITION = "position"
OPTIONS = (
    # The coordinator restarts every second or so: reconnect at once rather than after
    # gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
)
HEALTH_EVERY = 0.25
"""Seconds between two health checks of the replica followed."""
HEALTH_TIMEOUT = 0.5
MISSED_HEALTH_CHECKS = 2
"""Failed health checks in a row after which the replica followed is taken as down."""


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
    parser.add_argument("--target", action="append", required=True, help="repeat per replica")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--tls-dir", type=Path, help="the run's certificates (mTLS)")
    args = parser.parse_args()
    targets: list[str] = args.target
    directory: Path = args.dir
    tls = None if args.tls_dir is None else TortureTls(args.tls_dir)
    directory.mkdir(parents=True, exist_ok=True)
    life = len(list(directory.glob("life-*"))) + 1
    (directory / f"life-{life}").touch()
    out = os.open(directory / CHANGES, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if len(targets) == 1:
        # One coordinator: the SDK reopens the feed on it by itself when it restarts.
        with channel(targets[0], tls, list(OPTIONS)) as one, SagaClient(channel=one) as client:
            consume(client, directory, life, out)
        return
    index = life % len(targets)
    while True:
        target = targets[index]
        if healthy(target, tls):
            print(f"life {life}: following {target}", flush=True)
            follow_while_up(target, tls, directory, life, out)
            print(f"life {life}: {target} is down", flush=True)
        else:
            time.sleep(HEALTH_EVERY / 5)  # all of them may be down (restarting): do not spin
        index = (index + 1) % len(targets)


def consume(client: SagaClient, directory: Path, life: int, out: int) -> None:
    """Record every change after the stored position, then store its position; for ever."""
    for change in client.changes(stored_position(directory)):
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


def follow_while_up(
    target: str, tls: TortureTls | None, directory: Path, life: int, out: int
) -> None:
    """Consume the feed from ``target`` until it stops answering its health checks."""
    followed = channel(target, tls, list(OPTIONS))
    down = threading.Event()
    done = threading.Event()

    def watch() -> None:
        missed = 0
        while not done.wait(HEALTH_EVERY):
            missed = 0 if healthy(target, tls) else missed + 1
            if missed >= MISSED_HEALTH_CHECKS:
                down.set()
                followed.close()  # ends the stream, and the SDK's attempts to reopen it here
                return

    watchdog = threading.Thread(target=watch, name=f"health of {target}", daemon=True)
    watchdog.start()
    try:
        consume(SagaClient(channel=followed), directory, life, out)
    except (SagaSdkError, ValueError):  # cut off by the close, or reopened on a closed channel
        if not down.is_set():
            raise
    finally:
        done.set()
        watchdog.join()
        followed.close()


def healthy(target: str, tls: TortureTls | None) -> bool:
    """Whether the coordinator at ``target`` answers its health check SERVING."""
    with channel(target, tls, []) as checked:
        try:
            response = health_pb2_grpc.HealthStub(checked).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


if __name__ == "__main__":
    main()
