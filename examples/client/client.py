"""A client of a tributary replica, with the libraries ML platforms already use.

  send     N training events to the events topic with confluent-kafka: JSON,
           or Avro in the Confluent wire format (--avro-schema FILE; the
           replica then runs with kafka.event_format = "avro" and the same
           schema)
  predict  the same instances over V1 (HTTP JSON), V2 HTTP (tritonclient.http
           at its defaults: binary tensors) and V2 gRPC (tritonclient.grpc),
           the V2 ones also gzip-compressed; prints the answers as one JSON
           object

  clicks   N of a team's own click events as JSON lines on stdout, for
           `tributary produce` (examples/domain/tributary.toml reads them)
  feedback predict now, learn later (feedback.enabled): N instances
           predicted over V1 under ids of the client's own, then, for those
           its hidden model clicks, the label posted to
           /v1/models/{m}/feedback after a random delay (--delay-ms); the
           others are left to expire to feedback.default_label

The events and instances follow the model the replica serves: its V2 model
metadata names the dense width and the sparse fields, or, for a model of
declared features (examples/domain/tributary.toml), the features; then the
events sent are the team's click events (JSON, or Avro with
--avro-schema examples/domain/click.avsc), and the predictions are made from
the same records: V1 instances, V2's `record` input, and V2's inputs per
declared feature.

  python examples/client/client.py send --http 127.0.0.1:8080 --brokers 127.0.0.1:9092 --topic events
  python examples/client/client.py predict --http 127.0.0.1:8080 --grpc 127.0.0.1:8001
  python examples/client/client.py feedback --http 127.0.0.1:8080 --events 2000
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
    """(dense width, sparse field names) from the replica's V2 model metadata;
    None for a model of declared features (it has no "dense" input)."""
    with urllib.request.urlopen(f"http://{http}/v2/models/{model}") as r:
        meta = json.load(r)
    dense = next((i for i in meta["inputs"] if i["name"] == "dense"), None)
    if dense is None:
        return None
    fields = [i["name"] for i in meta["inputs"] if i["name"] != "dense"]
    return dense["shape"][1], fields


# examples/domain/tributary.toml's features: where each is in a click event.
CLICK_FEATURES = {
    "price": ("price",),
    "age": ("user", "age"),
    "user": ("user", "id"),
    "country": ("user", "country"),
    "category": ("ad", "category"),
    "tags": ("ad", "tags"),
    "hour": ("hour",),
}


def make_click(rng):
    """One of a team's click events, as their producers write it: clicks lean
    on the category, the user's country and the hour."""
    user = rng.randrange(200)
    category = rng.choice(["shoes", "books", "games", "tools", "garden"])
    hour = rng.randrange(24)
    country = ["de", "fr", "us"][user % 3]
    score = -1.0 + (1.2 if category == "games" else 0.0) + (0.8 if country == "fr" else 0.0) + (0.6 if hour >= 18 else 0.0)
    return {
        "user": {"id": f"u{user}", "age": None if user % 10 == 0 else 18 + user % 50, "country": country},
        "ad": {"id": f"a{rng.randrange(40)}", "category": category, "tags": rng.sample(["red", "sale", "new", "eco"], 2)},
        "price": round(rng.uniform(1, 100), 2),
        "hour": hour,
        "clicked": rng.random() < 1 / (1 + pow(2.718281828, -score)),
        "event_time": int(time.time() * 1000),
        "session": f"s{rng.randrange(10**6)}",
    }


def feature(record, name):
    value = record
    for key in CLICK_FEATURES[name]:
        value = value[key]
    return value


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

    inputs = model_inputs(args.http, args.model)
    rng = random.Random(args.seed)
    make = (lambda: make_click(rng)) if inputs is None else (lambda: make_event(rng, *inputs))
    if args.avro_schema:
        encode = avro_framing(args.avro_schema, args.schema_id)
    else:
        encode = lambda event: json.dumps(event).encode()
    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True})
    for _ in range(args.events):
        producer.produce(args.topic, encode(make()))
        producer.poll(0)
    left = producer.flush(30)
    if left:
        raise SystemExit(f"{left} events not delivered")
    print(json.dumps({"sent": args.events}))


def predict_v1(args, instances):
    """V1: JSON instances."""
    request = urllib.request.Request(
        f"http://{args.http}/v1/models/{args.model}:predict",
        data=json.dumps({"instances": instances}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as r:
        return json.load(r)["predictions"]


def predict_clicks(args):
    """A model of declared features: the same click records through V1, V2's
    `record` input and V2's inputs per feature, over HTTP and gRPC."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    rng = random.Random(args.seed + 1)
    records = [make_click(rng) for _ in range(args.rows)]
    for r in records:
        del r["clicked"], r["event_time"]  # not known at prediction time
    v1 = predict_v1(args, records)

    def record_input(client):
        data = np.array([json.dumps(r).encode() for r in records], dtype=np.object_)
        t = client.InferInput("record", [len(records)], "BYTES")
        t.set_data_from_numpy(data)
        return [t]

    def feature_inputs(client, listed):
        inputs = []
        for i in listed:
            values = [feature(r, i["name"]) for r in records]
            if i["datatype"] == "FP32":  # NaN: missing, the feature's default
                data = np.array([[float("nan") if v is None else v] for v in values], dtype=np.float32)
            else:
                bags = [v if isinstance(v, list) else [v] for v in values]
                width = max(len(b) for b in bags)
                data = np.array([[x.encode() for x in b] + [b""] * (width - len(b)) for b in bags], dtype=np.object_)
            inputs.append(client.InferInput(i["name"], list(data.shape), i["datatype"]))
            inputs[-1].set_data_from_numpy(data)
        return inputs

    answers = {"v1": v1}
    with httpclient.InferenceServerClient(args.http) as c:
        listed = c.get_model_metadata(args.model)["inputs"]
        answers["v2_http_record"] = c.infer(args.model, record_input(httpclient)).as_numpy("predictions")
        answers["v2_http_features"] = c.infer(args.model, feature_inputs(httpclient, listed)).as_numpy("predictions")
    c = grpcclient.InferenceServerClient(args.grpc)
    answers["v2_grpc_record"] = c.infer(args.model, record_input(grpcclient)).as_numpy("predictions")
    answers["v2_grpc_features"] = c.infer(args.model, feature_inputs(grpcclient, listed)).as_numpy("predictions")
    c.close()
    print(json.dumps({k: [float(p) for p in v] for k, v in answers.items()} | {"inputs": [i["name"] for i in listed]}))


def predict(args):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    inputs = model_inputs(args.http, args.model)
    if inputs is None:
        return predict_clicks(args)
    dense_dim, fields = inputs
    rng = random.Random(args.seed + 1)
    events = [make_event(rng, dense_dim, fields) for _ in range(args.rows)]
    v1 = predict_v1(args, [{"dense": e["dense"], "sparse": e["sparse"]} for e in events])

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


def post_json(args, path, body, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://{args.http}{path}", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request) as r:
        return json.load(r)


def feedback(args):
    """Predictions under ids, and the outcomes that come later: a label for
    each clicked instance, posted --delay-ms at most after its prediction."""
    inputs = model_inputs(args.http, args.model)
    rng = random.Random(args.seed)
    label_field = "clicked" if inputs is None else "label"
    make = (lambda: make_click(rng)) if inputs is None else (lambda: make_event(rng, *inputs))
    due, sent, clicked, started = [], 0, 0, time.time()
    run = f"{args.seed}-{int(started)}"
    while sent < args.events:
        batch = [make() for _ in range(min(32, args.events - sent))]
        ids = [f"client-{run}-{sent + i}" for i in range(len(batch))]
        instances = [{k: v for k, v in e.items() if k not in (label_field, "ts", "event_time")} for e in batch]
        answer = post_json(args, f"/v1/models/{args.model}:predict", {"instances": instances, "ids": ids})
        assert answer["ids"] == ids, answer
        now = time.time()
        for id_, event in zip(ids, batch):
            if event[label_field] in (True, 1, 1.0):
                due.append((now + rng.uniform(0, args.delay_ms / 1000), id_))
        sent += len(batch)
        ready = [d for d in due if d[0] <= now]
        due = [d for d in due if d[0] > now]
        if ready:
            label = True if inputs is None else 1
            post_json(args, f"/v1/models/{args.model}/feedback", {"labels": [{"id": i, "label": label} for _, i in ready]}, args.token)
            clicked += len(ready)
        time.sleep(0.01)
    for at, id_ in sorted(due):
        time.sleep(max(0.0, at - time.time()))
        label = True if inputs is None else 1
        post_json(args, f"/v1/models/{args.model}/feedback", {"labels": [{"id": id_, "label": label}]}, args.token)
        clicked += 1
    print(json.dumps({"predicted": sent, "labels_posted": clicked, "seconds": round(time.time() - started, 1)}))


def clicks(args):
    rng = random.Random(args.seed)
    for _ in range(args.events):
        print(json.dumps(make_click(rng)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["send", "predict", "clicks", "feedback"])
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
    p.add_argument("--delay-ms", type=int, default=2000, help="feedback: a label comes at most this late")
    p.add_argument("--token", help="feedback: http.ingest_token, when the replica requires it")
    args = p.parse_args()
    {"send": send, "predict": predict, "clicks": clicks, "feedback": feedback}[args.command](args)


if __name__ == "__main__":
    main()
