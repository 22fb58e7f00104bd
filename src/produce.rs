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

/// How `produce` spreads events over the topic's partitions: as the
/// producers teams already run do, so that the order a trainer sees can be
/// tried on each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Partitioning {
    /// Keyless records as librdkafka's default partitioner places them: a
    /// producer batch (up to `linger.ms`) to one partition, then the next.
    #[default]
    Sticky,
    /// Each event to a partition drawn at random.
    PerMessage,
    /// Keyed by the event's value at a JSON pointer (RFC 6901, as
    /// `/sparse/f0`), hashed by librdkafka's default partitioner: every
    /// event of a key in one partition, in order.
    Key(String),
}

impl std::str::FromStr for Partitioning {
    type Err = String;
    fn from_str(s: &str) -> Result<Partitioning, String> {
        match s {
            "sticky" => Ok(Partitioning::Sticky),
            "per-message" => Ok(Partitioning::PerMessage),
            _ => match s.strip_prefix("key:") {
                Some(pointer) if pointer.starts_with('/') => Ok(Partitioning::Key(pointer.to_string())),
                _ => Err(format!("`{s}`: expected sticky, per-message or key:/JSON/pointer (as key:/sparse/f0)")),
            },
        }
    }
}

/// The key a keyed event is produced with: the value at `pointer`, a
/// string as it is, anything else as its JSON text.
fn key_of(line: &str, pointer: &str) -> Result<Vec<u8>, String> {
    let event: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    match event.pointer(pointer) {
        Some(serde_json::Value::String(s)) => Ok(s.as_bytes().to_vec()),
        Some(serde_json::Value::Null) | None => Err(format!("no key at {pointer}")),
        Some(other) => Ok(other.to_string().into_bytes()),
    }
}

/// Produces every valid line of `input` to `topic` in `kafka.event_format`
/// (JSON as it is, or Avro framed for the Confluent wire format), spread
/// over the partitions as `partitioning` says, creating the topic as
/// `serve` creates the events topic (`kafka.events_partitions`,
/// `kafka.replication_factor`) if it does not exist.
pub fn produce(
    k: &KafkaConfig,
    topic: &str,
    featurizer: &Featurizer,
    input: impl BufRead,
    partitioning: &Partitioning,
) -> anyhow::Result<ProduceReport> {
    let codec = EventCodec::new(k, featurizer).map_err(anyhow::Error::msg)?;
    let delivered = Arc::new(Delivered::default());
    let producer = events_producer(k, topic, delivered.clone())?;
    let mut spread = match partitioning {
        Partitioning::PerMessage => Some(RandomPartition::over(partition_count(&producer, topic)?)),
        _ => None,
    };
    let mut progress = ProgressLine::start();
    let (mut sent, mut invalid) = (0u64, 0u64);
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let (payload, key) = match checked(&line, featurizer, &codec, partitioning) {
            Ok(checked) => checked,
            Err(e) => {
                eprintln!("line {}: {e}", i + 1);
                invalid += 1;
                continue;
            }
        };
        // Keyless: an empty key, which the default partitioner places sticky.
        let mut record = BaseRecord::to(topic).payload(payload.as_ref()).key(key.as_deref().unwrap_or_default());
        if let Some(spread) = &mut spread {
            record = record.partition(spread.next());
        }
        send_waiting(&producer, record)?;
        sent += 1;
        producer.poll(Duration::ZERO);
        progress.draw(sent, invalid);
    }
    producer.flush(Duration::from_secs(60)).context("flushing the producer")?;
    let (ok, failed) = (delivered.ok.load(Ordering::Relaxed), delivered.failed.load(Ordering::Relaxed));
    // Sent but never reported is not delivered.
    let report = ProduceReport { produced: ok, failed: failed + sent.saturating_sub(ok + failed), invalid };
    progress.finish(topic, &report);
    Ok(report)
}

/// A producer of events to `topic`, which it creates as `serve` creates
/// the events topic if it does not exist; deliveries count in `delivered`.
fn events_producer(k: &KafkaConfig, topic: &str, delivered: Arc<Delivered>) -> anyhow::Result<BaseProducer<Counting>> {
    let connection = kafka::Connection::of(k)?;
    let events = [(topic, k.events_partitions, kafka::TopicRole::Events)];
    futures::executor::block_on(kafka::create_missing(&connection, k.replication_factor, &events))?;
    let mut config = kafka::producer_config(&connection, "tributary-produce");
    // Events are small and many: batch them.
    config.set("queue.buffering.max.messages", "500000").set("linger.ms", "5").set("batch.num.messages", "1000");
    Ok(config.create_with_context(Counting(delivered))?)
}

/// An event's payload as produced, and its key (if keyed).
type Produced<'a> = (std::borrow::Cow<'a, [u8]>, Option<Vec<u8>>);

/// A line checked against the model and encoded, with its key when
/// `partitioning` takes one from the event; why not, otherwise.
fn checked<'a>(
    line: &'a str,
    featurizer: &Featurizer,
    codec: &EventCodec,
    partitioning: &Partitioning,
) -> Result<Produced<'a>, String> {
    featurizer.event(line.as_bytes()).map_err(|e| e.to_string())?;
    let payload = codec.encode(line.as_bytes())?;
    let key = match partitioning {
        Partitioning::Key(pointer) => Some(key_of(line, pointer)?),
        _ => None,
    };
    Ok((payload, key))
}

/// Sends `record`, waiting while the producer's queue is full.
fn send_waiting(producer: &BaseProducer<Counting>, mut record: BaseRecord<'_, [u8], [u8]>) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(50));
            }
            Err((e, _)) => return Err(e).context("producing"),
        }
    }
}

/// A partition per event, at random (xorshift64).
struct RandomPartition {
    draw: u64,
    partitions: u64,
}

impl RandomPartition {
    fn over(partitions: u64) -> RandomPartition {
        RandomPartition { draw: 0x9e37_79b9_7f4a_7c15, partitions }
    }

    fn next(&mut self) -> i32 {
        self.draw ^= self.draw << 13;
        self.draw ^= self.draw >> 7;
        self.draw ^= self.draw << 17;
        (self.draw % self.partitions) as i32
    }
}

/// The progress line drawn on a terminal, and the closing count.
struct ProgressLine {
    terminal: bool,
    start: Instant,
    last_draw: Instant,
}

impl ProgressLine {
    fn start() -> ProgressLine {
        let now = Instant::now();
        ProgressLine { terminal: std::io::stderr().is_terminal(), start: now, last_draw: now }
    }

    fn draw(&mut self, sent: u64, invalid: u64) {
        if self.terminal && self.last_draw.elapsed() >= Duration::from_millis(200) {
            self.last_draw = Instant::now();
            let rate = sent as f64 / self.start.elapsed().as_secs_f64();
            eprint!("\r{sent} events sent, {rate:.0}/s, {invalid} invalid   ");
            let _ = std::io::stderr().flush();
        }
    }

    fn finish(&self, topic: &str, report: &ProduceReport) {
        if self.terminal {
            eprintln!();
        }
        let secs = self.start.elapsed().as_secs_f64();
        eprintln!(
            "produced {} events to {topic} in {secs:.2} s ({:.0}/s); {} failed, {} invalid lines",
            report.produced,
            report.produced as f64 / secs.max(1e-9),
            report.failed,
            report.invalid
        );
    }
}

/// How many partitions `topic` has, from the cluster's metadata.
fn partition_count(producer: &BaseProducer<Counting>, topic: &str) -> anyhow::Result<u64> {
    let metadata = producer.client().fetch_metadata(Some(topic), Duration::from_secs(10)).context("topic metadata")?;
    let count = metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len());
    anyhow::ensure!(count > 0, "topic {topic} has no partitions in the metadata");
    Ok(count as u64)
}
