"""Test function that cannot be imported: its init fails before any invocation."""

import does_not_exist_module  # noqa: F401


def handler(event, context):
    return event
