"""Operating the item catalogue from the command line: ``freshrec items hide|unhide|delete``.

Hiding and unhiding read each entry (``GetItems``) and store it again with ``hidden`` changed
(``UpsertItems``), so the rest of the entry is kept; a concurrent upsert of the same item may win.
Deleting calls ``DeleteItems``. Either way every inference replica stops (or resumes) serving the
items within about a second, before any new model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cli.clients import Endpoints, call

#: Ids per call, within the services' default FRESHREC_LIMITS__MAX_IDS_PER_REQUEST.
BATCH = 500


@dataclass
class Outcome:
    """What a verb did: the ids it changed, those already so, those not in the catalogue, and
    those the feature service refused (with its reason)."""

    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


async def set_hidden(endpoints: Endpoints, item_ids: list[str], hidden: bool) -> Outcome:
    from freshrec.v1 import feature_pb2, feature_pb2_grpc

    address = endpoints.first("feature")
    outcome = Outcome()
    async with endpoints.channel(address) as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        for start in range(0, len(item_ids), BATCH):
            chunk = list(dict.fromkeys(item_ids[start : start + BATCH]))
            found = await call(
                "feature", address, stub.GetItems(feature_pb2.GetItemsRequest(item_ids=chunk), timeout=30)
            )
            outcome.missing.extend(found.missing_item_ids)
            outcome.unchanged.extend(i.item_id for i in found.items if i.hidden == hidden)
            items = [item for item in found.items if item.hidden != hidden]
            if not items:
                continue
            for item in items:
                item.hidden = hidden
            request = feature_pb2.UpsertItemsRequest(items=items)
            response = await call("feature", address, stub.UpsertItems(request, timeout=30))
            refused = {items[e.index].item_id: e.reason for e in response.errors}
            outcome.rejected.extend(refused.items())
            outcome.changed.extend(i.item_id for i in items if i.item_id not in refused)
    return outcome


async def delete(endpoints: Endpoints, item_ids: list[str]) -> Outcome:
    from freshrec.v1 import feature_pb2, feature_pb2_grpc

    address = endpoints.first("feature")
    outcome = Outcome()
    async with endpoints.channel(address) as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        for start in range(0, len(item_ids), BATCH):
            chunk = list(dict.fromkeys(item_ids[start : start + BATCH]))
            response = await call(
                "feature",
                address,
                stub.DeleteItems(feature_pb2.DeleteItemsRequest(item_ids=chunk), timeout=30),
            )
            missing = set(response.missing_item_ids)
            outcome.missing.extend(response.missing_item_ids)
            outcome.changed.extend(i for i in chunk if i not in missing)
    return outcome
