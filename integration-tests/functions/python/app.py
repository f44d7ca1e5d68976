"""Test function for awslambdaric: reports the invocation context it was given."""


def handler(event, context):
    if isinstance(event, dict) and "raise" in event:
        raise ValueError(event["raise"])
    client_context = context.client_context
    return {
        "request_id": context.aws_request_id,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "invoked_function_arn": context.invoked_function_arn,
        "client_context": getattr(client_context, "custom", None) if client_context else None,
        "event": event,
    }
