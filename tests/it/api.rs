//! The HTTP API in process, through `tower::ServiceExt::oneshot`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use tributary::config::{Config, ModelKind};
use tributary::http::{router, AppState};
use tributary::metrics::Metrics;
use tributary::model::Model;
use tributary::snapshot::Publisher;
use tributary::state::ReplicaState;

/// A replica's HTTP state without Kafka: a small model at its seed weights.
pub fn state(kind: ModelKind) -> AppState {
    let mut config = Config::default();
    config.model.kind = kind;
    config.model.buckets = 1024;
    config.model.dense_dim = 2;
    config.model.sparse_fields = vec!["country".into(), "tags".into()];
    config.http.max_body_bytes = 4096;
    config.http.max_batch = 4;
    let model = Arc::new(Model::new(&config.model).expect("a built-in model"));
    let publisher = Publisher::new(model.clone(), &ReplicaState::initial(&model), false);
    config.replica_id = "test".into();
    AppState::new(publisher.serving(), Arc::new(Metrics::new("test")), &config, Arc::new(AtomicBool::new(true)))
}

pub fn app(kind: ModelKind) -> axum::Router {
    router(state(kind))
}

pub async fn call(app: &axum::Router, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, Value, String) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), text)
}

pub const PREDICT: &str = "/v1/models/default:predict";

#[tokio::test]
async fn predicts_for_every_model_kind() {
    for kind in [ModelKind::Logistic, ModelKind::Mlp, ModelKind::WideDeep] {
        let app = app(kind);
        let body = json!({"instances": [
            {"dense": [0.5, -1.0], "sparse": {"country": "de", "tags": ["a", "b"]}},
            {"dense": [0.0, 0.0]}
        ]});
        let (status, v, text) = call(&app, "POST", PREDICT, body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{kind:?}: {text}");
        let p = v["predictions"].as_array().unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| (0.0..=1.0).contains(&p.as_f64().unwrap())), "{text}");
        assert_eq!(v["model_version"], 0);
    }
}

#[tokio::test]
async fn model_info_health_ready_and_metrics() {
    let app = app(ModelKind::WideDeep);
    let (status, v, _) = call(&app, "GET", "/v1/models/default", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    for key in ["name", "model_version", "ready", "examples_learned", "progressive_logloss", "watermarks"] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["weights_digest"].as_str().unwrap().len(), 64);
    assert_eq!(call(&app, "GET", "/healthz", Body::empty()).await.0, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/readyz", Body::empty()).await.0, StatusCode::OK);
    call(&app, "POST", PREDICT, "{").await;
    let (status, _, text) = call(&app, "GET", "/metrics", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("tributary_model_version"), "{text}");
    assert!(
        text.contains(
            r#"tributary_http_requests_total{method="POST",protocol="http",route="/v1/models/{model}",status="400",replica="test"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("tributary_http_request_duration_seconds_bucket"), "{text}");
}

#[tokio::test]
async fn bad_input_gets_a_4xx_json_error_that_says_what_is_wrong() {
    let app = app(ModelKind::WideDeep);
    let one = |instance: &str| format!(r#"{{"instances": [{instance}]}}"#);
    let cases: Vec<(&str, &str, Vec<u8>, StatusCode, &str)> = vec![
        ("POST", PREDICT, b"{\"instances\": [".to_vec(), StatusCode::BAD_REQUEST, "EOF"),
        ("POST", PREDICT, vec![0xff, 0xfe, 0x00, 0x13], StatusCode::BAD_REQUEST, "invalid request body"),
        ("POST", PREDICT, one(r#"{"dense": [NaN, 1]}"#).into_bytes(), StatusCode::BAD_REQUEST, "invalid request body"),
        (
            "POST",
            PREDICT,
            one(r#"{"dense": [1]}"#).into_bytes(),
            StatusCode::BAD_REQUEST,
            "instances[0]: dense has 1 values, the model expects 2",
        ),
        (
            "POST",
            PREDICT,
            one(r#"{"dense": [1, 1e39]}"#).into_bytes(),
            StatusCode::BAD_REQUEST,
            "instances[0]: dense[1] is not a finite number",
        ),
        ("POST", PREDICT, one(r#"{"dense": ["a", 1]}"#).into_bytes(), StatusCode::BAD_REQUEST, "instances[0]"),
        (
            "POST",
            PREDICT,
            one(r#"{"dense": [1, 2], "sparse": {"city": "x"}}"#).into_bytes(),
            StatusCode::BAD_REQUEST,
            "unknown sparse field \"city\"",
        ),
        (
            "POST",
            PREDICT,
            one(r#"{"dense": [1, 2], "sparse": {"tags": 7}}"#).into_bytes(),
            StatusCode::BAD_REQUEST,
            "string or an array",
        ),
        ("POST", PREDICT, b"{}".to_vec(), StatusCode::BAD_REQUEST, "missing field `instances`"),
        ("POST", PREDICT, br#"{"instances": []}"#.to_vec(), StatusCode::BAD_REQUEST, "instances is empty"),
        (
            "POST",
            PREDICT,
            format!(r#"{{"instances": [{}]}}"#, [r#"{"dense":[1,2]}"#; 5].join(",")).into_bytes(),
            StatusCode::BAD_REQUEST,
            "at most 4",
        ),
        ("POST", PREDICT, vec![b' '; 5000], StatusCode::PAYLOAD_TOO_LARGE, "larger than 4096 bytes"),
        (
            "POST",
            "/v1/models/other:predict",
            one(r#"{"dense": [1, 2]}"#).into_bytes(),
            StatusCode::NOT_FOUND,
            "model \"other\" not found",
        ),
        (
            "POST",
            "/v1/models/default:explain",
            one(r#"{"dense": [1, 2]}"#).into_bytes(),
            StatusCode::NOT_FOUND,
            "unknown verb",
        ),
        ("GET", "/v1/models/other", Vec::new(), StatusCode::NOT_FOUND, "not found"),
        ("GET", "/nope", Vec::new(), StatusCode::NOT_FOUND, "no such route"),
        ("DELETE", "/healthz", Vec::new(), StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        ("POST", "/v1/models/default", Vec::new(), StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    ];
    for (method, uri, body, want_status, want_text) in cases {
        let (status, v, text) = call(&app, method, uri, body.clone()).await;
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).to_string();
        assert_eq!(status, want_status, "{method} {uri} {shown}: {text}");
        let error = v["error"].as_str().unwrap_or_else(|| panic!("no JSON error for {method} {uri} {shown}: {text}"));
        assert!(error.contains(want_text), "{method} {uri} {shown}: {error}");
    }
}

/// The token of the peer checkpoint endpoint in these tests.
const PEER_TOKEN: &str = "peer-token-0123456789";

/// The HTTP state of a small model whose store holds checkpoints at
/// positions 4 and 9 (100 and 300 examples), serving them to peers; the
/// store's directory.
fn state_with_checkpoints() -> (AppState, tempfile::TempDir) {
    use tributary::checkpoint::Store;
    let mut config = Config::default();
    config.model.kind = ModelKind::Logistic;
    config.model.buckets = 64;
    let model = Arc::new(Model::new(&config.model).expect("a built-in model"));
    let dir = tempfile::tempdir().unwrap();
    let store = tributary::checkpoint::LocalStore::open(dir.path(), 3).unwrap();
    let mut state = ReplicaState::initial(&model);
    for (position, examples) in [(4, 100), (9, 300)] {
        state.position = position;
        state.examples_learned = examples;
        state.loss_sum = examples as f64 * 0.5;
        store.save(&model, &state).unwrap();
    }
    let publisher = Publisher::new(model.clone(), &state, false);
    let ready = Arc::new(AtomicBool::new(true));
    let mut state = AppState::new(publisher.serving(), Arc::new(Metrics::new("test")), &config, ready);
    state.checkpoints = Some(Arc::new(store));
    state.peer_checkpoints = Some(Arc::new(tributary::http::peer::PeerCheckpoints::new(PEER_TOKEN)));
    (state, dir)
}

#[tokio::test]
async fn checkpoints_are_listed_newest_first_with_their_counters_also_under_their_old_name() {
    let (state, _dir) = state_with_checkpoints();
    let app = router(state);
    let (status, body, _) = call(&app, "GET", "/v1/models/default/checkpoints", Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed = body["checkpoints"].as_array().unwrap();
    let positions: Vec<i64> = listed.iter().map(|s| s["position"].as_i64().unwrap()).collect();
    assert_eq!(positions, vec![9, 4]);
    assert_eq!(listed[0]["examples_learned"], 300);
    assert_eq!(listed[0]["progressive_logloss"], 0.5);
    assert!(listed[0]["bytes"].as_u64().unwrap() > 64 * 4 * 4, "{body}");
    assert!(listed[0]["written_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let (status, _, _) = call(&app, "GET", "/v1/models/other/checkpoints", Body::empty()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The deprecated path answers the same list under its old key.
    let (status, old, _) = call(&app, "GET", "/v1/models/default/snapshots", Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{old}");
    assert_eq!(old["snapshots"], body["checkpoints"]);
}

/// The gather's two ends over real HTTP: the shard client asks a replica's
/// rows endpoint for rows and gets the served weights' rows, bit for bit,
/// with the served position; without the peer token it gets none.
#[tokio::test]
async fn rows_go_to_peers_with_the_token_as_the_served_weights_hold_them() {
    use std::collections::BTreeMap;
    use std::time::Duration;
    use tributary::shard::Ask;
    let (state, _dir) = state_with_checkpoints();
    let snap = state.predictor.serving.load();
    let model = snap.model.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let table = (0..model.params().len()).find(|&p| model.params()[p].sparse).unwrap() as u32;
    let wanted = BTreeMap::from([(0, vec![(table, 3), (table, 60)])]);
    let cols = |&(p, _): &(u32, u32)| model.params()[p as usize].cols;
    let shards = |token| {
        let replicas = vec![vec![url.clone()]];
        tributary::shard::Shards::new("default", replicas, token, Duration::from_secs(1), Duration::from_secs(5))
    };
    let got = shards(PEER_TOKEN).gather(&wanted, cols, Ask::default()).await.unwrap();
    let weights = &snap.weights[table as usize];
    assert_eq!(got[&0].values, [weights[3], weights[60]]);
    assert_eq!(got[&0].position, snap.position);
    let refused = shards("not-the-peer-token-at-all").gather(&wanted, cols, Ask::default()).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    // A position not served yet is waited for, then the rows come from
    // what is served, which the position says.
    let started = std::time::Instant::now();
    let later =
        shards(PEER_TOKEN).gather(&wanted, cols, Ask { at_least: snap.position + 1, slots: false }).await.unwrap();
    assert_eq!((later[&0].position, &later[&0].values), (snap.position, &got[&0].values));
    assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
    let beyond = BTreeMap::from([(0, vec![(table, 64)])]);
    assert!(shards(PEER_TOKEN).gather(&beyond, cols, Ask::default()).await.unwrap_err().to_string().contains("400"));
}

#[tokio::test]
async fn the_newest_checkpoint_goes_to_peers_with_the_token_whole_and_a_few_at_a_time() {
    use tributary::http::peer::DOWNLOADS_AT_ONCE;
    let (state, _dir) = state_with_checkpoints();
    let listed = state.checkpoints.as_ref().unwrap().list().unwrap();
    let app = router(state.clone());
    let get = |token: Option<&str>| {
        let mut request = Request::builder().uri("/v1/models/default/checkpoint").header("accept-encoding", "gzip");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        app.clone().oneshot(request.body(Body::empty()).unwrap())
    };
    for token in [None, Some("not-the-peer-token-at-all")] {
        assert_eq!(get(token).await.unwrap().status(), StatusCode::UNAUTHORIZED, "{token:?}");
    }
    // Whole, as the store encodes it, and not compressed.
    let response = get(Some(PEER_TOKEN)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tributary-position"], "9");
    assert!(response.headers().get("content-encoding").is_none());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let whole = state.checkpoints.as_ref().unwrap().read(&listed[0]).unwrap();
    assert!(body == whole, "{} bytes served, {} stored", body.len(), whole.len());
    // While as many bodies are being sent as it sends at once, one more is a 429.
    let mut sending = Vec::new();
    for _ in 0..DOWNLOADS_AT_ONCE {
        sending.push(get(Some(PEER_TOKEN)).await.unwrap());
    }
    assert_eq!(get(Some(PEER_TOKEN)).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    drop(sending);
    // A finished (or abandoned) download frees its turn.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while get(Some(PEER_TOKEN)).await.unwrap().status() != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "no download freed its turn");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Off without a token configured.
    let off = router(AppState { peer_checkpoints: None, ..state });
    let (status, v, _) = call(&off, "GET", "/v1/models/default/checkpoint", Body::empty()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("checkpoint.peer_token"), "{v}");
}

#[tokio::test]
async fn admin_endpoints_are_off_without_a_configured_token() {
    let app = app(ModelKind::Logistic);
    let body = json!({"to_version": 0, "events": "skip"}).to_string();
    let (status, v, _) = call(&app, "POST", "/v1/models/default/rollback", body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("no admin token"), "{v}");
}

/// A shard whose other shard has no replica answering: a prediction that
/// reads that shard's rows is a 503 naming it, over V1 and V2 REST, never
/// an answer from rows missing; the replica answers on.
#[tokio::test]
async fn a_prediction_of_a_shard_whose_other_shard_is_down_is_a_503_naming_it() {
    let mut config = Config::default();
    config.model.kind = ModelKind::WideDeep;
    config.model.buckets = 64;
    config.checkpoint.peer_token = PEER_TOKEN.into();
    config.shard.count = 2;
    config.shard.index = 0;
    config.shard.deadline_ms = 500;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    config.shard.replicas = vec![vec![], vec![dead]];
    config.validate().unwrap();
    let layout = tributary::model::Layout::new(2, 0).unwrap();
    let model = Arc::new(Model::new(&config.model).unwrap().with_layout(layout));
    let publisher = Publisher::new(model.clone(), &ReplicaState::initial(&model), false);
    let ready = Arc::new(AtomicBool::new(true));
    let app = router(AppState::new(publisher.serving(), Arc::new(Metrics::new("test")), &config, ready));
    // Values of f0 whose buckets fall on both shards.
    let instances: Vec<Value> =
        (0..16).map(|i| json!({"dense": vec![0.0; 8], "sparse": {"f0": format!("v{i}")}})).collect();
    let (status, body, text) =
        call(&app, "POST", "/v1/models/default:predict", json!({ "instances": instances }).to_string()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(body["error"].as_str().unwrap().contains("shard 1 of 2"), "{text}");
    let v2 = json!({"inputs": [
        {"name": "dense", "shape": [16, 8], "datatype": "FP32", "data": vec![0.0; 128]},
        {"name": "f0", "shape": [16], "datatype": "BYTES", "data": (0..16).map(|i| format!("v{i}")).collect::<Vec<_>>()},
    ]});
    let (status, body, text) = call(&app, "POST", "/v2/models/default/infer", v2.to_string()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(body["error"].as_str().unwrap().contains("shard 1 of 2"), "{text}");
    let (status, _, text) = call(&app, "GET", "/healthz", Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
}
