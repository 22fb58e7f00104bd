//! The `[feedback]` section: learning from outcomes that come after the
//! prediction (docs/design.md section 8b): every served instance logged to
//! the predictions topic keyed by its id, labels posted or produced to the
//! labels topic under the same id, and the join of the two into training
//! events (a role of the replica).

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Log every instance a predict serves (V1, V2 REST, gRPC: its record,
    /// the prediction, `model_version`, the time) to `predictions_topic`,
    /// keyed by its id: the request's (V1 `ids`, V2 input `id`), or ids the
    /// replica makes and answers; take labels at `POST
    /// /v1/models/{m}/feedback`; and, with `join`, join them.
    pub enabled: bool,
    /// Created with `kafka.events_partitions` partitions when missing.
    pub predictions_topic: String,
    /// Labels keyed by the prediction's id, `{"id", "label"}` as JSON;
    /// created with the predictions topic's partitions when missing.
    pub labels_topic: String,
    /// Served instances waiting to be sent to the broker; one more is not
    /// logged (counted in `predictions_logged_total{result="unlogged"}`):
    /// a prediction never waits on the broker and never fails for it.
    pub max_unsent: usize,
    /// This replica is a member of the join's consumer group (the join's
    /// partitions spread over the replicas that are).
    pub join: bool,
    /// How long a prediction waits for its label, and a label for its
    /// prediction, in the partition's stream time (the newest record time
    /// read from it; wall-clock time while the joiner has nothing to read).
    pub window_ms: u64,
    /// What a prediction whose window passed without a label becomes.
    pub on_expiry: OnExpiry,
    /// The label `on_expiry = "learn_default"` joins: a value as the label
    /// field holds it (0: no click).
    pub default_label: serde_json::Value,
    /// Open predictions one joiner holds; beyond it the oldest expires
    /// early (counted in `join_predictions_total{outcome="expired_early"}`).
    /// Labels waiting for their prediction, and ids remembered after their
    /// join to tell a late or second label from an unknown one, are each
    /// bounded by it too (oldest first).
    pub max_open: usize,
}

/// What an expired prediction becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExpiry {
    /// A training event with `default_label`.
    LearnDefault,
    /// Nothing: it is counted and forgotten.
    Drop,
}

impl Default for FeedbackConfig {
    fn default() -> FeedbackConfig {
        FeedbackConfig {
            enabled: false,
            predictions_topic: "predictions".into(),
            labels_topic: "labels".into(),
            max_unsent: 100_000,
            join: true,
            window_ms: 15 * 60 * 1000,
            on_expiry: OnExpiry::LearnDefault,
            default_label: serde_json::Value::from(0),
            max_open: 1_000_000,
        }
    }
}

impl FeedbackConfig {
    /// The joiner's changelog: its open window, compacted (keyed by id).
    pub fn changelog_topic(&self) -> String {
        format!("{}.join", self.predictions_topic)
    }

    /// The section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |why: &str| Err(ConfigError::Invalid(format!("feedback.{why}")));
        if self.enabled && self.predictions_topic.trim().is_empty() {
            return invalid("predictions_topic must name a topic");
        }
        if self.enabled && (self.labels_topic.trim().is_empty() || self.labels_topic == self.predictions_topic) {
            return invalid("labels_topic must name a topic other than predictions_topic");
        }
        // librdkafka's queue.buffering.max.messages: 1 to 2^31 - 1.
        if !(1..=i32::MAX as usize).contains(&self.max_unsent) {
            return invalid("max_unsent must be between 1 and 2147483647");
        }
        if self.window_ms == 0 || self.window_ms > i64::MAX as u64 / 4 {
            return invalid("window_ms must be above 0 (and below 2^61)");
        }
        if !(self.default_label.is_number() || self.default_label.is_boolean() || self.default_label.is_string()) {
            return invalid("default_label must be a number, a boolean or a string");
        }
        if self.max_open == 0 {
            return invalid("max_open must be above 0");
        }
        Ok(())
    }
}
