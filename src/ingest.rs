//! `tributary produce`: JSONL events from a file or stdin into a topic.
//! Each line is validated against the configured model first; invalid lines
//! are reported by number and not sent. A progress line is drawn on a
//! terminal; the end prints the count and the rate.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::config::KafkaConfig;
use crate::event::{EventCodec, Featurizer};
use crate::update_log::kafka;

/// Records the brokers acknowledged, and those that failed for good.
#[derive(Debug, Default)]
pub struct Delivered {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// A producer context that counts each delivery into [`Delivered`].
pub struct Counting(pub Arc<Delivered>);

impl ClientContext for Counting {}
impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() { &self.0.ok } else { &self.0.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceReport {
    pub produced: u64,
    pub failed: u64,
    pub invalid: u64,
}

/// Produces every valid line of `input` to `topic` in `kafka.event_format`
/// (JSON as it is, or Avro framed for the Confluent wire format), creating the topic as
/// `serve` creates the events topic (`kafka.events_partitions`,
/// `kafka.replication_factor`) if it does not exist.
pub fn produce(
    k: &KafkaConfig,
    topic: &str,
    featurizer: &Featurizer,
    input: impl BufRead,
) -> anyhow::Result<ProduceReport> {
    let codec = EventCodec::new(k).map_err(anyhow::Error::msg)?;
    let connection = kafka::Connection::of(k)?;
    let events = [(topic, k.events_partitions, kafka::TopicRole::Events)];
    futures::executor::block_on(kafka::create_missing(&connection, k.replication_factor, &events))?;
    let delivered = Arc::new(Delivered::default());
    let mut config = kafka::producer_config(&connection, "tributary-produce");
    // Events are small and many: batch them.
    config.set("queue.buffering.max.messages", "500000").set("linger.ms", "5").set("batch.num.messages", "1000");
    let producer: BaseProducer<Counting> = config.create_with_context(Counting(delivered.clone()))?;
    let terminal = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last_draw = start;
    let (mut sent, mut invalid) = (0u64, 0u64);
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        if let Err(e) = featurizer.event(line.as_bytes()) {
            eprintln!("line {}: {e}", i + 1);
            invalid += 1;
            continue;
        }
        let payload = match codec.encode(line.as_bytes()) {
            Ok(payload) => payload,
            Err(e) => {
                eprintln!("line {}: {e}", i + 1);
                invalid += 1;
                continue;
            }
        };
        let mut record = BaseRecord::to(topic).payload(payload.as_ref()).key(&[] as &[u8]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
        sent += 1;
        producer.poll(Duration::ZERO);
        if terminal && last_draw.elapsed() >= Duration::from_millis(200) {
            last_draw = Instant::now();
            let rate = sent as f64 / start.elapsed().as_secs_f64();
            eprint!("\r{sent} events sent, {:.0}/s, {invalid} invalid   ", rate);
            let _ = std::io::stderr().flush();
        }
    }
    producer.flush(Duration::from_secs(60)).context("flushing the producer")?;
    let secs = start.elapsed().as_secs_f64();
    let report = ProduceReport {
        produced: delivered.ok.load(Ordering::Relaxed),
        failed: delivered.failed.load(Ordering::Relaxed)
            + sent.saturating_sub(delivered.ok.load(Ordering::Relaxed) + delivered.failed.load(Ordering::Relaxed)),
        invalid,
    };
    if terminal {
        eprintln!();
    }
    eprintln!(
        "produced {} events to {topic} in {secs:.2} s ({:.0}/s); {} failed, {} invalid lines",
        report.produced,
        report.produced as f64 / secs.max(1e-9),
        report.failed,
        report.invalid
    );
    Ok(report)
}
