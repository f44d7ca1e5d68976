"""Invokes a function through boto3, as any AWS SDK user would, and prints what came back.

Usage: boto3_invoke.py --endpoint URL --function NAME [--payload JSON] [--tail]

Prints one JSON object: on success {"status", "executed_version", "function_error",
"payload", "log"}; when the call raises, {"exception": <error code>, "message"}.
"""

import argparse
import base64
import json
import sys

import boto3
import botocore.config
import botocore.exceptions


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--function", required=True)
    parser.add_argument("--payload", default="{}")
    parser.add_argument("--tail", action="store_true")
    args = parser.parse_args()

    client = boto3.client(
        "lambda",
        endpoint_url=args.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )
    request = {"FunctionName": args.function, "Payload": args.payload.encode()}
    if args.tail:
        request["LogType"] = "Tail"
    try:
        response = client.invoke(**request)
    except botocore.exceptions.ClientError as error:
        out = {"exception": error.response["Error"]["Code"], "message": str(error)}
    else:
        body = response["Payload"].read()
        log = response.get("LogResult")
        out = {
            "status": response["StatusCode"],
            "executed_version": response.get("ExecutedVersion"),
            "function_error": response.get("FunctionError"),
            "payload": json.loads(body) if body else None,
            "log": base64.b64decode(log).decode("utf-8", "replace") if log else None,
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
