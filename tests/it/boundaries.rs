//! The trust boundaries, each against a real replica: a request, an event,
//! a record or a peer that means harm (or is only wrong) gets a clear
//! refusal, and the replica stays up, keeps its memory and loses nothing.
//! A replica sent hostile input runs under an address-space cap, so that a
//! regression fails its allocation fast instead of taking the machine.

use std::time::Duration;

use serde_json::json;
use tributary::config::ModelKind;
use tributary_load::driver::proto;

use crate::helpers::*;

/// The most a replica's peak resident memory may grow while refusing
/// hostile requests.
const GROWTH_LIMIT: u64 = 64 << 20;

/// A replica of a small model serving REST and gRPC, under [`MEMORY_CAP`];
/// and its gRPC address.
fn capped_replica(cluster: &Cluster) -> (Replica, String) {
    let mut r = cluster.replica("r0");
    let grpc = format!("127.0.0.1:{}", procs::free_port());
    r.env.push(("TRIBUTARY_GRPC__ADDR".into(), grpc.clone()));
    r.memory_cap_bytes = Some(MEMORY_CAP);
    r.start();
    r.wait_ready();
    (r, grpc)
}

/// `ModelInfer` over gRPC: the status code and message of its refusal.
fn grpc_refusal(addr: &str, request: proto::ModelInferRequest) -> (tonic::Code, String) {
    use proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let call = client.model_infer(request);
        match tokio::time::timeout(Duration::from_secs(30), call).await.expect("an answer within 30 s") {
            Ok(answer) => panic!("answered {answer:?}"),
            Err(status) => (status.code(), status.message().to_string()),
        }
    })
}

#[test]
fn a_tensor_shape_its_data_does_not_back_is_refused_before_the_replica_allocates_it() {
    let cluster = Cluster::new("hostile-shape", ModelKind::WideDeep);
    let (r, grpc) = capped_replica(&cluster);
    let field = cluster.config.model.sparse_fields[0].clone();
    let before = r.process().peak_rss_bytes().expect("the replica's VmHWM");
    let shape = [100_000_000i64, 0];
    let named = |text: &str| text.contains(&format!("{field:?}")) && text.contains("at most");
    let error = |answer: &serde_json::Value| answer["error"].as_str().unwrap_or_default().to_string();

    // REST, JSON data.
    let body = json!({"inputs": [{"name": field, "datatype": "BYTES", "shape": shape, "data": []}]});
    let (status, answer) = r.post("/v2/models/default/infer", None, &body.to_string());
    assert!(status == 400 && named(&error(&answer)), "{status} {answer}");

    // REST, the binary extension: no bytes behind the shape.
    let header = json!({"inputs": [{"name": field, "datatype": "BYTES", "shape": shape,
                                    "parameters": {"binary_data_size": 0}}]})
    .to_string();
    let response = (procs::http().post(format!("http://{}/v2/models/default/infer", r.http)))
        .header("Inference-Header-Content-Length", header.len())
        .body(header)
        .send()
        .expect("an answer");
    let status = response.status().as_u16();
    let answer: serde_json::Value = response.json().unwrap();
    assert!(status == 400 && named(&error(&answer)), "{status} {answer}");

    // gRPC, typed contents and raw contents.
    let input = proto::model_infer_request::InferInputTensor {
        name: field.clone(),
        datatype: "BYTES".into(),
        shape: shape.to_vec(),
        ..Default::default()
    };
    let typed = proto::ModelInferRequest { model_name: "default".into(), inputs: vec![input], ..Default::default() };
    let raw = proto::ModelInferRequest { raw_input_contents: vec![Vec::new()], ..typed.clone() };
    for request in [typed, raw] {
        let (code, message) = grpc_refusal(&grpc, request);
        assert!(code == tonic::Code::InvalidArgument && named(&message), "{code:?} {message}");
    }

    // Up, answering, and no bigger for it.
    let good = json!({"instances": [{"dense": vec![0.5; cluster.config.model.dense_dim], "sparse": {}}]});
    let (status, answer) = r.post("/v1/models/default:predict", None, &good.to_string());
    assert_eq!(status, 200, "{answer}");
    let after = r.process().peak_rss_bytes().expect("the replica's VmHWM");
    assert!(after < before + GROWTH_LIMIT, "peak RSS grew from {before} to {after} bytes");
}

#[test]
fn an_outlier_event_is_dead_lettered_alone_and_every_other_event_of_its_batch_is_learned() {
    let mut cluster = Cluster::new("outlier", ModelKind::Logistic);
    cluster.with_events_partitions(2);
    let r = cluster.spawn_capped("r0");
    r.wait_ready();
    cluster.produce(1000, 1);
    // Two events of a dense value of 1e30, one of each label, amid the good
    // ones: finite, valid, and a gradient far over any norm bound.
    let dim = cluster.config.model.dense_dim;
    let outlier = |label: u8| {
        let mut dense = vec![0.5; dim];
        dense[0] = 1e30;
        json!({"dense": dense, "sparse": {}, "label": label}).to_string()
    };
    cluster.produce_payloads(&[outlier(0), outlier(1)]);
    cluster.produce(1000, 2);

    // Refused alone: counted, and dead-lettered with the reason's kind.
    let refused = wait_for("the outliers to be refused", Duration::from_secs(120), || {
        let refused = r.metrics().value("tributary_events_refused_total", "");
        let learned = r.info()?["examples_learned"].as_u64()?;
        (refused >= 1.0 && learned + refused as u64 == 2002).then_some(refused as usize)
    });
    let info = r.wait_learned(2002 - refused as u64, Duration::from_secs(60));
    assert!(info["examples_learned"].as_u64().unwrap() >= 2000, "every good event learned: {info}");
    for (payload, kind, reason) in cluster.dead_letters(refused) {
        assert!(kind.starts_with("gradient_"), "{kind}: {reason}");
        let event: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(event["dense"][0], 1e30, "the outlier as it came: {event}");
    }
}

#[test]
fn a_record_that_lies_about_its_size_is_rejected_and_moves_no_watermark() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use tributary::model::{GradTensor, GradValues, Model};
    use tributary::update_log::record::{EventRange, GradientRecord, Record};

    let cluster = Cluster::new("record-size", ModelKind::Logistic);
    let r = cluster.spawn_capped("r0");
    r.wait_ready();
    cluster.produce(500, 1);
    let info = r.wait_learned(500, Duration::from_secs(120));
    let (partition, from) = watermarks(&info).into_iter().next().expect("a partition learned");
    let model = Model::new(&cluster.config.model).expect("a built-in model");
    let hostile = |to: i64, examples: u32, g: f32| {
        Record::Gradient(GradientRecord {
            fingerprint: model.fingerprint(),
            ranges: vec![EventRange { partition: partition.parse().unwrap(), from: from as i64, to }],
            base: 0,
            examples,
            skipped: 0,
            loss_sum: 0.5,
            oldest_ts: 0,
            producer: "hostile".into(),
            gradient: vec![GradTensor { param: 1, values: GradValues::Dense(vec![g; model.params()[1].len()]) }],
        })
        .encode()
    };
    let producer: BaseProducer = (tributary::update_log::kafka::producer_config(
        &tributary::update_log::kafka::Connection::of(&cluster.config.kafka).unwrap(),
        "hostile",
    ))
    .create()
    .unwrap();
    // A watermark past anything the partition will hold; a norm bound as
    // large as the record says.
    for bytes in [hostile(1 << 62, 10, 0.1), hostile(from as i64 + i64::from(u32::MAX), u32::MAX, 1e9)] {
        producer.send(BaseRecord::<(), _>::to(&cluster.config.kafka.updates_topic).payload(&bytes)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    wait_for("the lying records to be rejected", Duration::from_secs(60), || {
        (r.metrics().value("tributary_records_rejected_total", "reason=\"size\"") == 2.0).then_some(())
    });
    // Learning goes on: the partition's next events are learned, once.
    cluster.produce(500, 2);
    let info = r.wait_learned(1000, Duration::from_secs(120));
    let ends: u64 = r.event_ends().iter().map(|(_, end)| *end as u64).sum();
    assert_eq!(watermarks(&info).values().sum::<u64>(), ends, "{info}");
}

/// A real checkpoint with its first weight changed and its checksum made
/// again: what a peer that means harm (or a corrupt disk) could serve.
fn tampered(model: &tributary::model::Model, checkpoint: &[u8]) -> Vec<u8> {
    // The layout's end: slot count u8, the weights, the optimizer slots
    // (f32 each, as many as the count says), and a 32-byte blake3 checksum.
    let floats: usize = model.params().iter().map(|p| p.len()).sum();
    let body_end = checkpoint.len() - 32;
    let (slots, weights_at) = (0..=2)
        .map(|k| (k, body_end - 4 * floats * (1 + k)))
        .find(|&(k, at)| usize::from(checkpoint[at - 1]) == k)
        .expect("the slot count before the weights");
    assert!(slots <= 2);
    let mut bytes = checkpoint[..body_end].to_vec();
    let first = f32::from_le_bytes(bytes[weights_at..weights_at + 4].try_into().unwrap());
    bytes[weights_at..weights_at + 4].copy_from_slice(&(first + 0.5).to_le_bytes());
    let sum = blake3::hash(&bytes);
    bytes.extend_from_slice(sum.as_bytes());
    bytes
}

/// A fake peer on 127.0.0.1 that answers every request with `body`; its
/// base URL.
fn fake_peer(body: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body));
        }
    });
    url
}

#[test]
fn a_peer_checkpoint_with_one_weight_changed_is_refused_by_the_fleets_attestation() {
    const TOKEN: &str = "the-fleet-peer-token";
    let mut cluster = Cluster::new("tampered-peer", ModelKind::Logistic);
    cluster.config.checkpoint.peer_token = TOKEN.into();
    let steady = cluster.spawn("steady");
    steady.wait_ready();
    cluster.produce(600, 1);
    steady.wait_learned(600, Duration::from_secs(120));
    let checkpointed = wait_for("a checkpoint of the 600 events", Duration::from_secs(60), || {
        let (_, body) = steady.get("/v1/models/default/checkpoints")?;
        let newest = serde_json::from_str::<serde_json::Value>(&body).ok()?["checkpoints"][0].clone();
        (newest["examples_learned"].as_u64()? == 600).then(|| newest["position"].as_i64())?
    });
    let real = (procs::http().get(format!("http://{}/v1/models/default/checkpoint", steady.http)))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(real.headers()["x-tributary-position"], checkpointed.to_string().as_str());
    let model = tributary::model::Model::new(&cluster.config.model).expect("a built-in model");
    let peer = fake_peer(tampered(&model, &real.bytes().unwrap()));

    cluster.config.checkpoint.bootstrap_from = peer;
    let newcomer = cluster.spawn_capped("newcomer");
    wait_for("the newcomer to stop applying", Duration::from_secs(60), || {
        (newcomer.metrics().value("tributary_update_log_stalled", "") == 1.0).then_some(())
    });
    let said = std::fs::read_to_string(&newcomer.log).unwrap();
    assert!(said.contains("bootstrapped from a peer's checkpoint"), "{}", newcomer.log_tail(20));
    let why = format!("at update-log position {checkpointed} this replica's weights digest is");
    assert!(said.contains(&why), "{}", newcomer.log_tail(20));
    assert!(!newcomer.is_ready(), "a replica whose weights are not the fleet's is not ready");
    // The fleet goes on, its weights its own.
    cluster.produce(300, 2);
    steady.wait_learned(900, Duration::from_secs(120));
}

#[test]
fn a_fleet_on_sasl_ssl_with_acls_learns_and_serves_and_a_client_writes_only_what_it_may() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use tributary::update_log::kafka::{self, Connection};

    let cluster = Cluster::secured("secure", ModelKind::Logistic);
    let k = &cluster.config.kafka;
    let r = cluster.spawn_capped("r0");
    r.wait_ready();
    // The fleet's principal reads and writes its own topics: it learns and serves.
    cluster.produce(300, 1);
    r.wait_learned(300, Duration::from_secs(120));
    let instance = json!({"instances": [{"dense": vec![0.5; cluster.config.model.dense_dim], "sparse": {}}]});
    let (status, answer) = r.post("/v1/models/default:predict", None, &instance.to_string());
    assert_eq!(status, 200, "{answer}");

    // Another principal, allowed to write the events topic only.
    grant_acls(&cluster.brokers[0], &[format!("User:producer:WRITE:topic:{}", k.events_topic)]);
    let updates_end = || {
        let reader: rdkafka::consumer::BaseConsumer =
            kafka::log_reader_config(&Connection::of(k).unwrap(), "test-end").create().unwrap();
        kafka::log_end(&reader, &k.updates_topic).expect("the update log's end")
    };
    let before = updates_end();
    // Whether the broker acknowledged the record.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let send = |client: &std::collections::BTreeMap<String, String>, topic: &str, payload: &[u8]| {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &k.brokers).set("message.timeout.ms", "10000");
        for (name, value) in client {
            config.set(name, value);
        }
        let producer: FutureProducer = config.create().unwrap();
        let record = FutureRecord::<(), _>::to(topic).payload(payload);
        runtime.block_on(producer.send(record, Duration::from_secs(20))).map(|_| ()).map_err(|(e, _)| e)
    };
    let producer = secure_client(&cluster.brokers[0], "producer", SECURE_USERS[2].1);
    let mut synthetic = tributary::synthetic::Synthetic::new(&cluster.config.model, 2);
    for _ in 0..20 {
        let sent = send(&producer, &k.events_topic, synthetic.event(1).as_bytes());
        assert!(sent.is_ok(), "the producer writes events: {sent:?}");
    }
    r.wait_learned(320, Duration::from_secs(120));
    let refused = send(&producer, &k.updates_topic, b"not the producer's").unwrap_err();
    assert!(refused.to_string().contains("authoriz"), "the producer may not write updates: {refused}");
    // No credentials: TLS only, no SASL login.
    let anonymous = [
        ("security.protocol".to_string(), "SSL".to_string()),
        ("ssl.ca.location".to_string(), cluster.brokers[0].ca().display().to_string()),
    ]
    .into_iter()
    .collect();
    let refused = send(&anonymous, &k.updates_topic, b"anyone's");
    assert!(refused.is_err(), "a client without credentials may not write updates");
    // Had either landed, the replica would have read it as a malformed
    // record by the time it learns what the fleet wrote after it.
    cluster.produce(10, 3);
    r.wait_learned(330, Duration::from_secs(120));
    assert!(updates_end() > before);
    let malformed = r.metrics().value("tributary_records_rejected_total", "reason=\"malformed\"");
    assert_eq!(malformed, 0.0, "no foreign record reached the update log");
}
