"""``freshrec``: run the embedded stack, feed it, ask it, and operate its models.

Every verb has ``--help``. Verbs that talk to a running freshrec find it through the options
below (or their ``FRESHREC_*`` variables), else through the ``stack.json`` that ``freshrec up``
writes into its data folder, else on the default ports.
"""

import asyncio
import logging
import signal
import time
from collections.abc import Coroutine
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli import render
from cli.clients import CliError, Endpoints, call, read_state, resolve
from cli.scaling import MAX_REPLICAS, Handover, progress_of, request, take_request
from cli.stack import DEFAULT_PORTS, SERVICES, Stack
from shared.settings import PeerSettings, TlsSettings

T = TypeVar("T")

app = typer.Typer(
    name="freshrec",
    help="A recommender that learns online: `freshrec up` starts it, `freshrec demo` shows it learn.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List model versions, promote one, or roll back.", no_args_is_help=True)
db_app = typer.Typer(help="Schema migrations of the services' SQL tables (Alembic).", no_args_is_help=True)
items_app = typer.Typer(
    help="Retire catalogue items: hide them, bring them back, or delete them for good.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(items_app, name="items")
app.add_typer(db_app, name="db")

console = Console()
errors = Console(stderr=True)

#: Trainer settings that make the embedded stack of ``freshrec demo`` export often enough to watch.
DEMO_TRAINER_ENV = {"FRESHREC_EXPORT_INTERVAL_S": "3", "FRESHREC_MICRO_BATCH": "128"}
#: The ingestion setting that bounds how old an event may be (lowered for backfills).
EARLIEST_EVENT_TIME_ENV = "FRESHREC_EARLIEST_TIME"


class ScalableService(StrEnum):
    ingestion = "ingestion"
    feature = "feature"
    inference = "inference"


class Options:
    """The root options, shared by every verb."""

    def __init__(self, data_dir: Path, addresses: dict[str, str | None], peer: PeerSettings) -> None:
        self.data_dir = data_dir
        self.addresses = addresses
        self.peer = peer

    def endpoints(self) -> Endpoints:
        return resolve(self.data_dir, self.addresses, self.peer)


def fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a verb's coroutine; a CliError becomes one red line and exit status 1."""
    try:
        return asyncio.run(coro)
    except CliError as exc:
        raise fail(str(exc)) from None


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path,
        typer.Option(
            envvar="FRESHREC_DATA_DIR", help="Folder of the embedded stack (SQLite, models, NATS, logs)."
        ),
    ] = Path("var"),
    ingestion: Annotated[
        str | None,
        typer.Option(
            envvar="FRESHREC_INGESTION_ADDR", help="host:port of ingestion (comma-separated replicas)."
        ),
    ] = None,
    feature: Annotated[
        str | None, typer.Option(envvar="FRESHREC_FEATURE_ADDR", help="host:port of feature.")
    ] = None,
    trainer: Annotated[
        str | None, typer.Option(envvar="FRESHREC_TRAINER_ADDR", help="host:port of trainer.")
    ] = None,
    inference: Annotated[
        str | None,
        typer.Option(
            envvar="FRESHREC_INFERENCE_ADDR", help="host:port of inference (comma-separated replicas)."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="FRESHREC_CLIENT_TOKEN", help="Bearer token, when the services require one."),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(envvar="FRESHREC_CLIENT_CA_FILE", help="CA (PEM) that signed the services' TLS."),
    ] = None,
    cert_file: Annotated[
        Path | None,
        typer.Option(envvar="FRESHREC_CLIENT_CERT_FILE", help="Client certificate (PEM), for mutual TLS."),
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(envvar="FRESHREC_CLIENT_KEY_FILE", help="Client key (PEM), for mutual TLS.")
    ] = None,
) -> None:
    try:
        peer = PeerSettings(
            token=SecretStr(token) if token else None,
            tls=TlsSettings(ca_file=ca_file, cert_file=cert_file, key_file=key_file),
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    ctx.obj = Options(
        data_dir,
        {"ingestion": ingestion, "feature": feature, "trainer": trainer, "inference": inference},
        peer,
    )


# -- up ---------------------------------------------------------------------------------------------


def start_stack(
    data_dir: Path,
    *,
    ports: dict[str, int],
    replicas: dict[str, int],
    extra_env: dict[str, dict[str, str]],
    logs_to_console: bool = False,
) -> Stack:
    running = read_state(data_dir)
    if running is not None:
        raise fail(
            f"freshrec is already up in {data_dir} (process {running['pid']}): "
            "see `freshrec status`, stop it with Ctrl-C, or use another --data-dir"
        )
    stack = Stack(
        data_dir,
        ports=ports,
        replicas=replicas,
        extra_env=extra_env,
        log_dir=None if logs_to_console else data_dir / "logs",
    )
    with console.status(f"starting freshrec under {stack.data_dir} ..."):
        try:
            stack.start()
        except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
            hint = f"; see the logs in {stack.log_dir}" if stack.log_dir else ""
            raise fail(f"{exc}{hint}") from None
    stack.write_state()
    return stack


@app.command()
def up(
    ctx: typer.Context,
    ingestion_replicas: Annotated[
        int, typer.Option(min=1, max=8, help="Ingestion processes (share the event log).")
    ] = 1,
    inference_replicas: Annotated[
        int, typer.Option(min=1, max=8, help="Inference processes (each hot-swaps every model).")
    ] = 1,
    feature_replicas: Annotated[
        int,
        typer.Option(
            min=1, max=8, help="Feature processes (each owns a share of the users); see `freshrec scale`."
        ),
    ] = 1,
    free_ports: Annotated[
        bool, typer.Option(help="Pick free ports instead of 4222 and 50051-50054.")
    ] = False,
    earliest_event_time: Annotated[
        str | None,
        typer.Option(
            help="Oldest occurred_at ingestion accepts (ISO date); lower it to backfill old history."
        ),
    ] = None,
    logs_to_console: Annotated[
        bool, typer.Option(help="Print the services' logs here instead of into <data-dir>/logs.")
    ] = False,
    hosts: Annotated[
        bool,
        typer.Option(
            "--hosts",
            help="Three hosts on this machine (network namespaces on one bridge; needs root), each a "
            "node of a NATS JetStream cluster, with the services spread over them as docker-compose.yml "
            "does: any one host can be lost. Replica and port options do not apply.",
        ),
    ] = False,
) -> None:
    """Start the embedded stack: a private nats-server, SQLite, the model store and the four services."""
    options: Options = ctx.obj
    ports = {name: 0 for name in DEFAULT_PORTS} if free_ports else dict(DEFAULT_PORTS)
    extra: dict[str, dict[str, str]] = {}
    if earliest_event_time:
        extra["ingestion"] = {EARLIEST_EVENT_TIME_ENV: earliest_event_time}
    if hosts:
        return _up_on_hosts(options, extra)
    stack = start_stack(
        options.data_dir,
        ports=ports,
        replicas={
            "ingestion": ingestion_replicas,
            "feature": feature_replicas,
            "inference": inference_replicas,
        },
        extra_env=extra,
        logs_to_console=logs_to_console,
    )
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        from cli.status import stack_status

        statuses = asyncio.run(stack_status(resolve(options.data_dir, peer=options.peer)))
        console.print(render.status_table(statuses, title="freshrec is up"))
        console.print(f"NATS {stack.nats.url}; data in {stack.data_dir}", highlight=False)
        if stack.log_dir:
            console.print(f"logs in {stack.log_dir}", highlight=False)
        console.print("Try [bold]freshrec demo[/] in another shell. Press Ctrl-C to stop.\n")
        handover: Handover | None = None
        while not stop:
            for name in stack.supervise_once():
                errors.print(f"[yellow]{name} exited; restarted it[/]")
            handover = _scale_step(stack, handover)
            time.sleep(0.5)
    except RuntimeError as exc:
        stack.stop()
        stack.remove_state()
        raise fail(str(exc)) from None
    console.print("stopping freshrec ...")
    stack.stop()
    stack.remove_state()
    console.print("stopped.")


def _up_on_hosts(options: Options, extra: dict[str, dict[str, str]]) -> None:
    """`freshrec up --hosts`: the topology of docker-compose.yml on network namespaces, supervised
    until Ctrl-C, then every process killed and every namespace, link and bridge removed."""
    import os
    import shutil
    import subprocess

    from cli.hosts import PLACEMENT, Hosts, describe, start_freshrec
    from cli.stack import remove_state, write_state
    from cli.status import stack_status

    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise fail("--hosts makes network namespaces: run it as root, on Linux with iproute2 (`ip`)")
    data_dir = options.data_dir.resolve()
    running = read_state(data_dir)
    if running is not None:
        raise fail(f"freshrec is already up in {data_dir} (process {running['pid']}); use another --data-dir")
    work = data_dir / "hosts"
    work.mkdir(parents=True, exist_ok=True)
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    topology = Hosts(list(PLACEMENT), work)
    try:
        with console.status(f"making hosts {', '.join(PLACEMENT)} and starting freshrec on them ..."):
            try:
                topology.open()
                topology.start_nats()
                placed = start_freshrec(topology, work, env=extra)
            except (subprocess.CalledProcessError, RuntimeError, TimeoutError) as exc:
                detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
                raise fail(f"{detail}; see the logs in {work / 'logs'}") from None
        write_state(data_dir, describe(topology, placed))
        statuses = asyncio.run(stack_status(resolve(data_dir, peer=options.peer)))
        console.print(render.status_table(statuses, title="freshrec is up on three hosts"))
        for host in topology.hosts.values():
            names = ["NATS", *(p.name for p in placed.values() if p.host == host.name)]
            console.print(f"host {host.name} ({host.address}, netns {host.namespace}): {', '.join(names)}")
        console.print(f"NATS {topology.nats_urls()}; data and logs in {work}", highlight=False)
        console.print("Press Ctrl-C to stop (everything on the hosts stops, the hosts are removed).\n")
        while not stop:
            for name in topology.supervise_once():
                errors.print(f"[yellow]{name} exited; restarted it[/]")
            if take_request(data_dir) is not None:
                errors.print("[yellow]`freshrec scale` applies to a single-host `freshrec up`; ignored[/]")
            time.sleep(0.5)
    finally:
        console.print("stopping freshrec and removing the hosts ...")
        topology.close()
        remove_state(data_dir)
    console.print("stopped.")


def _scale_step(stack: Stack, handover: Handover | None) -> Handover | None:
    """Takes a `freshrec scale` request or carries the current one a step further; the state file
    tells the verb how far it got."""
    request = take_request(stack.data_dir)
    if request is not None:
        if handover is not None and not handover.progress.finished:
            refused = Handover(stack, {**request, "service": None})
            busy = handover.progress
            refused.progress.detail = f"still scaling {busy.service} to {busy.replicas}; try again when done"
            stack.write_state(scaling=refused.as_state())
            return handover
        handover = Handover(stack, request)
        console.print(
            f"scaling: {handover.progress.service} to {handover.progress.replicas}", highlight=False
        )
    elif handover is None or handover.progress.finished:
        return handover
    handover.step()
    stack.write_state(scaling=handover.as_state())
    if handover.progress.finished:
        colour = "green" if handover.progress.phase == "done" else "red"
        console.print(
            f"[{colour}]scaling {handover.progress.phase}:[/] {handover.progress.detail}", highlight=False
        )
    return handover


@app.command()
def scale(
    ctx: typer.Context,
    service: Annotated[ScalableService, typer.Argument(help="The service to scale.")],
    replicas: Annotated[
        int, typer.Argument(min=1, max=MAX_REPLICAS, help="How many replicas it should run.")
    ],
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds the new replicas get to catch up before it gives up.")
    ] = 600.0,
) -> None:
    """Change how many replicas of a service the running `freshrec up` runs, without a restart.

    Feature replicas split the users between them: the new layout starts beside the old one, reads
    the event stream into state of its own, takes the lookups over once caught up, then the old
    replicas stop, so no lookup fails on the way. If a new replica fails or the timeout passes, the
    old layout keeps serving and this exits 1. Ingestion and inference replicas are added or stopped.
    """
    options: Options = ctx.obj
    state = read_state(options.data_dir)
    if state is None:
        raise fail(
            f"freshrec is not up in {options.data_dir}: `freshrec scale` changes a stack that `freshrec up` "
            "runs (elsewhere, change the replicas as docs/operations.md shows)"
        )
    if "hosts" in state:
        raise fail("`freshrec scale` changes a single-host `freshrec up`; this one runs with --hosts")
    request_id = request(options.data_dir, service.value, replicas, timeout)
    shown = ""
    deadline = time.monotonic() + timeout + 120
    while time.monotonic() < deadline:
        state = read_state(options.data_dir)
        if state is None:
            raise fail("freshrec up stopped before the scaling was done")
        progress = progress_of(state, request_id)
        if progress is not None and progress.detail != shown:
            shown = progress.detail
            console.print(f"{progress.phase}: {progress.detail}", highlight=False)
        if progress is not None and progress.finished:
            if progress.phase != "done":
                raise typer.Exit(1)
            return
        time.sleep(0.5)
    raise fail(f"freshrec up did not finish scaling within {timeout + 120:.0f}s; see its output")


# -- status -----------------------------------------------------------------------------------------


@app.command()
def status(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Health and state of every service replica: served model, trainer progress, watermarks."""
    from cli.status import as_json, stack_status

    endpoints = ctx.obj.endpoints()
    statuses = run(stack_status(endpoints))
    if json_output:
        print(as_json(statuses))
    else:
        console.print(render.status_table(statuses, title=f"freshrec ({endpoints.source})"))
    if not all(s.ok for s in statuses):
        down = ", ".join(f"{s.service} at {s.address}" for s in statuses if not s.ok)
        raise fail(f"not serving: {down}. Is the stack up? run `freshrec up`")


# -- recommend --------------------------------------------------------------------------------------


@app.command()
def recommend(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="The user to recommend for.")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="How many items.")] = 10,
    include_seen: Annotated[bool, typer.Option(help="Allow items the user already interacted with.")] = False,
    exclude: Annotated[list[str] | None, typer.Option(help="An item never to return (repeatable).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Ask inference for a user's top-k items, with the model version and how fresh it is."""
    from google.protobuf.json_format import MessageToJson

    from freshrec.v1 import feature_pb2, feature_pb2_grpc, inference_pb2, inference_pb2_grpc

    endpoints = ctx.obj.endpoints()
    address = endpoints.first("inference")

    async def ask() -> tuple[Any, dict[str, str]]:
        request = inference_pb2.RecommendRequest(
            user_id=user, k=k, include_seen=include_seen, exclude_item_ids=exclude or []
        )
        async with endpoints.channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            response = await call("inference", address, stub.Recommend(request, timeout=10))
        titles: dict[str, str] = {}
        feature_address = endpoints.first("feature")
        try:  # titles are a nicety: a missing feature service must not hide the answer
            async with endpoints.channel(feature_address) as channel:
                items = await feature_pb2_grpc.FeatureServiceStub(channel).GetItems(
                    feature_pb2.GetItemsRequest(item_ids=[i.item_id for i in response.items]), timeout=3
                )
            titles = {i.item_id: i.title for i in items.items}
        except grpc.RpcError:
            pass
        return response, titles

    response, titles = run(ask())
    if json_output:
        print(MessageToJson(response, preserving_proto_field_name=True))
        return
    console.print(render.recommendations_table(user, response, titles))


# -- forget -----------------------------------------------------------------------------------------


@app.command()
def forget(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="The user to erase from every service.")],
    wait: Annotated[bool, typer.Option(help="Show progress until every service is done.")] = True,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for every service.")] = 300.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the final status as JSON.")] = False,
) -> None:
    """Erase a user everywhere (event log, streams, features, trainer, models, caches) and show
    each service's progress until the request is done. Exits 1 if it is not done in time."""
    from google.protobuf.json_format import MessageToJson

    from freshrec.v1 import ingestion_pb2, ingestion_pb2_grpc

    endpoints = ctx.obj.endpoints()
    address = endpoints.first("ingestion")

    async def ask() -> Any:
        async with endpoints.channel(address) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            answer = await call(
                "ingestion",
                address,
                stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id=user), timeout=10),
            )
            if not json_output:
                console.print(f"forget request [bold]{answer.request_id}[/bold] recorded")
            request = ingestion_pb2.GetForgetStatusRequest(request_id=answer.request_id)
            deadline = time.monotonic() + timeout
            shown = ""
            while True:
                state = await call("ingestion", address, stub.GetForgetStatus(request, timeout=10))
                line = render.forget_progress(state)
                if line != shown and not json_output:
                    console.print(line)
                    shown = line
                if state.done or not wait or time.monotonic() > deadline:
                    return state
                await asyncio.sleep(0.5)

    state = run(ask())
    if json_output:
        print(MessageToJson(state, preserving_proto_field_name=True))
    if wait and not state.done:
        raise fail(
            f"forget request {state.request_id} is not done after {timeout:.0f}s; see freshrec forget --help"
        )
    if state.done and not json_output:
        took = state.completed_at.ToMicroseconds() - state.requested_at.ToMicroseconds()
        console.print(f"done in {took / 1e6:.1f}s")


# -- models -----------------------------------------------------------------------------------------


async def _trainer_call(endpoints: Endpoints, method: str, request: Any) -> Any:
    from freshrec.v1 import trainer_pb2_grpc

    address = endpoints.first("trainer")
    async with endpoints.channel(address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        return await call("trainer", address, getattr(stub, method)(request, timeout=30))


async def _wait_served(endpoints: Endpoints, version: str, timeout_s: float) -> dict[str, str]:
    """Polls every inference replica until each serves ``version``; returns what each serves."""
    from freshrec.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout_s
    served: dict[str, str] = {}
    while True:
        for address in endpoints.services["inference"]:
            async with endpoints.channel(address) as channel:
                info = await call(
                    "inference",
                    address,
                    inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
                        inference_pb2.GetModelInfoRequest(), timeout=5
                    ),
                )
            served[address] = info.model_version
        if all(v == version for v in served.values()) or time.monotonic() > deadline:
            return served
        await asyncio.sleep(0.2)


def _report_switch(endpoints: Endpoints, verb: str, response: Any, wait: bool, timeout_s: float) -> None:
    version = response.model.version
    console.print(f"{verb} [bold]{version}[/] (was {response.previous_version or 'none'})")
    if not wait:
        return
    served = run(_wait_served(endpoints, version, timeout_s))
    for address, serving in served.items():
        mark = (
            "[green]serving it[/]" if serving == version else f"[red]still serving {serving or 'nothing'}[/]"
        )
        console.print(f"  inference {address}: {mark}")
    if any(v != version for v in served.values()):
        raise fail(f"not every inference replica serves {version} after {timeout_s:.0f}s; see their logs")


@models_app.command("list")
def models_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=0, help="Newest N versions (0: all).")] = 20,
) -> None:
    """List registered model versions, newest first, with status, parent, metrics and watermark."""
    from freshrec.v1 import trainer_pb2

    response = run(
        _trainer_call(ctx.obj.endpoints(), "ListModels", trainer_pb2.ListModelsRequest(limit=limit))
    )
    if not response.models:
        console.print("no model versions yet: the trainer exports one once it has learned from some events")
        return
    console.print(render.models_table(response))


@models_app.command("promote")
def models_promote(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="The version to make live, e.g. v000007.")],
    wait: Annotated[bool, typer.Option(help="Wait until every inference replica serves it.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the replicas.")] = 30.0,
) -> None:
    """Make a stored version live on every inference replica."""
    from freshrec.v1 import trainer_pb2

    endpoints = ctx.obj.endpoints()
    response = run(_trainer_call(endpoints, "PromoteModel", trainer_pb2.PromoteModelRequest(version=version)))
    _report_switch(endpoints, "promoted", response, wait, timeout)


@models_app.command("rollback")
def models_rollback(
    ctx: typer.Context,
    to: Annotated[
        str, typer.Option(help="The version to return to (default: the live version's parent).")
    ] = "",
    wait: Annotated[bool, typer.Option(help="Wait until every inference replica serves it.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the replicas.")] = 30.0,
) -> None:
    """Return to the live version's parent (or a named version) on every inference replica."""
    from freshrec.v1 import trainer_pb2

    endpoints = ctx.obj.endpoints()
    response = run(_trainer_call(endpoints, "RollbackModel", trainer_pb2.RollbackModelRequest(version=to)))
    _report_switch(endpoints, "rolled back to", response, wait, timeout)


# -- items ------------------------------------------------------------------------------------------

ItemIds = Annotated[list[str], typer.Argument(help="Catalogue item ids.", show_default=False)]


def _report_items(verb: str, outcome: Any, already: str) -> None:
    """One line per kind of outcome; exit status 1 if the feature service refused any."""
    if outcome.changed:
        console.print(f"{verb} {len(outcome.changed)}: {', '.join(outcome.changed)}", highlight=False)
    if outcome.unchanged:
        console.print(f"{already} {', '.join(outcome.unchanged)}", highlight=False)
    if outcome.missing:
        console.print(f"not in the catalogue: {', '.join(outcome.missing)}", highlight=False)
    for item_id, reason in outcome.rejected:
        errors.print(f"[bold red]refused[/] {item_id}: {reason}", highlight=False)
    if outcome.rejected:
        raise typer.Exit(1)


@items_app.command("hide")
def items_hide(ctx: typer.Context, item_ids: ItemIds) -> None:
    """Keep items out of every answer on every inference replica, within about a second.

    Recommend, ScoreItems, SimilarItems and the popular lists leave them out; they stay in the
    catalogue and the model, and `freshrec items unhide` brings them back.
    """
    from cli import catalogue

    outcome = run(catalogue.set_hidden(ctx.obj.endpoints(), item_ids, True))
    _report_items("hidden", outcome, "already hidden:")


@items_app.command("unhide")
def items_unhide(ctx: typer.Context, item_ids: ItemIds) -> None:
    """Serve hidden items again (within about a second, on every inference replica)."""
    from cli import catalogue

    outcome = run(catalogue.set_hidden(ctx.obj.endpoints(), item_ids, False))
    _report_items("unhidden", outcome, "not hidden:")


@items_app.command("delete")
def items_delete(ctx: typer.Context, item_ids: ItemIds) -> None:
    """Delete items for good: from the catalogue, every answer, and the model's next export.

    The catalogue entry, popularity and item features go at once; every inference replica stops
    serving them within about a second; the trainer's next export has no row for them.
    """
    from cli import catalogue

    outcome = run(catalogue.delete(ctx.obj.endpoints(), item_ids))
    _report_items("deleted", outcome, "")


# -- replay -----------------------------------------------------------------------------------------


class ReplayFormat(StrEnum):
    movielens = "movielens"


class Timestamps(StrEnum):
    keep = "keep"
    shift = "shift"


@app.command()
def replay(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="A rating file: ML-100K u.data, ML-1M ratings.dat or a ratings.csv.")
    ],
    format: Annotated[
        ReplayFormat, typer.Option("--format", help="Layout of the file.")
    ] = ReplayFormat.movielens,
    rate: Annotated[
        float, typer.Option(min=0, help="Events per second (0: as fast as ingestion answers).")
    ] = 0.0,
    timestamps: Annotated[
        Timestamps,
        typer.Option(help="keep: the file's times (a backfill); shift: move them so the last event is now."),
    ] = Timestamps.shift,
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="Events per IngestEvents call.")] = 500,
    in_flight: Annotated[
        int, typer.Option(min=1, max=64, help="Calls in flight (1 keeps strict time order).")
    ] = 1,
    limit: Annotated[
        int, typer.Option(min=0, help="Replay only the first N events in time order (0: all).")
    ] = 0,
    prefix: Annotated[
        str, typer.Option(help="Prefix for user, item and event ids (keeps datasets apart).")
    ] = "",
) -> None:
    """Stream a MovieLens-style file through ingestion in time order, with a progress bar and a summary."""
    from cli.movielens import FormatError, read_ratings, to_event
    from cli.replay import stream_events

    try:
        ratings = read_ratings(path)
    except FormatError as exc:
        raise fail(str(exc)) from None
    if limit:
        ratings = ratings[:limit]
    if not ratings:
        raise fail(f"{path} holds no ratings")
    shift = time.time() - ratings[-1].timestamp if timestamps is Timestamps.shift else 0.0
    events = [to_event(r, shift, prefix) for r in ratings]
    endpoints = ctx.obj.endpoints()
    addresses = endpoints.services["ingestion"]
    _require_serving("ingestion", addresses, endpoints.peer)
    first, last = ratings[0].timestamp + shift, ratings[-1].timestamp + shift
    console.print(
        f"replaying {len(events):,} ratings of {len({r.user for r in ratings}):,} users on "
        f"{len({r.item for r in ratings}):,} items, {render.when(first)} to {render.when(last)} "
        f"({timestamps.value}), into {', '.join(addresses)}",
        highlight=False,
    )
    progress = Progress(
        TextColumn("[bold]replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    started = time.monotonic()
    with progress:
        task = progress.add_task("replay", total=len(events), speed="")

        def advance(n: int) -> None:
            done = progress.tasks[0].completed + n
            speed = done / max(time.monotonic() - started, 1e-6)
            progress.update(task, advance=n, speed=f"{speed:,.0f} events/s")

        summary = run(
            stream_events(
                events,
                addresses,
                rate=rate,
                batch=batch,
                in_flight=in_flight,
                on_progress=advance,
                peer=endpoints.peer,
            )
        )
    console.print(render.replay_summary(summary))
    too_old = [
        r
        for r in summary.reasons
        if "earliest" in r.lower() or "too old" in r.lower() or "before" in r.lower()
    ]
    if too_old and timestamps is Timestamps.keep:
        errors.print(
            "[yellow]hint:[/] ingestion refused events older than its earliest accepted time: start "
            f"the stack with `freshrec up --earliest-event-time {render.date(first)}` "
            "or replay with `--timestamps shift`",
            highlight=False,
        )
    if summary.rejected and not summary.accepted and not summary.duplicates:
        raise typer.Exit(1)


# -- demo -------------------------------------------------------------------------------------------


def _require_serving(service: str, addresses: list[str], peer: PeerSettings) -> None:
    """Fails early, with the next step, when a service the verb needs is not serving."""
    from cli.status import instance_status

    async def check() -> list[Any]:
        return list(await asyncio.gather(*(instance_status(service, a, 2.0, peer) for a in addresses)))

    for status in asyncio.run(check()):
        if not status.ok:
            raise fail(
                f"cannot reach {service} at {status.address} ({status.health}): is the stack up? "
                f"run `freshrec up` (or point to it with --{service} HOST:PORT)"
            )


def _reachable(endpoints: Endpoints) -> bool:
    from cli.status import instance_status

    async def check() -> bool:
        results = await asyncio.gather(
            *(instance_status(s, endpoints.first(s), 1.0, endpoints.peer) for s in SERVICES)
        )
        return all(r.ok for r in results)

    return asyncio.run(check())


@app.command()
def demo(
    ctx: typer.Context,
    duration: Annotated[float, typer.Option(min=0, help="Seconds to run (0: until Ctrl-C).")] = 0.0,
    rate: Annotated[float, typer.Option(min=1, help="Synthetic events per second.")] = 200.0,
    drift_every: Annotated[
        float, typer.Option(min=0, help="Seconds between taste drifts (0: never).")
    ] = 60.0,
    users: Annotated[int, typer.Option(min=1, help="Synthetic users.")] = 300,
    items: Annotated[int, typer.Option(min=2, help="Synthetic catalogue size.")] = 400,
    groups: Annotated[int, typer.Option(min=1, help="Taste groups.")] = 4,
    categories: Annotated[
        int, typer.Option(min=1, help="Item categories (at least the number of groups).")
    ] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic world.")] = 0,
    plain: Annotated[bool, typer.Option(help="One line per second instead of a live table.")] = False,
) -> None:
    """Stream synthetic users whose tastes drift and watch freshrec follow them (starts it if needed)."""
    from cli.demo import Demo
    from cli.synthetic import SyntheticWorld

    options: Options = ctx.obj
    try:
        world = SyntheticWorld(users=users, items=items, groups=groups, categories=categories, seed=seed)
    except ValueError as exc:
        raise fail(str(exc)) from None
    endpoints = options.endpoints()
    stack: Stack | None = None
    if not _reachable(endpoints):
        console.print("freshrec is not running here: starting an embedded stack for the demo")
        stack = start_stack(
            options.data_dir,
            ports={name: 0 for name in DEFAULT_PORTS},
            replicas={},
            extra_env={"trainer": DEMO_TRAINER_ENV},
        )
        endpoints = resolve(options.data_dir, peer=options.peer)
    view = render.PlainDemoView(console) if plain or not console.is_terminal else render.LiveDemoView(console)
    runner = Demo(endpoints, world, rate=rate, drift_every_s=drift_every)
    interrupted = False
    try:
        with view:
            try:
                result = run(runner.run(duration, view))
            except KeyboardInterrupt:
                interrupted = True
                result = runner.result
    finally:
        if stack is not None:
            console.print("stopping the demo's stack ...")
            stack.stop()
            stack.remove_state()
    console.print(render.demo_summary(result, world, interrupted))


# -- db ---------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    services: Annotated[
        list[str] | None, typer.Argument(help="Services to upgrade (default: every one with tables).")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            envvar="FRESHREC_DATABASE__URL",
            help="SQLAlchemy URL (default: the embedded stack's SQLite file).",
        ),
    ] = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Bring services' tables to a revision (services also do this themselves at start)."""
    from cli import db

    for service in services or db.migrated_services():
        target = url or str(db_file(ctx.obj.data_dir, service))
        try:
            db.upgrade(service, target, revision)
            console.print(f"{service}: at {db.current(service, target) or 'base'}")
        except KeyError as exc:
            raise fail(str(exc.args[0])) from None


@db_app.command("downgrade")
def db_downgrade(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service whose tables to step back.")],
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")],
    url: Annotated[str | None, typer.Option(envvar="FRESHREC_DATABASE__URL", help="SQLAlchemy URL.")] = None,
) -> None:
    """Step a service's tables back to an older revision (take a backup first)."""
    from cli import db

    target = url or str(db_file(ctx.obj.data_dir, service))
    try:
        db.downgrade(service, target, revision)
    except KeyError as exc:
        raise fail(str(exc.args[0])) from None
    console.print(f"{service}: at {db.current(service, target) or 'base'}")


@db_app.command("current")
def db_current(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(envvar="FRESHREC_DATABASE__URL", help="SQLAlchemy URL.")] = None,
) -> None:
    """Show each service's schema revision and the newest one available."""
    from cli import db

    table = Table("service", "database", "revision", "newest")
    for service in db.migrated_services():
        target = url or str(db_file(ctx.obj.data_dir, service))
        table.add_row(
            service, render.hide_password(target), db.current(service, target) or "(none)", db.head(service)
        )
    console.print(table)


def db_file(data_dir: Path, service: str) -> str:
    """The SQLite URL the embedded stack gives a service."""
    return f"sqlite:///{Path(data_dir).resolve() / (service + '.db')}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``freshrec`` console script and ``python -m cli``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, prog_name="freshrec", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
