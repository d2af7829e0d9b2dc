"""S3 side-channel for the integration tests (tests/common/mod.rs).

Usage: python3 s3_helper.py ENDPOINT OP ARGS...
Talks to the S3-protocol server at ENDPOINT directly (never through a mount) with boto3,
prints one JSON value on stdout, and exits non-zero with a traceback on any error.
"""
import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint, op, args = sys.argv[1], sys.argv[2], sys.argv[3:]
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
    config=Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        # Plain payloads (no aws-chunked framing, no trailing checksums): what a simple
        # third-party tool sends, and what every local test server understands.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    ),
)


def out(value):
    sys.stdout.write(json.dumps(value))
    sys.stdout.flush()


def not_found(err):
    code = err.response.get("Error", {}).get("Code")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


if op == "list_keys":
    bucket, prefix = args
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    out(keys)
elif op == "get_object":
    bucket, key, dest = args
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    with open(dest, "wb") as f:
        while True:
            chunk = body.read(1 << 20)
            if not chunk:
                break
            f.write(chunk)
    out(True)
elif op == "head_object":
    bucket, key = args
    try:
        r = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if not_found(e):
            out(None)
            sys.exit(0)
        raise
    out(
        {
            "size": r["ContentLength"],
            "metadata": r.get("Metadata", {}),
            "etag": r.get("ETag", "").strip('"'),
            "content_type": r.get("ContentType"),
            "storage_class": r.get("StorageClass"),
        }
    )
elif op == "put_object":
    bucket, key, src, meta, *content_type = args
    with open(src, "rb") as f:
        body = f.read()
    extra = {"ContentType": content_type[0]} if content_type else {}
    r = s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=json.loads(meta), **extra)
    out(r.get("ETag", "").strip('"'))
elif op == "delete_object":
    bucket, key = args
    s3.delete_object(Bucket=bucket, Key=key)
    out(True)
elif op == "list_multipart_uploads":
    (bucket,) = args
    n = 0
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        n += len(page.get("Uploads", []))
    out(n)
elif op == "create_multipart_upload":
    # An upload left open with one part, as a crashed writer leaves it.
    bucket, key = args
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"part")
    out(upload_id)
elif op == "create_access_key":
    # For a moto started with INITIAL_NO_AUTH_ACTION_COUNT: a user allowed all of S3.
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    iam.create_user(UserName="bucketgate")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="bucketgate", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="bucketgate")["AccessKey"]
    out({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]})
elif op == "enforce_auth":
    # moto counts signed requests only: spend the free ones until a bogus key is refused.
    for n in range(1, 201):
        try:
            s3.list_buckets()
        except ClientError as err:
            if err.response["Error"]["Code"] == "InvalidAccessKeyId":
                out(n)
                break
            raise
    else:
        sys.exit("moto never started checking keys")
else:
    sys.exit("s3_helper.py: unknown op " + op)
