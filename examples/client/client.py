"""A client of a tributary replica, with the libraries ML platforms already use.

  send     N training events to the events topic with confluent-kafka: JSON,
           or Avro in the Confluent wire format (--avro-schema FILE; the
           replica then runs with kafka.event_format = "avro" and the same
           schema)
  predict  the same instances over V1 (HTTP JSON), V2 HTTP (tritonclient.http
           at its defaults: binary tensors) and V2 gRPC (tritonclient.grpc),
           the V2 ones also gzip-compressed; prints the answers as one JSON
           object

The events and instances follow the model the replica serves: its V2 model
metadata names the dense width and the sparse fields.

  python examples/client/client.py send --http 127.0.0.1:8080 --brokers 127.0.0.1:9092 --topic events
  python examples/client/client.py predict --http 127.0.0.1:8080 --grpc 127.0.0.1:8001
"""

import argparse
import io
import json
import random
import struct
import time
import urllib.request

import numpy as np


def model_inputs(http, model):
    """(dense width, sparse field names) from the replica's V2 model metadata."""
    with urllib.request.urlopen(f"http://{http}/v2/models/{model}") as r:
        meta = json.load(r)
    dense = next(i for i in meta["inputs"] if i["name"] == "dense")
    fields = [i["name"] for i in meta["inputs"] if i["name"] != "dense"]
    return dense["shape"][1], fields


def make_event(rng, dense_dim, fields):
    """One click-through-like event: the label leans on dense[0] and field 0."""
    dense = [round(rng.gauss(0, 1), 4) for _ in range(dense_dim)]
    sparse = {f: [f"{f}-{rng.randrange(50)}" for _ in range(rng.randint(1, 3))] for f in fields}
    score = dense[0] + (0.8 if fields and sparse[fields[0]][0].endswith("7") else 0.0)
    label = 1.0 if rng.random() < 1 / (1 + pow(2.718281828, -score)) else 0.0
    return {"dense": dense, "sparse": sparse, "label": label, "ts": int(time.time() * 1000)}


def avro_framing(schema_file, schema_id):
    """A function from an event to its bytes in the Confluent wire format:
    magic byte 0, the schema id (4 bytes, big-endian), the Avro body."""
    import fastavro

    schema = fastavro.parse_schema(json.load(open(schema_file)))

    def encode(event):
        body = io.BytesIO()
        fastavro.schemaless_writer(body, schema, event)
        return b"\x00" + struct.pack(">I", schema_id) + body.getvalue()

    return encode


def send(args):
    from confluent_kafka import Producer

    dense_dim, fields = model_inputs(args.http, args.model)
    rng = random.Random(args.seed)
    if args.avro_schema:
        encode = avro_framing(args.avro_schema, args.schema_id)
    else:
        encode = lambda event: json.dumps(event).encode()
    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True})
    for _ in range(args.events):
        producer.produce(args.topic, encode(make_event(rng, dense_dim, fields)))
        producer.poll(0)
    left = producer.flush(30)
    if left:
        raise SystemExit(f"{left} events not delivered")
    print(json.dumps({"sent": args.events}))


def predict(args):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    dense_dim, fields = model_inputs(args.http, args.model)
    rng = random.Random(args.seed + 1)
    events = [make_event(rng, dense_dim, fields) for _ in range(args.rows)]
    instances = [{"dense": e["dense"], "sparse": e["sparse"]} for e in events]

    # V1: JSON instances.
    request = urllib.request.Request(
        f"http://{args.http}/v1/models/{args.model}:predict",
        data=json.dumps({"instances": instances}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as r:
        v1 = json.load(r)["predictions"]

    # V2: a [rows, dense_dim] FP32 tensor, and per sparse field a [rows, K]
    # BYTES tensor of the bags, padded with empty strings.
    dense = np.array([e["dense"] for e in events], dtype=np.float32)
    bags = {}
    for f in fields:
        width = max(len(e["sparse"][f]) for e in events)
        rows = [e["sparse"][f] + [""] * (width - len(e["sparse"][f])) for e in events]
        bags[f] = np.array([[v.encode() for v in row] for row in rows], dtype=np.object_)

    def tensors(client):
        inputs = [client.InferInput("dense", list(dense.shape), "FP32")]
        inputs[0].set_data_from_numpy(dense)
        for f, bag in bags.items():
            inputs.append(client.InferInput(f, list(bag.shape), "BYTES"))
            inputs[-1].set_data_from_numpy(bag)
        return inputs

    with httpclient.InferenceServerClient(args.http) as c:
        assert c.is_server_live() and c.is_model_ready(args.model)
        v2_http = c.infer(args.model, tensors(httpclient)).as_numpy("predictions")
        # The same, gzip both ways (for a slow link).
        gzip = {"request_compression_algorithm": "gzip", "response_compression_algorithm": "gzip"}
        v2_http_gzip = c.infer(args.model, tensors(httpclient), **gzip).as_numpy("predictions")
    c = grpcclient.InferenceServerClient(args.grpc)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(args.model)
    metadata = c.get_model_metadata(args.model, as_json=True)
    v2_grpc = c.infer(args.model, tensors(grpcclient)).as_numpy("predictions")
    v2_grpc_gzip = c.infer(args.model, tensors(grpcclient), compression_algorithm="gzip").as_numpy("predictions")
    c.close()
    print(json.dumps({
        "v1": v1,
        "v2_http": [float(p) for p in v2_http],
        "v2_grpc": [float(p) for p in v2_grpc],
        "v2_http_gzip": [float(p) for p in v2_http_gzip],
        "v2_grpc_gzip": [float(p) for p in v2_grpc_gzip],
        "grpc_inputs": [i["name"] for i in metadata["inputs"]],
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["send", "predict"])
    p.add_argument("--http", default="127.0.0.1:8080", help="the replica's HTTP address")
    p.add_argument("--grpc", default="127.0.0.1:8001", help="the replica's grpc.addr")
    p.add_argument("--model", default="default")
    p.add_argument("--brokers", default="127.0.0.1:9092")
    p.add_argument("--topic", default="events")
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--rows", type=int, default=8, help="instances to predict")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--avro-schema", help="send Avro with this writer schema (.avsc) instead of JSON")
    p.add_argument("--schema-id", type=int, default=1, help="the schema id the framing carries")
    args = p.parse_args()
    {"send": send, "predict": predict}[args.command](args)


if __name__ == "__main__":
    main()
