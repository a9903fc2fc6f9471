"""SGLang's own init body carrying weightsync's InitInfo, both ways (no PyTorch, no SGLang): the
trainer (weightsync_sglang.trainer) and the coordinator (weightsync_operator.client) build it, each
SGLang worker (weightsync_sglang.worker) parses it back.

    POST /init_weights_update_group
    {"master_address", "master_port", "rank_offset", "world_size",   SGLang's fields
     "backend": "weightsync",                                       selects the plugin
     "group_name": "{...the rest of InitInfo as JSON...}"}          or a plain name: every default
"""

from __future__ import annotations

import json
from typing import Any

from weightsync.protocol import InitInfo, parse

BACKEND_NAME = "weightsync"  # the `backend` of /init_weights_update_group that selects weightsync
# InitInfo's fields that SGLang's init body carries itself; the others travel in its group_name.
SGLANG_FIELDS = frozenset({"master_address", "master_port", "rank_offset", "world_size"})


def init_body(init: InitInfo, rank_offset: int) -> dict[str, Any]:
    """SGLang's `/init_weights_update_group` body for a weightsync group whose first SGLang
    worker is rank `rank_offset`."""
    options = init.model_dump(mode="json", exclude=set(SGLANG_FIELDS), exclude_defaults=True)
    options["group_name"] = init.group_name
    return {"master_address": init.master_address, "master_port": init.master_port, "rank_offset": rank_offset,
            "world_size": init.world_size, "backend": BACKEND_NAME,
            "group_name": json.dumps(options, separators=(",", ":"))}


def init_info_of(master_address: str, master_port: int, rank_offset: int, world_size: int,
                 group_name: str) -> InitInfo:
    """weightsync's InitInfo from SGLang's init body: SGLang's own fields, and in `group_name`
    the rest of InitInfo as a JSON object (a plain name: every default, that name)."""
    options: Any = {"group_name": group_name}
    if group_name.lstrip().startswith("{"):
        try:
            options = json.loads(group_name)
        except ValueError as error:
            raise ValueError(f"group_name: a weightsync group's options are a JSON object ({error})") from None
    body = {**options, "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size}
    return parse(InitInfo, body, "init_info")
