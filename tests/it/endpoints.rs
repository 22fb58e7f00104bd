//! The OpenAPI document against the router and docs/api.md, the Open
//! Inference Protocol (KServe V2), the validation of `POST /v1/events`, and
//! the status page's data; in process, like `api`. (Events reaching Kafka
//! and the page in a browser are in `browser` and `fleet`.)

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use serde_json::{json, Value};
use tributary::config::ModelKind;
use tributary::event::EventCodec;
use tributary::http::events::EventSink;
use tributary::http::router;

use crate::api::{app, call, state, PREDICT};

/// (METHOD, path) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[tokio::test]
async fn every_route_is_documented_and_every_documented_route_answers() {
    let app = app(ModelKind::Logistic);
    let (status, doc, text) = call(&app, "GET", "/openapi.json", Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{text}");
    let ops = documented(&doc);
    assert!(ops.len() >= 17, "{ops:?}");
    // Routed: no operation falls through to the fallback (404 "no such
    // route") or to 405; each has its responses documented.
    for (method, path) in &ops {
        let uri = path.replace("{model}", "default");
        let (status, v, text) = call(&app, method, &uri, Body::empty()).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {text}");
        let fell_through = v["error"].as_str().is_some_and(|e| e.contains("no such route"));
        assert!(!fell_through, "{method} {path} is documented but not routed");
        let op = &doc["paths"][path][method.to_lowercase()];
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path}: no responses");
        assert!(op["summary"].is_string() || op["description"].is_string(), "{method} {path}: undescribed");
    }
    // Every schema a request or response names is defined.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for reference in text.split("\"#/components/schemas/").skip(1).map(|r| &r[..r.find('"').unwrap()]) {
        assert!(schemas.contains_key(reference), "{reference} is referenced, not defined");
    }
    // The API table of docs/api.md lists exactly the documented operations.
    let api = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let listed: BTreeSet<(String, String)> = api
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(route, _)| route))
        .filter_map(|route| route.split_once(' '))
        .filter(|(m, _)| ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(m))
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(listed, ops, "docs/api.md's HTTP API table vs /openapi.json");
}

/// V1's predictions for the two instances the V2 tests send as tensors.
async fn v1_predictions(app: &axum::Router) -> Value {
    let v1 = json!({"instances": [
        {"dense": [0.5, -1.0], "sparse": {"country": "de", "tags": ["a", "b"]}},
        {"dense": [0.0, 2.0], "sparse": {"tags": ["c"]}},
    ]});
    let (status, answer, text) = call(app, "POST", PREDICT, v1.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    answer["predictions"].clone()
}

/// The same instances through V1 and V2 give the same numbers.
#[tokio::test]
async fn kserve_v2_infer_matches_v1_predict() {
    let app = app(ModelKind::WideDeep);
    let v1 = v1_predictions(&app).await;
    let v2 = json!({"id": "r1", "inputs": [
        {"name": "dense", "shape": [2, 2], "datatype": "FP32", "data": [0.5, -1.0, 0.0, 2.0]},
        {"name": "country", "shape": [2], "datatype": "BYTES", "data": ["de", ""]},
        {"name": "tags", "shape": [2, 2], "datatype": "BYTES", "data": [["a", "b"], ["c", ""]]},
    ]});
    let (status, out, text) = call(&app, "POST", "/v2/models/default/infer", v2.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(out["id"], "r1");
    assert_eq!(out["model_name"], "default");
    assert_eq!(out["model_version"], "0");
    let o = &out["outputs"][0];
    assert_eq!(
        (o["name"].as_str(), o["datatype"].as_str(), &o["shape"]),
        (Some("predictions"), Some("FP32"), &json!([2]))
    );
    assert_eq!(o["data"], v1, "V2 {text} vs V1 {v1}");

    let (status, meta, _) = call(&app, "GET", "/v2/models/default", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    let inputs: Vec<&str> = meta["inputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(inputs, ["dense", "country", "tags"]);
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 2]));
    for uri in ["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/default/ready"] {
        assert_eq!(call(&app, "GET", uri, Body::empty()).await.0, StatusCode::OK, "{uri}");
    }
    let (status, v, _) = call(&app, "GET", "/v2/models/other/ready", Body::empty()).await;
    assert_eq!((status, v["error"].as_str().is_some()), (StatusCode::NOT_FOUND, true));
    let bad = json!({"inputs": [{"name": "dense", "shape": [1, 2], "datatype": "FP32", "data": [1.0]}]});
    let (status, v, _) = call(&app, "POST", "/v2/models/default/infer", bad.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("holds 2 values, data has 1"), "{v}");
}

/// A V2 request in the binary tensor data extension: the JSON header, then
/// the bytes its inputs' `binary_data_size` name.
async fn call_binary(app: &axum::Router, header: &Value, binary: &[u8]) -> (StatusCode, Option<usize>, Vec<u8>) {
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let json = header.to_string();
    let mut body = json.clone().into_bytes();
    body.extend_from_slice(binary);
    let request = Request::builder()
        .method("POST")
        .uri("/v2/models/default/infer")
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", json.len())
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let header_len =
        (response.headers().get("inference-header-content-length")).map(|v| v.to_str().unwrap().parse().unwrap());
    (status, header_len, response.into_body().collect().await.unwrap().to_bytes().to_vec())
}

fn bytes_elements(items: &[&str]) -> Vec<u8> {
    items.iter().flat_map(|s| [(s.len() as u32).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat()).collect()
}

/// What tritonclient sends at its defaults (every input binary, binary
/// outputs asked for), mixed JSON and binary inputs, and bad sizes.
#[tokio::test]
async fn kserve_v2_binary_tensors_match_v1_predict() {
    let app = app(ModelKind::WideDeep);
    let v1 = v1_predictions(&app).await;
    let v1: Vec<f32> = v1.as_array().unwrap().iter().map(|p| p.as_f64().unwrap() as f32).collect();

    let dense: Vec<u8> = [0.5f32, -1.0, 0.0, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let country = bytes_elements(&["de", ""]);
    let tags = bytes_elements(&["a", "b", "c", ""]);
    let input = |name: &str, shape: Value, datatype: &str, size: usize| json!({"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}});
    let all_binary = json!({"inputs": [
        input("dense", json!([2, 2]), "FP32", dense.len()),
        input("country", json!([2]), "BYTES", country.len()),
        input("tags", json!([2, 2]), "BYTES", tags.len()),
    ], "parameters": {"binary_data_output": true}});
    let (status, header_len, body) =
        call_binary(&app, &all_binary, &[dense.clone(), country.clone(), tags.clone()].concat()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let header_len = header_len.expect("a binary answer says where its JSON ends");
    let header: Value = serde_json::from_slice(&body[..header_len]).unwrap();
    assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8, "{header}");
    assert!(header["outputs"][0].get("data").is_none(), "{header}");
    let got: Vec<f32> = body[header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, v1, "binary V2 vs V1");

    // Mixed: dense as JSON, the sparse fields binary; the output as JSON.
    let mixed = json!({"inputs": [
        {"name": "dense", "shape": [2, 2], "datatype": "FP32", "data": [0.5, -1.0, 0.0, 2.0]},
        input("country", json!([2]), "BYTES", country.len()),
        input("tags", json!([2, 2]), "BYTES", tags.len()),
    ], "outputs": [{"name": "predictions", "parameters": {"binary_data": false}}]});
    let (status, header_len, body) = call_binary(&app, &mixed, &[country.clone(), tags.clone()].concat()).await;
    assert_eq!((status, header_len), (StatusCode::OK, None), "{}", String::from_utf8_lossy(&body));
    let out: Value = serde_json::from_slice(&body).unwrap();
    let got: Vec<f32> =
        out["outputs"][0]["data"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap() as f32).collect();
    assert_eq!(got, v1, "mixed V2 vs V1");

    // Bad sizes are the protocol's 400s, naming the input.
    let cases = [
        (
            json!({"inputs": [input("dense", json!([2, 2]), "FP32", 64)]}),
            dense.clone(),
            "only 16 binary bytes are left",
        ),
        (json!({"inputs": [input("dense", json!([2, 2]), "FP32", 12)]}), dense.clone(), "4 binary bytes after"),
        (json!({"inputs": [input("dense", json!([2, 2]), "FP32", 14)]}), dense[..14].to_vec(), "not a whole number"),
        (
            json!({"inputs": [input("tags", json!([2, 2]), "BYTES", 9)]}),
            tags[..9].to_vec(),
            "a BYTES element of 1 bytes",
        ),
        (json!({"inputs": [{"name": "dense", "shape": [2, 2], "datatype": "FP32"}]}), Vec::new(), "neither data nor"),
        (
            json!({"inputs": [input("dense", json!([2, 2]), "FP32", 16)], "outputs": [{"name": "probs"}]}),
            dense.clone(),
            "unknown output",
        ),
    ];
    for (header, binary, want) in cases {
        let (status, _, body) = call_binary(&app, &header, &binary).await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{header}: {text}");
        assert!(text.contains(want), "{header}: {text}");
    }
}

/// Bodies sent with `Content-Encoding: gzip` (tritonclient's
/// `request_compression_algorithm`) are taken, answers are compressed when
/// asked, and the body limit holds for the decompressed body.
#[tokio::test]
async fn gzip_bodies_are_taken_and_a_gzip_bomb_is_refused() {
    use std::io::{Read, Write};

    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    };
    let app = app(ModelKind::Logistic);
    let body = json!({"instances": [{"dense": [0.5, -1.0], "sparse": {"tags": ["a"]}}]}).to_string();
    let (_, plain, _) = call(&app, "POST", PREDICT, body.clone()).await;
    let send = |compressed: Vec<u8>| {
        let request = Request::builder()
            .method("POST")
            .uri(PREDICT)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .header("accept-encoding", "gzip")
            .body(Body::from(compressed))
            .unwrap();
        app.clone().oneshot(request)
    };
    let response = send(gzip(body.as_bytes())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text).unwrap();
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["predictions"], plain["predictions"]);
    // 1 MB of spaces is a few KB gzipped, past the 4 KB limit once inflated.
    let bomb = gzip(&vec![b' '; 1 << 20]);
    assert!(bomb.len() < 4096, "{}", bomb.len());
    assert_eq!(send(bomb).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn posted_events_are_validated_whole_before_anything_is_produced() {
    // No broker at this address: a batch that reached the producer would
    // fail with 503, so every answer below is validation's own.
    let mut with_sink = state(ModelKind::Logistic);
    with_sink.events = Some(Arc::new(
        EventSink::new(
            &tributary::update_log::kafka::Connection::plain("127.0.0.1:9"),
            "events-never",
            EventCodec::Json,
            "test",
            "",
        )
        .unwrap(),
    ));
    let app = router(with_sink.clone());
    let good = json!({"dense": [1.0, 2.0], "sparse": {"country": "de"}, "label": 1});
    let batch = json!({"events": [good, {"dense": [1.0], "label": 1}, {"dense": [1.0, 2.0], "label": 7}, {"label": 0, "extra": 1}]});
    let (status, v, text) = call(&app, "POST", "/v1/events", batch.to_string()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    assert_eq!(v["error"], "3 of 4 events are invalid; none was produced");
    let invalid: Vec<(u64, &str)> = v["invalid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(invalid, [(1, "dense_length"), (2, "label_range"), (3, "json")], "{text}");
    assert!(v["invalid"][0]["error"].as_str().unwrap().contains("dense has 1 values"), "{text}");

    for (body, want) in [
        (json!({"events": []}).to_string(), "events is empty"),
        (json!({"events": vec![good.clone(); 5]}).to_string(), "at most 4"),
        ("[1, 2]".to_string(), "invalid request body"),
    ] {
        let (status, v, text) = call(&app, "POST", "/v1/events", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(v["error"].as_str().unwrap().contains(want), "{text}");
    }
    let metrics = with_sink.metrics.render();
    assert!(metrics.contains(r#"tributary_events_ingested_total{result="invalid",replica="test"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"tributary_events_ingested_total{result="produced",replica="test"} 0"#), "{metrics}");

    // Off: 404 that says so.
    let (status, v, _) = call(&app_without_ingest(), "POST", "/v1/events", batch.to_string()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("http.ingest"), "{v}");
}

fn app_without_ingest() -> axum::Router {
    router(state(ModelKind::Logistic))
}

#[tokio::test]
async fn posted_events_need_the_ingest_token_when_one_is_set() {
    let mut s = state(ModelKind::Logistic);
    s.events = Some(Arc::new(
        EventSink::new(
            &tributary::update_log::kafka::Connection::plain("127.0.0.1:9"),
            "events-never",
            EventCodec::Json,
            "test",
            "ingest-secret-0123",
        )
        .unwrap(),
    ));
    let app = router(s);
    let invalid = json!({"events": [{"label": 0.5}]}).to_string();
    let send = |token: Option<&'static str>| {
        let app = app.clone();
        let body = invalid.clone();
        async move {
            let mut request = axum::http::Request::builder().method("POST").uri("/v1/events");
            if let Some(t) = token {
                request = request.header("authorization", format!("Bearer {t}"));
            }
            let response = tower::ServiceExt::oneshot(app, request.body(Body::from(body)).unwrap()).await.unwrap();
            (response.status(), response.headers().get("www-authenticate").is_some())
        }
    };
    assert_eq!(send(None).await, (StatusCode::UNAUTHORIZED, true));
    assert_eq!(send(Some("wrong-secret-0123")).await, (StatusCode::UNAUTHORIZED, true));
    // With the token, the batch reaches validation (an empty "dense" of a
    // model that takes 2: 422).
    assert_eq!(send(Some("ingest-secret-0123")).await.0, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn status_reports_the_sampled_history() {
    let s = state(ModelKind::Logistic);
    for _ in 0..3 {
        s.history.sample(&s.predictor.serving, &s.metrics);
    }
    let (status, v, text) = call(&router(s), "GET", "/v1/status", Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        (v["replica"].as_str(), v["model"].as_str(), v["kind"].as_str()),
        (Some("test"), Some("default"), Some("logistic"))
    );
    let h = &v["history"];
    for series in std::iter::once("unix_ms").chain(crate::helpers::STATUS_SERIES) {
        assert_eq!(h[series].as_array().map(Vec::len), Some(3), "{series}: {text}");
    }
    let page = call(&app(ModelKind::Logistic), "GET", "/", Body::empty()).await.2;
    assert!(page.contains("<svg class=\"chart\" id=\"chart-progressive_logloss\""), "{page}");
}
