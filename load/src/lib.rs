//! tributary's load tool as a library: the HTTP load driver, the scenarios,
//! the report and its history. The processes it runs (Kafka brokers,
//! replicas, event streams) are `tributary-testkit`'s, which tributary's
//! fleet tests share.

pub mod driver;
pub mod history;
pub mod report;
pub mod scenarios;
