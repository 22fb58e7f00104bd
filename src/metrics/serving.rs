//! The serving side's metrics: requests over REST and gRPC, events posted
//! to `/v1/events`, admin requests refused.

use prometheus::{HistogramVec, IntCounter, IntCounterVec};

use super::{opts, seconds, Registrar};

pub struct ServingMetrics {
    /// Both protocols: `protocol` is `http` (REST) or `grpc`.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// The names before gRPC was counted beside REST, kept with the same
    /// values for dashboards that read them (deprecated).
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub admin_denied: IntCounter,
    pub events_ingested: IntCounterVec,
    /// Served instances handed to the predictions topic's producer, by
    /// result: `queued`, `unlogged` (its queue was full), `failed` (the
    /// broker did not take it).
    pub predictions_logged: IntCounterVec,
    /// Labels posted to `/v1/models/{m}/feedback`, by result: `produced`,
    /// `failed` (the broker did not take it).
    pub labels_posted: IntCounterVec,
}

impl ServingMetrics {
    pub fn new(r: &mut Registrar) -> ServingMetrics {
        const REQUEST: [&str; 4] = ["protocol", "method", "route", "status"];
        const ROUTE: [&str; 3] = ["protocol", "method", "route"];
        let counted = "Requests by protocol (http: REST; grpc: the Open Inference Protocol's gRPC service), \
                       method, route and status (an HTTP status, or a gRPC code's name)";
        let m = ServingMetrics {
            requests: r.add(IntCounterVec::new(opts("requests_total", counted), &REQUEST)),
            request_duration: r.add(HistogramVec::new(
                seconds("request_duration_seconds", "Request latency by protocol, method and route"),
                &ROUTE,
            )),
            http_requests: r.add(IntCounterVec::new(
                opts("http_requests_total", "Deprecated: requests_total, under its old name"),
                &REQUEST,
            )),
            http_duration: r.add(HistogramVec::new(
                seconds("http_request_duration_seconds", "Deprecated: request_duration_seconds, under its old name"),
                &ROUTE,
            )),
            admin_denied: r
                .add(IntCounter::new("admin_denied_total", "Admin requests refused for a missing or wrong token")),
            events_ingested: r.add(IntCounterVec::new(
                opts("events_ingested_total", "Events posted to /v1/events, by result (produced, invalid, failed)"),
                &["result"],
            )),
            predictions_logged: r.add(IntCounterVec::new(
                opts(
                    "predictions_logged_total",
                    "Served instances logged to the predictions topic, by result (queued, unlogged, failed)",
                ),
                &["result"],
            )),
            labels_posted: r.add(IntCounterVec::new(
                opts("labels_posted_total", "Labels posted to /v1/models/{m}/feedback, by result (produced, failed)"),
                &["result"],
            )),
        };
        for result in ["produced", "failed"] {
            m.labels_posted.with_label_values(&[result]);
        }
        for result in ["queued", "unlogged", "failed"] {
            m.predictions_logged.with_label_values(&[result]);
        }
        for result in ["produced", "invalid", "failed"] {
            m.events_ingested.with_label_values(&[result]);
        }
        m
    }

    /// Counts and times one request of `protocol` (`http` or `grpc`).
    pub fn count_request(&self, protocol: &str, method: &str, route: &str, status: &str, seconds: f64) {
        for (count, time) in [(&self.requests, &self.request_duration), (&self.http_requests, &self.http_duration)] {
            time.with_label_values(&[protocol, method, route]).observe(seconds);
            count.with_label_values(&[protocol, method, route, status]).inc();
        }
    }
}
