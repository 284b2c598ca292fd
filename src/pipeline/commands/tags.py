"""``pipeline tags``: the tag plan for the current context."""

from __future__ import annotations

from pipeline.cli import print_json
from pipeline.log import log
from pipeline.runtime import Runtime


def run(rt: Runtime) -> None:
    """Print the tag plan (``--json`` for machines)."""
    plan = rt.plan
    data = {
        "trigger": plan.trigger.value,
        "ref_name": plan.ref_name,
        "commit_sha": rt.context.sha,
        "image_tag": plan.image_tag,
        "immutable_tags": list(plan.immutable_tags),
        "moving_tags": list(plan.moving_tags),
        "push_repository": plan.push_repository,
        "pull_repository": plan.pull_repository,
        "push_refs": [plan.push_ref(tag) for tag in plan.immutable_tags],
    }
    if rt.options.get("json"):
        print_json(data)
        return
    rows = [
        ("trigger", f"{plan.trigger.value} ({plan.ref_name} at {rt.context.short_sha})"),
        ("IMAGE_TAG", plan.image_tag),
        ("immutable tags", " ".join(plan.immutable_tags)),
        ("moving tags", " ".join(plan.moving_tags) or "(none)"),
        ("push repository", plan.push_repository),
        ("pull repository", plan.pull_repository),
    ]
    for key, value in rows:
        log.data(f"{key:<16} {value}")
