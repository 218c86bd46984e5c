"""The SAM template's DynamoDB table is the one `doparallel migrate` creates.

Creates a table with the binary's `migrate` on a moto server (loopback), reads it back with
DescribeTable, and compares its keys, attribute types, billing mode and indexes (keys and the
attributes each carries) with the `Table` resource of deploy/aws/template.yaml.

    python3 tests/aws/template_table.py target/debug/doparallel
"""

import os
import subprocess
import sys

import boto3
from cfnlint.decode import decode_str
from moto.server import ThreadedMotoServer

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "aws", "template.yaml")


def normalized(table):
    """The parts of a table that must agree, in a form that compares equal."""
    return {
        "keys": [(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]],
        "attributes": sorted(
            (a["AttributeName"], a["AttributeType"]) for a in table["AttributeDefinitions"]
        ),
        "billing": table.get("BillingMode")
        or table.get("BillingModeSummary", {}).get("BillingMode"),
        "indexes": sorted(
            (
                i["IndexName"],
                tuple((k["AttributeName"], k["KeyType"]) for k in i["KeySchema"]),
                i["Projection"]["ProjectionType"],
                tuple(sorted(i["Projection"].get("NonKeyAttributes", []))),
            )
            for i in table["GlobalSecondaryIndexes"]
        ),
    }


def main():
    binary = sys.argv[1]
    with open(TEMPLATE) as f:
        template, problems = decode_str(f.read())
    if problems:
        sys.exit(f"cannot read {TEMPLATE}: {problems}")
    declared = normalized(template["Resources"]["Table"]["Properties"])

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE="/dev/null",
        )
        url = f"dynamodb://doparallel?region=us-east-1&endpoint={endpoint}"
        subprocess.run([binary, "migrate", "--database", url], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        client = boto3.client(
            "dynamodb",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        created = normalized(client.describe_table(TableName="doparallel")["Table"])
    finally:
        server.stop()

    if declared != created:
        for part in declared:
            if declared[part] != created[part]:
                print(f"{part}:\n  template: {declared[part]}\n  migrate:  {created[part]}")
        sys.exit("deploy/aws/template.yaml's table differs from the one migrate creates")
    print(f"the template's table is migrate's: {len(created['indexes'])} indexes agree")


if __name__ == "__main__":
    main()
