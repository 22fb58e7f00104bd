//! The `[feedback]` section: learning from outcomes that come after the
//! prediction (docs/design.md section 8b). Built so far: every served
//! instance logged to the predictions topic, keyed by its id.

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Log every instance a predict serves (V1, V2 REST, gRPC: its record,
    /// the prediction, `model_version`, the time) to `predictions_topic`,
    /// keyed by its id: the request's (V1 `ids`, V2 input `id`), or ids the
    /// replica makes and answers.
    pub enabled: bool,
    /// Created with `kafka.events_partitions` partitions when missing.
    pub predictions_topic: String,
    /// Served instances waiting to be sent to the broker; one more is not
    /// logged (counted in `predictions_logged_total{result="unlogged"}`):
    /// a prediction never waits on the broker and never fails for it.
    pub max_unsent: usize,
}

impl Default for FeedbackConfig {
    fn default() -> FeedbackConfig {
        FeedbackConfig { enabled: false, predictions_topic: "predictions".into(), max_unsent: 100_000 }
    }
}

impl FeedbackConfig {
    /// The section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && self.predictions_topic.trim().is_empty() {
            return Err(ConfigError::Invalid("feedback.predictions_topic must name a topic".into()));
        }
        // librdkafka's queue.buffering.max.messages: 1 to 2^31 - 1.
        if !(1..=i32::MAX as usize).contains(&self.max_unsent) {
            return Err(ConfigError::Invalid("feedback.max_unsent must be between 1 and 2147483647".into()));
        }
        Ok(())
    }
}
