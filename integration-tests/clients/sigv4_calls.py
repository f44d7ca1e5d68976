"""Calls Sluice's Lambda API signed by botocore (boto3's signer) in the ways a client can get a
signature right or wrong, and prints what each call got back.

Usage: sigv4_calls.py --endpoint URL --calls JSON

JSON is a list of calls, each {"key": ACCESS_KEY_ID, "secret": SECRET, "op": <boto3 method>,
"args": {...}} with an optional "how":
  - absent: the boto3 client, as any SDK user calls;
  - "skew": like absent, signed with a clock `skew` seconds off (negative: in the past);
  - "tamper": POST args["path"] with args["body"] signed, then args["sent"] sent instead
    (the same body: a signed request to any path, a webhook's say);
  - "plain": POST args["body"] to args["path"] unsigned;
  - "presign": botocore's generate_presigned_url for op/args, then a plain GET of that URL;
  - "presign_post": a presigned (query-string) POST to args["path"] (botocore moves a body's
    fields into the query, so the request is sent as botocore prepared it).
Prints a JSON list, one entry per call: a boto3 response (Payload parsed), or
{"exception": code, "message": ...} when boto3 raised, or {"status", "errortype", "body"} for
the hand-sent requests.
"""

import argparse
import datetime
import json
import sys
import urllib.error
import urllib.request
from unittest import mock

import boto3
import botocore.auth
import botocore.config
import botocore.credentials
import botocore.exceptions
from botocore.awsrequest import AWSRequest


def client(endpoint, key, secret):
    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=botocore.config.Config(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


def sdk_call(c, op, args):
    if isinstance(args.get("Payload"), str):
        args = dict(args, Payload=args["Payload"].encode())
    try:
        response = getattr(c, op)(**args)
    except botocore.exceptions.ClientError as error:
        return {
            "exception": error.response["Error"]["Code"],
            "message": error.response["Error"].get("Message", ""),
            "status": error.response["ResponseMetadata"]["HTTPStatusCode"],
        }
    out = dict(response)
    out.pop("ResponseMetadata", None)
    if "Payload" in out:
        body = out["Payload"].read()
        try:
            out["Payload"] = json.loads(body) if body else None
        except ValueError:
            out["Payload"] = body.decode("utf-8", "replace")
    return out


def send(method, url, headers, body):
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return {"status": response.status, "errortype": None, "body": response.read().decode()}
    except urllib.error.HTTPError as error:
        return {
            "status": error.code,
            "errortype": error.headers.get("x-amzn-errortype"),
            "body": error.read().decode(),
        }


def run(endpoint, call):
    key, secret, op, args = call["key"], call["secret"], call.get("op"), call.get("args", {})
    how = call.get("how")
    credentials = botocore.credentials.Credentials(key, secret)
    if how is None:
        return sdk_call(client(endpoint, key, secret), op, args)
    if how == "skew":
        when = datetime.datetime.utcnow() + datetime.timedelta(seconds=call["skew"])
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            return sdk_call(client(endpoint, key, secret), op, args)
    if how == "tamper":
        request = AWSRequest(
            method="POST",
            url=endpoint + args["path"],
            data=args["body"].encode(),
            headers={"Content-Type": "application/json"},
        )
        botocore.auth.SigV4Auth(credentials, "lambda", "us-east-1").add_auth(request)
        prepared = request.prepare()
        return send("POST", prepared.url, prepared.headers.items(), args["sent"].encode())
    if how == "plain":
        return send("POST", endpoint + args["path"], {"Content-Type": "application/json"},
                    args["body"].encode())
    if how == "presign":
        url = client(endpoint, key, secret).generate_presigned_url(
            op, Params=args, ExpiresIn=60
        )
        return send("GET", url, {}, None)
    if how == "presign_post":
        request = AWSRequest(method="POST", url=endpoint + args["path"])
        botocore.auth.SigV4QueryAuth(credentials, "lambda", "us-east-1", expires=60).add_auth(
            request
        )
        prepared = request.prepare()
        return send("POST", prepared.url, prepared.headers.items(), prepared.body or b"")
    raise ValueError(f"unknown how: {how}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--calls", required=True)
    args = parser.parse_args()
    results = [run(args.endpoint, call) for call in json.loads(args.calls)]
    json.dump(results, sys.stdout, default=str)


if __name__ == "__main__":
    main()
