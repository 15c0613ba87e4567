"""The Node.js SDK as its users get it: ``npm pack``, installed from the tarball into an empty
project outside the repository, type-checked with ``tsc --strict`` from a consumer's ``.ts``
file, and the README's participant run from there until ``saga conformance`` passes against it.

The install runs npm with ``--prefer-offline`` (the registry is reachable, the cache usually
has everything) and ``--ignore-scripts``: the one install script among the dependencies
compiles better-sqlite3's SQLite from source, minutes on two cores. The test puts the addon
built for the repository's own install in its place instead, after checking that both are the
same better-sqlite3 version for the same Node.js. ``SAGA_NODE_PACKAGE_FULL_INSTALL=1`` runs the
install scripts as a plain ``npm install`` would (``make test-node-package-full``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port, wait_serving

REPO = Path(__file__).resolve().parents[2]
NODE_SDK = REPO / "clients" / "node"
TSC = NODE_SDK / "node_modules" / ".bin" / "tsc"
SAGA = Path(sys.executable).with_name("saga")
NODE = shutil.which("node")
NPM = shutil.which("npm")
FULL_INSTALL = os.environ.get("SAGA_NODE_PACKAGE_FULL_INSTALL") == "1"

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None or not TSC.exists(),
    reason="needs node, npm and the Node SDK's dev dependencies (make install)",
)

# Dependencies a TypeScript consumer of the PostgreSQL barrier adds next to the SDK, pinned
# to the versions the SDK is developed with (so the npm cache has them).
CONSUMER_DEPENDENCIES = ("@types/node@20.19.43", "pg@8.23.1", "@types/pg@8.23.1")

CONSUMER_TS = """\
import fs from 'node:fs';
import {
  Participant,
  PermanentFailure,
  Rejected,
  RetryLater,
  SagaClient,
  SqliteBarrier,
  type ExecuteContext,
  type Saga,
} from '@saga-coordinator/sdk';
import { PostgresBarrier } from '@saga-coordinator/sdk/postgres';
import { ParticipantTestKit, type CheckReport } from '@saga-coordinator/sdk/testing';
import { setupTracing } from '@saga-coordinator/sdk/tracing';

interface Order {
  amount: number;
  currency: string;
}

export async function cards(): Promise<CheckReport> {
  const tracing = await setupTracing({ serviceName: 'cards' });
  const barrier = new SqliteBarrier('cards.db');
  barrier.db.exec('CREATE TABLE IF NOT EXISTS cards (id TEXT PRIMARY KEY, amount INTEGER)');
  const participant = new Participant('cards', { barrier })
    .action('IssueCard', async (ctx: ExecuteContext<Order>) => {
      if (ctx.input.currency !== 'EUR') {
        throw new PermanentFailure('EUR only', { reason: 'CURRENCY' });
      }
      if (ctx.input.amount > 100_000) throw new Rejected('CARD_LIMIT_EXCEEDED');
      if (ctx.attempt === 1 && ctx.input.amount === 0) {
        throw new RetryLater('card network busy', { retryAfterMs: 30_000 });
      }
      return (db) => {
        db.prepare('INSERT INTO cards VALUES (?, ?)').run(ctx.sagaId, ctx.input.amount);
        return { card_id: ctx.sagaId };
      };
    })
    .compensation('CancelCard', (ctx) => (db) => {
      db.prepare('DELETE FROM cards WHERE id = ?').run(ctx.sagaId);
    });
  const report = await new ParticipantTestKit(participant).checkStep({
    action: 'IssueCard',
    compensation: 'CancelCard',
    input: { amount: 10, currency: 'EUR' },
    observe: (sagaId) => barrier.db.prepare('SELECT amount FROM cards WHERE id = ?').all(sagaId),
  });
  await tracing.shutdown();
  return report;
}

export function ledger(url: string): Participant<import('pg').PoolClient> {
  const barrier = new PostgresBarrier(url, { table: 'saga_barrier', max: 4 });
  return new Participant('ledger', { barrier }).action('Credit', async (ctx) => async (client) => {
    await client.query('INSERT INTO entries (saga_id) VALUES ($1)', [ctx.sagaId]);
    return { ok: true };
  });
}

export async function watch(target: string): Promise<Saga> {
  const client = new SagaClient(target, { tls: { ca: fs.readFileSync('ca.pem') } });
  const { saga } = await client.create('onboard', { company: 'Acme' }, { sagaId: 'acme-1' });
  client.close();
  return saga;
}
"""

# Misuses the types must refuse: were the package's types missing or `any`, these would pass.
WRONG_TS = """\
import { RetryLater, SqliteBarrier } from '@saga-coordinator/sdk';
import { PostgresBarrier } from '@saga-coordinator/sdk/postgres';

export const noDelay = new RetryLater('later');
export const notAPath = new SqliteBarrier(42);
export const noTable = new PostgresBarrier('postgresql://x', { table: 7 });
"""

TSCONFIG = {
    "compilerOptions": {
        "target": "ES2022",
        "module": "nodenext",
        "moduleResolution": "nodenext",
        "strict": True,
        "noEmit": True,
        "skipLibCheck": False,
        "types": ["node"],
    },
}


def run(
    args: list[str | Path], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def readme_participant() -> str:
    """The participant program the README shows, as a user would copy it."""
    readme = (NODE_SDK / "README.md").read_text()
    section = readme[readme.index("## Write a participant in Node.js") :]
    match = re.search(r"```js\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty project outside the repository with the packed SDK installed."""
    assert NPM is not None
    work = tmp_path_factory.mktemp("node-package")
    assert not work.resolve().is_relative_to(REPO), "the project must live outside the repository"
    packed = run([NPM, "pack", "--silent", "--pack-destination", work], NODE_SDK)
    assert packed.returncode == 0, packed.stderr
    tarball = work / packed.stdout.strip().splitlines()[-1]
    assert tarball.is_file(), packed.stdout

    project = work / "consumer"
    project.mkdir()
    (project / "package.json").write_text(
        json.dumps({"name": "consumer", "version": "1.0.0", "private": True, "type": "module"})
    )
    install = [NPM, "install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"]
    if not FULL_INSTALL:
        install.append("--ignore-scripts")
    installed = run([*install, tarball, *CONSUMER_DEPENDENCIES], project, timeout=900)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    if not FULL_INSTALL:
        take_repository_addon(project)
    return project


def take_repository_addon(project: Path) -> None:
    """Put the repository install's better-sqlite3 addon where the skipped build would."""
    ours = NODE_SDK / "node_modules" / "better-sqlite3"
    theirs = project / "node_modules" / "better-sqlite3"
    version = json.loads((ours / "package.json").read_text())["version"]
    assert json.loads((theirs / "package.json").read_text())["version"] == version
    addon = Path("build") / "Release" / "better_sqlite3.node"
    (theirs / addon).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ours / addon, theirs / addon)


def test_the_tarball_ships_the_contract_and_no_repository_path(consumer: Path) -> None:
    package = consumer / "node_modules" / "@saga-coordinator" / "sdk"
    manifest = json.loads((package / "package.json").read_text())
    assert "private" not in manifest
    assert set(manifest["exports"]) >= {".", "./postgres", "./testing", "./tracing"}
    assert (package / "CHANGELOG.md").read_text().startswith("# Changelog")
    shipped = sorted(p.name for p in (package / "protos" / "saga" / "v1").glob("*.proto"))
    assert shipped == sorted(p.name for p in (REPO / "protos" / "saga" / "v1").glob("*.proto"))
    assert not (package / "test").exists()
    assert NODE is not None
    env = {k: v for k, v in os.environ.items() if k not in ("SAGA_PROTOS_DIR", "NODE_PATH")}
    probe = subprocess.run(
        [
            NODE,
            "--input-type=module",
            "-e",
            "import { loadContract } from '@saga-coordinator/sdk';"
            "await import('@saga-coordinator/sdk/postgres');"
            "await import('@saga-coordinator/sdk/testing');"
            "console.log(loadContract().protosDir);",
        ],
        cwd=consumer,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == (package / "protos").resolve()


def test_a_typescript_consumer_type_checks_with_strict(consumer: Path) -> None:
    # One program, so tsc runs once: the consumer's file must check clean and every misuse in
    # the other must be refused.
    (consumer / "tsconfig.json").write_text(
        json.dumps({**TSCONFIG, "files": ["consumer.ts", "wrong.ts"]})
    )
    (consumer / "consumer.ts").write_text(CONSUMER_TS)
    (consumer / "wrong.ts").write_text(WRONG_TS)
    checked = run([TSC, "-p", "tsconfig.json"], consumer)
    errors = re.findall(r"^(\S+?)\((\d+),\d+\): error (TS\d+)", checked.stdout, re.MULTILINE)
    assert [(file, line) for file, line, _ in errors] == [
        ("wrong.ts", "4"),
        ("wrong.ts", "5"),
        ("wrong.ts", "6"),
    ], checked.stdout + checked.stderr


@pytest.fixture
def readme_participant_process(consumer: Path) -> Iterator[str]:
    """The README's participant, run from the consumer project on a free port."""
    (consumer / "participant.js").write_text(readme_participant())
    port = free_port()
    log = consumer / "participant.log"
    env = {k: v for k, v in os.environ.items() if k not in ("SAGA_PROTOS_DIR", "NODE_PATH")}
    env |= {"PORT": str(port), "DATABASE": str(consumer / "accounts.db")}
    assert NODE is not None
    with log.open("wb") as out:
        process = subprocess.Popen(
            [NODE, "participant.js"], cwd=consumer, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, process, log)
        yield address
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_readme_participant_passes_conformance(
    consumer: Path, readme_participant_process: str
) -> None:
    checked = run(
        [
            SAGA,
            "conformance",
            "--target",
            readme_participant_process,
            "--action",
            "OpenAccount",
            "--compensation",
            "CloseAccount",
            "--payload",
            '{"company": "Acme Corp"}',
        ],
        consumer,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    print(checked.stdout)
