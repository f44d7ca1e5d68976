"""Makes AWS Lambda API calls through boto3, as any AWS SDK user would, and prints what each
returned.

Usage: boto3_calls.py --endpoint URL --calls JSON [--parallel]

JSON is a list of {"op": <boto3 method name>, "args": {...}}; a `Payload` string is
sent as bytes. Prints a JSON list with one entry per call, in the order given: the response
(with `Payload` read and parsed as JSON when it is JSON, and `LogResult` decoded), or, when the
call raised, {"exception": <error code>, "message": ..., "error": <the error response>}.
With --parallel every call starts at once, each in its own thread.
"""

import argparse
import base64
import json
import sys
import threading

import boto3
import botocore.config
import botocore.exceptions


def call(client, op, args):
    if isinstance(args.get("Payload"), str):
        args = dict(args, Payload=args["Payload"].encode())
    try:
        response = getattr(client, op)(**args)
    except botocore.exceptions.ClientError as error:
        details = {k: v for k, v in error.response.items() if k != "ResponseMetadata"}
        return {
            "exception": error.response["Error"]["Code"],
            "message": str(error),
            "error": details,
        }
    out = dict(response)
    if "Payload" in out:
        body = out["Payload"].read()
        try:
            out["Payload"] = json.loads(body) if body else None
        except ValueError:
            out["Payload"] = body.decode("utf-8", "replace")
    if out.get("LogResult"):
        out["LogResult"] = base64.b64decode(out["LogResult"]).decode("utf-8", "replace")
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--calls", required=True)
    parser.add_argument("--parallel", action="store_true")
    args = parser.parse_args()
    calls = json.loads(args.calls)

    client = boto3.client(
        "lambda",
        endpoint_url=args.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(
            # One attempt: a throttle must reach the test, not be retried away.
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=max(10, len(calls)),
        ),
    )
    results = [None] * len(calls)

    def run(i):
        results[i] = call(client, calls[i]["op"], calls[i].get("args", {}))

    if args.parallel:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(calls)):
            run(i)
    json.dump(results, sys.stdout, default=str)


if __name__ == "__main__":
    main()
