"""The server's parts, built and wired in order, and taken down in the reverse order."""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass, field

from corral.core.audit import AuditLog
from corral.core.coderun import RunService, install_tools
from corral.core.commands import CommandService
from corral.core.files import FileService
from corral.core.idempotency import IdempotencyKeys
from corral.core.images import ImageService
from corral.core.leases import LeaderLoop, process_identity
from corral.core.logins import LoginThrottle
from corral.core.metrics import Metrics
from corral.core.models import NodeInfo
from corral.core.named_commands import NamedCommandService
from corral.core.node_events import NodeEvents
from corral.core.nodes import NodeRegistry, Presence, host_capacity
from corral.core.ports import PortService
from corral.core.replicas import ReplicaCount
from corral.core.results import EVERY, CommandResults
from corral.core.sandboxes import SandboxService
from corral.core.secrets import SecretService
from corral.core.snapshots import SnapshotService
from corral.core.tokens import TokenService
from corral.core.volumes import VolumeService
from corral.core.webhooks import WebhookService
from corral.node.agent import NodeAgent
from corral.node.bus import Bus, tls_context
from corral.node.directory import NodeDirectory
from corral.node.images import NodeImages
from corral.node.local import LocalNode
from corral.runtime import hostlock
from corral.runtime.base import Runtime
from corral.runtime.limits import Limits
from corral.settings import Settings
from corral.store.db import Database
from corral.store.writer import BatchWriter

log = logging.getLogger("corral")
SHUTDOWN_DRAIN_SECONDS = 10.0


def build_runtime(settings: Settings, host_lock: hostlock.NodeLock | None = None) -> Runtime:
    if settings.runtime == "fake":
        from corral.runtime.fake import FakeRuntime

        return FakeRuntime()
    from corral.runtime.namespaces import NamespacesRuntime
    from corral.runtime.netpolicy import EgressOptions, parse_open

    return NamespacesRuntime(
        data_dir=settings.data_dir,
        uid_base=settings.uid_base,
        cgroup_name=settings.cgroup_root,
        favor_dynmods=settings.cgroup_favor_dynmods,
        tools_dir=settings.effective_tools_dir,
        templates_dir=settings.effective_templates_dir,
        network_open=parse_open(settings.network_open),
        link_subnet=host_lock.link_subnet if host_lock else None,
        egress=EgressOptions(
            dns_upstream=settings.dns_upstream,
            upstream_ca_file=settings.egress_ca_file,
            private_answers=settings.egress_private_answers,
        ),
    )


def lock_host(settings: Settings) -> hostlock.NodeLock | None:
    """Hold this node's cgroup root, uids, network table and data dir against other live nodes
    of this host (the fake runtime uses none of them)."""
    if settings.runtime == "fake":
        return None
    return hostlock.acquire(
        hostlock.node_claim(
            data_dir=settings.data_dir,
            cgroup_root=settings.cgroup_root,
            uid_base=settings.uid_base,
            uid_count=settings.uid_count,
        )
    )


@dataclass
class Services:
    settings: Settings
    db: Database
    node: LocalNode | None  # the built-in node (none in a replica run with --no-local-node)
    directory: NodeDirectory
    tokens: TokenService
    sandboxes: SandboxService
    commands: CommandService
    files: FileService
    runs: RunService
    named: NamedCommandService
    logins: LoginThrottle
    nodes: NodeRegistry
    presence: Presence | None
    metrics: Metrics
    audit: AuditLog | None = None  # set in start()
    host_lock: hostlock.NodeLock | None = None
    bus: Bus | None = None
    results: CommandResults | None = None
    node_events: NodeEvents | None = None
    leaders: list[LeaderLoop] = field(default_factory=list)
    node_agent: NodeAgent | None = None  # the built-in node, served over NATS in a fleet
    replicas: ReplicaCount | None = None
    volumes: VolumeService = None  # type: ignore[assignment]  # set in start(): needs the others
    snapshots: SnapshotService = None  # type: ignore[assignment]  # likewise
    images: ImageService = None  # type: ignore[assignment]  # set in start(): needs the others
    ports: PortService = None  # type: ignore[assignment]  # likewise
    idempotency: IdempotencyKeys = None  # type: ignore[assignment]  # likewise
    webhooks: WebhookService = None  # type: ignore[assignment]  # likewise
    secrets: SecretService = None  # type: ignore[assignment]  # likewise

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        # 0. What this node holds alone on the host, before anything is cleaned up or reused:
        #    another live node with the same settings refuses to start, naming them.
        host_lock = await asyncio.to_thread(lock_host, settings) if settings.local_node else None
        try:
            return await cls._start(settings, host_lock)
        except BaseException:
            if host_lock is not None:
                host_lock.release()
            raise

    @classmethod
    async def _start(cls, settings: Settings, host_lock: hostlock.NodeLock | None) -> Services:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # 1. The store, migrated to the current schema (once, whichever replica comes first).
        db = Database(settings.effective_database_url, pool_size=settings.database_connections)
        await db.migrate()
        # The SQLite file holds secrets and token hashes: its owner's alone.
        if db.is_sqlite and not settings.database_url:
            for suffix in ("", "-wal", "-shm"):
                path = settings.data_dir / f"corral.db{suffix}"
                if path.exists():
                    path.chmod(0o600)
        # 2. The admin key (printed once when generated).
        admin_key, generated = settings.resolve_admin_key()
        if generated:
            print(
                f"corral: generated admin key (kept in {settings.data_dir / 'admin.key'}):\n"
                f"  {admin_key}",
                flush=True,
            )
        # 3. The built-in node, unless this is a replica without one: the tools every sandbox
        #    sees at /opt/corral, a check of the host, and removal of what a last run left.
        deno = False
        node: LocalNode | None = None
        if settings.local_node:
            node, deno = await start_local_node(settings, host_lock)
        # 4. In a fleet: NATS, to every other node and replica.
        bus: Bus | None = None
        results: CommandResults | None = None
        if settings.nats_url:
            bus = await Bus.connect(
                settings.nats_url,
                name=f"corral-replica-{process_identity()}",
                creds=settings.nats_creds,
                tls=tls_context(
                    settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key
                ),
            )
            results = CommandResults(db, bus)
            await results.start()
        # 5. The node in the store, online while this process runs (in a fleet it registers
        #    over NATS like any agent's, once this replica takes node events: step 7).
        metrics = Metrics()  # this process's series, served at /metrics
        nodes = NodeRegistry(db, lost_after=settings.node_lost_after_s, metrics=metrics)
        presence: Presence | None = None
        capacity = host_capacity(min(settings.max_sandboxes, settings.uid_count))
        if node is not None and bus is None:
            local = node
            presence = Presence(
                nodes,
                lambda: local.info(capacity),
                local.load,
                interval=settings.node_lost_after_s / 3,
            )
            await presence.start()
        directory = NodeDirectory(
            db,
            node,
            bus=bus,
            wait_result=results.wait_outcome if results is not None else None,
            lost_after=settings.node_lost_after_s,
        )
        writer = BatchWriter(db)
        writer.start()
        audit = AuditLog(db, writer, retention_days=settings.audit_retention_days)
        audit.start()
        commands = CommandService(db, directory, settings, writer, results, metrics)
        files = FileService(directory, settings)
        services = cls(
            settings=settings,
            db=db,
            node=node,
            directory=directory,
            tokens=TokenService(
                db, admin_key, settings.rate_limit_per_second, settings.rate_limit_burst, metrics
            ),
            sandboxes=SandboxService(
                db,
                directory,
                settings.data_dir,
                max_sandboxes=settings.max_sandboxes,
                uid_count=settings.uid_count,
                default_limits=Limits(
                    cpu=settings.default_cpu or None,
                    memory_mb=settings.default_memory_mb or None,
                    pids=settings.default_pids or None,
                    disk_mb=settings.default_disk_mb or None,
                ),
                warm_pool=settings.warm_pool,
                nodes=nodes,
                metrics=metrics,
            ),
            commands=commands,
            files=files,
            runs=RunService(commands, files, deno=deno),
            named=None,  # type: ignore[arg-type]  # set just below: it needs the others
            logins=LoginThrottle(db, metrics),
            nodes=nodes,
            presence=presence,
            metrics=metrics,
            audit=audit,
            host_lock=host_lock,
            bus=bus,
            results=results,
        )
        services.named = NamedCommandService(
            db, services.sandboxes, services.commands, services.tokens
        )
        services.volumes = VolumeService(
            db, directory, nodes, default_size_mb=settings.default_volume_mb
        )
        services.sandboxes.volumes = services.volumes
        services.snapshots = SnapshotService(db, directory, services.sandboxes)
        services.sandboxes.snapshots = services.snapshots
        services.images = ImageService(db, directory, nodes)
        services.sandboxes.images = services.images
        services.secrets = SecretService(db, settings.secrets_key)
        services.sandboxes.secrets = services.secrets
        services.ports = PortService(
            db,
            services.sandboxes,
            admin_key,
            public_domain=settings.public_domain,
            public_scheme=settings.public_scheme,
            max_connections=settings.max_port_connections,
        )
        # What an import cut short by the last stop left; what the node's store holds now.
        shutil.rmtree(settings.data_dir / "image-uploads", ignore_errors=True)
        if node is not None:
            await services.images.sync(node)
        # 5b. Idempotency keys (owned by this process while it answers them), and webhooks:
        #     events of sandboxes and commands, stored as they happen and delivered from the
        #     store (in a fleet, by the one replica that holds the delivery lease).
        holder = process_identity()  # this replica's leases
        services.idempotency = IdempotencyKeys(db, holder, fleet=bus is not None)
        services.webhooks = WebhookService(
            db,
            holder,
            fleet=bus is not None,
            allow_private=settings.webhook_allow_private,
            retry_base=settings.webhook_retry_base_seconds,
            retry_for=settings.webhook_retry_for_seconds,
            timeout=settings.webhook_timeout_seconds,
        )
        await services.webhooks.start()
        services.sandboxes.events = services.webhooks.emit
        services.commands.events = services.webhooks.emit
        nodes.on_lost = services.commands.announce_in  # commands declared lost in bulk
        # 6. Whatever ran on the built-in node when the server last stopped has an unknown
        #    result; sandboxes that should run come back with their files. (In a fleet its
        #    registration does both.)
        if node is not None and bus is None:
            lost = await services.commands.mark_lost(node.id)
            if lost:
                log.warning("%d command(s) were running when the server stopped: marked lost", lost)
            await services.sandboxes.reconcile(node.id)
        # 7. What nodes report, and the loops one replica of a fleet runs for all.
        if bus is not None and results is not None:
            services.node_events = NodeEvents(db, bus, nodes, results, services.sandboxes)
            services.node_events.events = services.webhooks.emit
            services.node_events.events_wanted = services.webhooks.wanted
            await services.node_events.start()
            services.leaders = [
                LeaderLoop(db, "ttl-reaper", holder, services.sandboxes.reap_expired, interval=1.0),
                LeaderLoop(
                    db,
                    "node-sweep",
                    holder,
                    services.sweep_nodes,
                    interval=max(0.2, settings.node_lost_after_s / 5),
                ),
            ]
            for loop in services.leaders:
                loop.start()
            services.replicas = ReplicaCount(db, holder, services.tokens.share_limits)
            await services.replicas.start()
            if node is not None:
                # The built-in node serves the other replicas over NATS, as an agent would.
                served = node

                def described() -> NodeInfo:
                    info = served.info(capacity)
                    info.deno = deno
                    return info

                services.node_agent = NodeAgent(
                    served,
                    bus,
                    described,
                    sandboxes_dir=settings.data_dir / "sandboxes",
                )
                await services.node_agent.start()
        else:
            services.sandboxes.start_reaper()
        services.sandboxes.start_pool()
        services.tokens.start_watcher()
        return services

    async def sweep_nodes(self) -> None:
        # Heartbeats come over NATS: a replica that was cut off from it (or just came back)
        # has not heard them, which says nothing of the nodes.
        if self.bus is not None and self.bus.connected_for() < self.settings.node_lost_after_s:
            return
        for node_id, lost in await self.nodes.sweep():
            log.warning("node %s stopped answering: offline, %d command(s) lost", node_id, lost)
            if lost:
                self.metrics.command_finished("lost", lost)
            if lost and self.results is not None:
                await self.results.announce(EVERY)

    async def close(self) -> None:
        # 1. No new commands; node events go to the other replicas from now on.
        self.commands.stop_accepting()
        if self.node_events is not None:
            await self.node_events.close()
        for loop in self.leaders:
            await loop.stop()
        if self.replicas is not None:
            await self.replicas.stop()
        await self.tokens.stop_watcher()
        if self.webhooks is not None:
            await self.webhooks.close()  # what it was sending stays pending, for the next start
        await self.sandboxes.stop_reaper()
        await self.sandboxes.close_pool()
        # 2. Stop the sandboxes (their files stay; they come back at the next start). Commands
        #    still running end as lost.
        if self.node is not None:
            await self.node.shutdown()
        if self.node_agent is not None:
            await self.node_agent.close()
        if self.presence is not None:
            await self.presence.stop()
        # 3. Record those results, then close the store.
        await self.commands.drain(SHUTDOWN_DRAIN_SECONDS)
        if self.audit is not None:
            await self.audit.close()  # the entries of every request answered so far
        await self.commands.writer.close()
        if self.results is not None:
            await self.results.close()
        if self.bus is not None:
            await self.bus.close()
        await self.db.close()
        # 4. Free this node's hold on the host's resources, now that nothing uses them.
        if self.host_lock is not None:
            self.host_lock.release()


async def start_local_node(
    settings: Settings, host_lock: hostlock.NodeLock | None
) -> tuple[LocalNode, bool]:
    """The built-in node of this host (a server's, or an agent's), prepared: the tools every
    sandbox sees at /opt/corral installed (whether Deno is among them), the host checked, and
    what a previous run left behind removed."""
    deno = False
    if settings.runtime != "fake":
        deno = install_tools(settings.effective_tools_dir)
    node = LocalNode(
        node_id=settings.node_id,
        runtime=build_runtime(settings, host_lock),
        data_dir=settings.data_dir,
        kill_grace_ms=settings.kill_grace_ms,
        images=NodeImages(
            settings.images_dir,
            insecure_registries=settings.insecure_registry_list,
            max_image_bytes=settings.max_image_bytes,
            store_max_bytes=settings.image_store_max_bytes,
        ),
    )
    for warning in await node.prepare():
        log.warning("%s", warning)
    return node, deno
